"""Unions: several methods in one module (He et al. 2022, arXiv:2110.04366; Mao et al. 2022).

A union module trains, saves, loads and activates as one module, but its parameters are the members'
own: each member config builds its attachments as it would alone, and at every site the members'
units are gathered into one `UnionUnit`. The site runs a union's members as if they had been added
separately (`Unit.parts()`), each in its own stage: LoRA deltas first, then prefix keys and adapters.

    modfit.config("union", components=[{"method": "lora", "r": 4}, {"method": "prefix"}])
    modfit train --method union --param components=lora,prefix --param lora.r=4 ...

A member is named by its method ("lora"), or "<method>_<i>" when a method appears more than once
(its position, from 1). `<member>.<field>=<value>` parameters change one member's field; on disk a
member's tensors sit under `units.<site path>.members.<member>.<param>`.

Members whose training runs in phases (LT-SFT, diff pruning: `ModuleConfig.fit`) act on their own
units between phases and cannot be members; the union refuses them by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..config import ConfigError, ModuleConfig, check
from ..registry import method_entry, register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView
from .bottleneck import PfeifferConfig
from .lora import LoraConfig


class UnionUnit(Unit):
    """The members of one union module at one site, by member name.

    The site never calls this unit: `parts()` hands it the members, which it orders by stage with
    every other active unit. `forward`/`before` exist for direct use and do the same thing.
    """

    def __init__(self, members: Mapping[str, Unit]) -> None:
        super().__init__()
        self.members = nn.ModuleDict(dict(members))

    def parts(self) -> list[Unit]:
        return [part for member in self.members.values() for part in cast(Unit, member).parts()]

    @property  # type: ignore[misc]  # per instance: the site must capture r if any member reads it
    def needs_residual(self) -> bool:  # type: ignore[override]
        return any(part.needs_residual for part in self.parts())

    @property  # type: ignore[misc]
    def mergeable(self) -> bool:  # type: ignore[override]
        return all(part.mergeable for part in self.parts())

    def forward(self, h: Any, call: SiteCall) -> Any:
        for part in sorted(self.parts(), key=lambda u: u.stage):
            h = part(h, call)
        return h

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for part in self.parts():
            if part.edits_input:
                args, kwargs = part.before(args, kwargs)
        return args, kwargs

    @torch.no_grad()
    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """The members' joint change, found by merging them in turn into `base` and then restoring its
        exact values (right for multiplicative members such as (IA)³, whose delta depends on the weight
        it scales)."""
        saved = {n: p.detach().clone() for n, p in base.named_parameters()}
        try:
            for part in self.parts():
                part.merge(base)
            return {
                n: p.detach() - saved[n] for n, p in base.named_parameters() if not torch.equal(p, saved[n])
            }
        finally:
            for n, p in base.named_parameters():
                p.copy_(saved[n])

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        for part in self.parts():
            part.merge(base)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        for part in reversed(self.parts()):
            part.unmerge(base)

    def regularizer(self) -> torch.Tensor | None:
        terms = [t for t in (part.regularizer() for part in self.parts()) if t is not None]
        return torch.stack(terms).sum() if terms else None


def member_names(components: tuple[ModuleConfig, ...]) -> list[str]:
    """Each member's name: its method, or "<method>_<position>" when the method repeats."""
    methods = [c.method for c in components]
    return [m if methods.count(m) == 1 else f"{m}_{i}" for i, m in enumerate(methods, start=1)]


def member_config(value: Any, where: str) -> ModuleConfig:
    """A member config from a config object, a method name or a {"method": ..., field: ...} mapping."""
    if isinstance(value, ModuleConfig):
        return value
    if isinstance(value, str):
        return method_entry(value.strip()).config_class.from_dict({}, source=where)
    if isinstance(value, Mapping):
        fields = dict(value)
        method = fields.pop("method", None)
        if not isinstance(method, str):
            raise ConfigError(f"{where}: a member needs a 'method' name, got {dict(value)!r}")
        return method_entry(method).config_class.from_dict(fields, source=f"{where} ({method})")
    raise ConfigError(f"{where}: a member is a method name or a mapping with 'method', got {value!r}")


