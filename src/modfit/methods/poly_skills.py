"""Polytropon over skills of any averageable method: the generic form of `poly`'s skill inventory.

`modfit.config("poly", skill={"method": "ia3", "targets": ["key", "value"]}, n_skills=4, tasks=...)`
builds S instances of the skill method at every site it attaches to; an example of task t runs one
instance whose parameters are the allocation-weighted average of the S instances' (parameter-level
aggregation, as for LoRA skills)::

    θ^(t) = Σ_s w_ts θ_s        w_t: (S,), the allocation row of task t (see `methods/poly.py`)
    h' = unit(h; θ^(t))          the skill method's own forward, through `torch.func.functional_call`

A skill method qualifies when every unit it builds says `averageable` (its function depends on its
own parameters only, no input edits, no parameters shared with other units, no virtual tokens):
LoRA, DoRA, BitFit, LN tuning, (IA)³ on projection outputs. Anything else is refused naming the
unit and the site. MHR heads (`n_splits > 1`) cut LoRA's A and B into blocks and are LoRA-only.

Rows are grouped by task: one call of the skill's forward per distinct task in the batch (tasks
per batch are few; LoRA skills keep `PolyUnit`'s per-row batched kernel). So the relaxed-Bernoulli
sample of training is drawn per task per pass, shared by that task's rows, rather than per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.func import functional_call

from ..config import ConfigError, ModuleConfig
from ..routing.context import current_route, routed
from ..routing.fixed import _select_call, _select_route
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView

if TYPE_CHECKING:
    from .poly import PolyRouter


def _get(module: nn.Module, dotted: str) -> torch.Tensor:
    return cast(torch.Tensor, reduce(getattr, dotted.split("."), module))


def _to_buffers(module: nn.Module) -> None:
    """Turn every parameter of `module` into a buffer of the same name (fixed skills: still saved,
    still averaged, never trained)."""
    for dotted, param in list(module.named_parameters()):
        owner_path, _, leaf = dotted.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        delattr(owner, leaf)
        owner.register_buffer(leaf, param.detach().clone())


class PolySkillsUnit(Unit):
    """S instances of a skill method's unit at one site, mixed per task by the module's allocation.

    Args:
        skills: the S instances, identically built (one per skill).
        router: the module's `PolyRouter`; registered (saved) by the first unit only.
        own_router: whether this unit registers the router.
        train_skills: False turns the skills' parameters into buffers (few-shot adaptation).
    """

    stage = 0

    def __init__(
        self, skills: Sequence[Unit], router: PolyRouter, own_router: bool, train_skills: bool = True
    ) -> None:
        super().__init__()
        # The names the allocation averages: every parameter of a skill (buffers, e.g. a norm's
        # epsilon-free shape data, stay the first skill's; `build_skills` checked they agree).
        self.mixed_names = tuple(name for name, _ in skills[0].named_parameters())
        self.skills = nn.ModuleList(skills)
        if not train_skills:
            for skill in self.skills:
                _to_buffers(skill)
        if own_router:
            self.router = router
        else:
            self.__dict__["_router"] = router  # a plain reference: not a child, not in state_dict

    @property
    def shared_router(self) -> PolyRouter:
        """The module's allocation (held by its first unit)."""
        shared = self.__dict__.get("_router")
        return cast("PolyRouter", shared if shared is not None else self.router)

    def mixed(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The averaged parameters for skill weights w (S,): name -> Σ_s w_s θ_s."""
        out = {}
        for name in self.mixed_names:
            stacked = torch.stack([_get(skill, name) for skill in self.skills])  # (S, *shape)
            out[name] = torch.einsum("s,s...->...", w.to(stacked.dtype), stacked)
        return out

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        router = self.shared_router
        batch = h.shape[0]
        ids = router.task_ids(batch, h.device)  # (b,)
        tasks = torch.unique(ids)
        tasks = tasks[tasks >= 0]  # -1: no module for that row
        if tasks.numel() == 0:
            return h
        w = router.weights(tasks)[:, 0, :]  # (P, S): one sample per task present (h = 1 head)
        template = self.skills[0]
        route = current_route()
        if tasks.numel() == 1 and bool((ids == tasks[0]).all()):
            return cast(torch.Tensor, functional_call(template, self.mixed(w[0]), (h, call)))
        out = h.clone()
        for p, task in enumerate(tasks.tolist()):
            rows = (ids == task).nonzero().squeeze(1)
            with routed(_select_route(route, rows, batch)):
                y = functional_call(
                    template, self.mixed(w[p]), (h.index_select(0, rows), _select_call(call, rows, batch))
                )
            out.index_copy_(0, rows, y.to(out.dtype))
        return out

    @torch.no_grad()
    def copy_skills(self, source: PolySkillsUnit) -> None:
        """Take `source`'s skill values (parameters or buffers, by name)."""
        for mine, theirs in zip(self.skills, source.skills, strict=True):
            for name, tensor in [*mine.named_parameters(), *mine.named_buffers()]:
                tensor.copy_(_get(theirs, name))

    @torch.no_grad()
    def allocation(self) -> tuple[torch.Tensor, tuple[str, ...]]:
        """σ(ẑ), (T, h, S), and the task names: what `modfit routing-plot` draws."""
        shared = self.shared_router
        return torch.sigmoid(shared.logits.detach().float()).cpu(), shared.tasks

    def extra_repr(self) -> str:
        owner = ", holds the allocation" if "_router" not in self.__dict__ else ""
        return f"skill={type(self.skills[0]).__name__}, skills={len(self.skills)}{owner}"


def build_skills(
    skill: ModuleConfig,
    view: ModelView,
    n_skills: int,
    router: PolyRouter,
    train_skills: bool,
    where: str,
) -> list[Attachment]:
    """One `PolySkillsUnit` per site of `skill`, each holding `n_skills` instances of its unit.

    Raises:
        ConfigError: a unit of the skill method cannot be averaged, or the instances differ in
            structure (a method that draws its layout at random).
    """
    # S lists of attachments, same sites (every registered config has build; ModuleConfig declares none)
    instances = [skill.build(view) for _ in range(n_skills)]  # type: ignore[attr-defined]
    attachments = []
    for i, per_skill in enumerate(zip(*instances, strict=True)):
        first = per_skill[0]
        for attachment in per_skill:
            unit = attachment.unit
            if not getattr(unit, "averageable", False):
                raise ConfigError(
                    f"{where}: skill method '{skill.method}' puts a {type(unit).__name__} at "
                    f"{attachment.path}, which cannot be averaged by an allocation (it edits inputs, shares "
                    "parameters across sites or changes the whole pass); use lora, dora, bitfit, ln or ia3 "
                    "on projection outputs"
                )
            if attachment.path != first.path:
                raise ConfigError(f"{where}: skill instances attach at different sites")
            if _structure(unit) != _structure(first.unit):
                raise ConfigError(
                    f"{where}: skill method '{skill.method}' builds differently shaped units at "
                    f"{first.path}; the skills of one site must have the same parameters and buffers"
                )
        units = [a.unit for a in per_skill]
        combined = PolySkillsUnit(units, router, own_router=i == 0, train_skills=train_skills)
        attachments.append(Attachment(first.path, combined, first.hook))
    if not attachments:
        raise ConfigError(f"{where}: skill method '{skill.method}' attaches nowhere on this model")
    return attachments


def _structure(unit: nn.Module) -> list[tuple[str, tuple[int, ...], object]]:
    """Parameter shapes, and buffer values (they must agree: they are not averaged)."""
    out: list[tuple[str, tuple[int, ...], object]] = [
        (n, tuple(p.shape), None) for n, p in unit.named_parameters()
    ]
    out += [(n, tuple(b.shape), tuple(b.flatten().tolist())) for n, b in unit.named_buffers()]
    return out
