"""Resolving what a config names (roles, module-name patterns, layers) to module paths.

`ModelView` looks at a HuggingFace model through its row in the architecture table (`archs.py`).
Targets are either *roles* (`query`, `value`, `ffn_out`, ...), which the table maps per family, or
*patterns* for any model: a module-name suffix (`q_proj` matches `layers.3.self_attn.q_proj`), a
regular expression (`re:.*attn\\.(q|v)_proj`), or `all-linear`. A target that matches nothing is an
error that lists names that do exist, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .archs import HOOK_POINT_ROLES, PROJECTION_ROLES, ArchSpec, HookPoint, InputRef, LayerGroup, arch_for


class TargetError(ValueError):
    """A target names no module, or a role the model's family does not have."""


def is_projection(module: nn.Module) -> bool:
    """nn.Linear or a GPT-2 style `Conv1D` (weight stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: `nn.LayerNorm` (and subclasses), or a class named `*LayerNorm` /
    `*RMSNorm`, as transformers names its own per family (`T5LayerNorm`, `LlamaRMSNorm`,
    `Qwen2RMSNorm`, `GemmaRMSNorm`, ...) and torch its `nn.RMSNorm`."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def projection_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a projection; Conv1D stores weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = cast(torch.Tensor, module.weight)
    return int(weight.shape[0]), int(weight.shape[1]), True


@dataclass(frozen=True)
class ResolvedHookPoint:
    """A sub-layer output in one layer, with paths relative to `base_model`."""

    path: str
    residual_path: str
    residual: InputRef
    norm_path: str | None


@dataclass(frozen=True)
class LayerRef:
    """One layer: its group, index in the group, and path relative to `base_model`."""

    group: LayerGroup
    index: int
    path: str


class ModelView:
    """Read-only view of a model for resolving targets.

    Args:
        model: any HuggingFace `PreTrainedModel` (a bare encoder or one with a task head).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_model: nn.Module = getattr(model, "base_model", model)
        self.prefix = _prefix_of(model, self.base_model)
        config = getattr(model, "config", None)
        self.model_type: str = getattr(config, "model_type", type(model).__name__)
        self.arch: ArchSpec | None = arch_for(self.model_type)
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config() if get_text_config is not None else config
        self.hidden_size: int | None = getattr(text_config, "hidden_size", None)

    def module(self, path: str) -> nn.Module:
        """The module at `path` (relative to base_model; "" is base_model itself)."""
        return self.base_model.get_submodule(path) if path else self.base_model

    def base_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of every module below base_model, as `named_modules` lists them (each once,
        in pre-order; base_model itself left out), except modfit's own: the container that
        `model.ModularModel` adds at `model.modfit` (units, adapter layers, heads) is never a target,
        and skipping its subtree keeps adding a module from costing more with every module there."""
        own = getattr(self.model, "modfit", None)
        seen = {id(self.base_model)}

        def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
            for name, child in module._modules.items():
                if child is None or child is own or id(child) in seen:
                    continue
                seen.add(id(child))
                path = f"{prefix}.{name}" if prefix else name
                yield path, child
                yield from walk(child, path)

        return walk(self.base_model, "")

    def layers(self, indices: Sequence[int] | None = None) -> list[LayerRef]:
        """The layers of every group of the family, optionally only those with these indices.

        Raises:
            TargetError: the family is unknown (name target modules instead), or an index is out
                of range for every group.
        """
        arch = self._require_arch("layer roles")
        refs: list[LayerRef] = []
        counts: list[int] = []
        for group in arch.groups:
            try:
                layer_list = self.module(group.path)
            except AttributeError:  # e.g. T5EncoderModel has the encoder group only
                continue
            count = len(layer_list)  # type: ignore[arg-type]
            counts.append(count)
            chosen = range(count) if indices is None else dict.fromkeys(indices)  # dict: drops repeats
            wanted = [i for i in chosen if 0 <= i < count]
            refs.extend(LayerRef(group, i, f"{group.path}.{i}") for i in wanted)
        # An index may be missing from one group (a shorter decoder) but must exist somewhere.
        unused = [i for i in (indices or []) if not any(0 <= i < c for c in counts)]
        if unused or not refs:
            raise TargetError(
                f"layers {unused or list(indices or [])} are out of range for this {self.model_type} model "
                f"(layer counts per group: {counts})"
            )
        return refs

    def projections(self, targets: Iterable[str], layers: Sequence[int] | None = None) -> list[str]:
        """Paths of the projections (Linear/Conv1D) that `targets` name, in model order, deduplicated.

        Raises:
            TargetError: a target matches no projection (the message suggests names that exist).
        """
        found: dict[str, None] = {}
        all_paths = [p for p, m in self.base_modules() if is_projection(m)]
        layer_prefixes = None if layers is None else tuple(ref.path + "." for ref in self.layers(layers))
        for target in targets:
            matched = self._match_projection(target, all_paths, layers)
            if layer_prefixes is not None:
                matched = [p for p in matched if p.startswith(layer_prefixes)]
            if not matched:
                raise TargetError(self._no_match_message(target, all_paths))
            for path in matched:
                found[path] = None
        order = {p: i for i, p in enumerate(all_paths)}
        return sorted(found, key=order.__getitem__)

    def norms(
        self,
        targets: Iterable[str] = ("all-norm",),
        layers: Sequence[int] | None = None,
        *,
        outside_layers: bool = False,
    ) -> list[str]:
        """Paths of the normalisation layers (`is_norm`) that `targets` name, in model order, deduplicated.

        Args:
            targets: `all-norm` (every norm inside the layer stacks; every norm of a model the table
                lacks), module-name suffixes (`LayerNorm`, `ln_1`, `input_layernorm`) or `re:<regex>`.
            layers: only norms inside these layers.
            outside_layers: also every norm outside the layer stacks, whatever `layers` says (BERT's
                embedding LayerNorm, GPT-2's `ln_f`, Llama's final `norm`, T5's `final_layer_norm`).

        Raises:
            TargetError: a target matches no norm (the message lists the norm names that exist).
        """
        all_paths = [p for p, m in self.base_modules() if is_norm(m)]
        stacks = None if self.arch is None else tuple(f"{g.path}." for g in self.arch.groups)
        chosen = stacks if layers is None else tuple(ref.path + "." for ref in self.layers(layers))
        found: dict[str, None] = {}
        for target in targets:
            if target == "all-norm":
                matched = [p for p in all_paths if chosen is None or p.startswith(chosen)]
            else:
                if target.startswith("re:"):
                    pattern = re.compile(target[3:])
                    matched = [p for p in all_paths if pattern.fullmatch(p)]
                else:
                    matched = [p for p in all_paths if p == target or p.endswith("." + target)]
                if layers is not None:
                    matched = [p for p in matched if chosen is None or p.startswith(chosen)]
            if not matched:
                names = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in all_paths})[:30]) or "none"
                raise TargetError(
                    f"target '{target}' matches no LayerNorm/RMSNorm module of this {self.model_type} model; "
                    f"use all-norm or a norm name: {names}"
                )
            found.update(dict.fromkeys(matched))
        if outside_layers and stacks is not None:
            found.update(dict.fromkeys(p for p in all_paths if not p.startswith(stacks)))
        order = {p: i for i, p in enumerate(all_paths)}
        return sorted(found, key=order.__getitem__)

    def hook_points(
        self, roles: Iterable[str], layers: Sequence[int] | None = None
    ) -> list[ResolvedHookPoint]:
        """The sub-layer outputs named by `roles` ("attn_output", "ffn_output") in every chosen layer.

        Raises:
            TargetError: an unknown role, or a family without a table row.
        """
        resolved = []
        for ref in self.layers(layers):
            for role in roles:
                if role not in HOOK_POINT_ROLES:
                    raise TargetError(f"unknown placement '{role}'; use one of {', '.join(HOOK_POINT_ROLES)}")
                point: HookPoint = getattr(ref.group.layer, role)
                resolved.append(
                    ResolvedHookPoint(
                        path=f"{ref.path}.{point.module}",
                        residual_path=_join(ref.path, point.residual.module),
                        residual=point.residual,
                        norm_path=_join(ref.path, point.norm) if point.norm else None,
                    )
                )
        return resolved

    # -- helpers -----------------------------------------------------------------------------

    def _require_arch(self, what: str) -> ArchSpec:
        if self.arch is None:
            raise TargetError(
                f"model type '{self.model_type}' is not in modfit's architecture table, so {what} are "
                "unknown; name target modules instead (e.g. targets=q_proj,v_proj or 're:<regex>')"
            )
        return self.arch

    def _match_projection(self, target: str, all_paths: list[str], layers: Sequence[int] | None) -> list[str]:
        if target in PROJECTION_ROLES:
            role_paths: list[str] = []
            for ref in self.layers(layers):
                role_paths.extend(f"{ref.path}.{p}" for p in getattr(ref.group.layer, target))
            return [p for p in role_paths if p in set(all_paths)]
        if target == "all-linear":
            if self.arch is not None:
                layer_paths = tuple(f"{g.path}." for g in self.arch.groups)
                return [p for p in all_paths if p.startswith(layer_paths)]
            return list(all_paths)
        if target.startswith("re:"):
            pattern = re.compile(target[3:])
            return [p for p in all_paths if pattern.fullmatch(p)]
        return [p for p in all_paths if p == target or p.endswith("." + target)]

    def _no_match_message(self, target: str, all_paths: list[str]) -> str:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in all_paths})
        roles = f" roles: {', '.join(PROJECTION_ROLES)};" if self.arch is not None else ""
        return (
            f"target '{target}' matches no Linear/Conv1D module of this {self.model_type} model;{roles} "
            f"module names: {', '.join(leaf_names[:30])}"
        )


def _join(base: str, rel: str) -> str:
    return f"{base}.{rel}" if rel else base


def _prefix_of(model: nn.Module, base_model: nn.Module) -> str:
    """The attribute path from `model` to `base_model` plus a dot ("" when they are the same)."""
    if base_model is model:
        return ""
    for name, child in model.named_children():
        if child is base_model:
            return name + "."
    return ""