def _members(value: Any, where: str) -> tuple[ModuleConfig, ...]:
    """Members from a list, a JSON list, or a comma-separated string of method names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: components is not valid JSON: {e}") from None
        else:
            value = [v for v in text.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: components must be a list of members, got {value!r}")
    return tuple(member_config(v, f"{where}: components[{i}]") for i, v in enumerate(value))


@register_method("union", UnionUnit, "several methods trained and saved as one module (a union config)")
@dataclass(frozen=True)
class UnionConfig(ModuleConfig):
    """A union of method configs.

    Attributes:
        components: the member configs, in the order their units run within a stage. Default: LoRA on
            query and value plus a Pfeiffer adapter, both at their own defaults (a mergeable delta
            and an adapter: the pairing the union exists for).
    """

    components: tuple[ModuleConfig, ...] = field(default_factory=lambda: (LoraConfig(), PfeifferConfig()))

    def __post_init__(self) -> None:
        m = self.method or "union"
        check(len(self.components) > 0, m, "components", "name at least one method")
        for name, member in zip(member_names(self.components), self.components, strict=True):
            check(isinstance(member, ModuleConfig), m, "components", f"{member!r} is not a method config")
            check(
                type(member).fit is ModuleConfig.fit,
                m,
                "components",
                f"member '{name}' trains in phases of its own and cannot be part of a union",
            )

    @property  # type: ignore[misc]  # per instance: only if every member starts as the identity
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return all(c.identity_at_init for c in self.components)

    @property  # type: ignore[misc]
    def default_lr(self) -> float | None:  # type: ignore[override]
        """The smallest of the members' own default rates (the most fragile member sets the pace)."""
        rates = [c.default_lr for c in self.components if c.default_lr is not None]
        return min(rates) if rates else None

    def members(self) -> dict[str, ModuleConfig]:
        """Member name -> config."""
        return dict(zip(member_names(self.components), self.components, strict=True))

    def to_dict(self) -> dict[str, Any]:
        out = {f: v for f, v in super().to_dict().items() if f != "components"}
        out["components"] = [{"method": c.method, **c.to_dict()} for c in self.components]
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> UnionConfig:
        """As `ModuleConfig.from_dict`, plus `components` given as a list of members (configs, method
        names or mappings with "method"), a JSON list or "lora,prefix"; and "<member>.<field>" keys
        that change one member's field (e.g. "lora.r": 4)."""
        values = dict(values)
        dotted = {k: values.pop(k) for k in [k for k in values if "." in k]}
        if "components" in values:
            values["components"] = _members(values["components"], source)
        config = cast(UnionConfig, super().from_dict(values, source=source))
        if not dotted:
            return config
        members = config.members()
        for key, value in dotted.items():
            name, attr = key.split(".", 1)
            if name not in members:
                raise ConfigError(
                    f"{source}: '{key}' names no member of {config.method}; members: {', '.join(members)}"
                )
            member = members[name]
            members[name] = type(member).from_dict(
                {**member.to_dict(), attr: value}, source=f"{source} ({config.method}.{name})"
            )
        return config.replace(components=tuple(members.values()))

    def build(self, view: ModelView) -> list[Attachment]:
        """Every member's attachments, gathered per site into one `UnionUnit`.

        Raises:
            TargetError: a member attaches nowhere it should (the member's own error).
            ValueError: two members need different residual hook points at the same site.
        """
        by_path: dict[str, dict[str, Unit]] = {}
        hooks: dict[str, Any] = {}
        for name, member in self.members().items():
            for attachment in member.build(view):  # type: ignore[attr-defined]
                units = by_path.setdefault(attachment.path, {})
                key = name if name not in units else f"{name}_{len(units)}"  # a member twice at one site
                units[key] = attachment.unit
                if attachment.hook is not None:
                    known = hooks.setdefault(attachment.path, attachment.hook)
                    if known != attachment.hook:
                        raise ValueError(
                            f"{self.method}: members read the residual at {attachment.path} from two places"
                        )
        return [Attachment(path, UnionUnit(units), hooks.get(path)) for path, units in by_path.items()]
