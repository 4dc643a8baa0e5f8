"""Polytropon and multi-head routing (MHR): task-level routing over an inventory of LoRA skills.

Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level Generalisation"
(arXiv:2202.13914); the multi-head variant from Caccia et al. 2022, "Multi-Head Adapter Routing for
Cross-Task Generalization" (arXiv:2211.03831).

Every targeted projection holds S skill LoRAs, and the whole module shares one task × skill
allocation (logits ẑ, (T, S)). An example of task t runs the LoRA whose parameters are the
allocation-weighted average of the skills' (parameter-level aggregation)::

    z_t = σ((ẑ_t + log u − log(1 − u)) / τ),  u ~ U(0, 1)^S   training: relaxed Bernoulli (Gumbel-sigmoid)
    z_t = σ(ẑ_t)                                                 eval
    w_t = z_t / (Σ_s z_ts + ε)                                   (S,), weights over skills
    A^(t) = Σ_s w_ts A_s   (r, in)      B^(t) = Σ_s w_ts B_s   (out, r)
    h = W x + (α / r) · B^(t) A^(t) x

MHR cuts the skills into h heads and gives each head its own allocation (logits (T, h, S)): head k
mixes block k of A's input features and block k of B's output features (the layout of PEFT's poly
tuner), so A^(t)[:, block k] = Σ_s w_tks A_s[:, block k] and B^(t)[block k, :] = Σ_s w_tks B_s[block k, :].
With h = 1 it is Polytropon.

Shapes: A (S, r, in), B (S, out, r) per site; allocation logits (T, h, S) for the whole module, held by
the module's first unit (the others reference it, as intrinsic's shared vector), so the saved module
and `module_parameters` hold it once. Per example the task id comes from the batch's route
(`mm(**batch, task_ids=...)` or `route={"task": ...}`; names allowed, in the order of the config's
`tasks`); a module with a single task needs none. Rows whose id is -1 (None) get no delta. The mixed
A and B are formed per row, (batch, r, in) and (batch, out, r), then applied with batched products:
no loop over tasks.

The noise u is drawn once per example per forward pass, shared by every site of the module (one
sampled allocation per example, as in the paper's model), when the pass carries a route; without one
each site draws its own.

Dual-speed learning: the allocation learns faster than the skills. The stored parameter is
ẑ / `router_lr_scale`; Adam-type steps do not depend on a parameter's scale, so ẑ moves
`router_lr_scale` times faster than the skills under one learning rate, in modfit's loop, the HF
Trainer or any optimizer of the Adam family (diff pruning's gates use the same device).

Few-shot adaptation to new tasks: `adapt(mm, source, name, tasks)` adds a module with a copy of the
source's skills and a fresh allocation row per new task. With `train_skills=False` (the default there)
the copied skills are buffers, so training that module trains its allocation rows only (and its head,
if it has one; `mm.activate(name, head=source)` keeps the source's head instead, frozen).
`add_task(mm, name, task)` appends a row to an existing module.

Parameter count per targeted projection: S · r · (in + out); plus T · h · S for the allocation. S = 4,
r = 8 on MiniLM's query and value (6 layers, 384 → 384): 4 · 8 · 768 · 12 = 294,912, plus 4 · T.

Skills of other methods: `skill=` names any averageable method's config (ia3 on projection outputs,
bitfit, ln, dora, lora through the generic path), whose S instances are averaged per task the same
way, θ^(t) = Σ_s w_ts θ_s (`methods/poly_skills.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..config import ConfigError, ModuleConfig, check
from ..model import ModularModel
from ..registry import register_method
from ..routing.context import RouteError, current_route, route_ids
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError, projection_shape
from .poly_skills import PolySkillsUnit, build_skills
from .union import member_config

EPS = 1e-12  # keeps w finite when every z of a row underflows to 0
_INIT = 1e-3  # new allocation logits start in U(-1e-3, 1e-3): every skill equally likely


class PolyRouter(nn.Module):
    """The module's task × skill allocation: logits (T, h, S), stored divided by `lr_scale`.

    Args:
        tasks: task names in id order (empty: one unnamed task).
        n_skills, n_splits: S and h.
        temperature: τ of the relaxed Bernoulli used in training.
        lr_scale: ẑ = lr_scale · raw_logits (dual-speed learning, see the module docstring).
    """

    def __init__(
        self, tasks: tuple[str, ...], n_skills: int, n_splits: int, temperature: float, lr_scale: float
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.temperature, self.lr_scale = temperature, lr_scale
        rows = max(len(tasks), 1)
        self.raw_logits = nn.Parameter(self._fresh(rows, n_splits, n_skills))  # (T, h, S)
        self._noise: tuple[object, torch.Tensor] | None = None  # (route of the pass, logistic noise)

    def _fresh(self, rows: int, heads: int, skills: int) -> torch.Tensor:
        return torch.empty(rows, heads, skills).uniform_(-_INIT, _INIT) / self.lr_scale

    @property
    def n_tasks(self) -> int:
        return int(self.raw_logits.shape[0])

    @property
    def logits(self) -> torch.Tensor:
        """ẑ: (T, h, S)."""
        return self.raw_logits * self.lr_scale

    def task_ids(self, rows: int, device: torch.device) -> torch.Tensor:
        """(rows,) task ids of the running pass; -1: no task (no delta).

        Raises:
            RouteError: several tasks and no 'task' route, or an id outside [-1, T).
        """
        names = self.tasks or None
        try:
            ids = route_ids("task", rows, names, device=device, required=self.n_tasks > 1)
        except RouteError as e:
            known = ", ".join(self.tasks) if self.tasks else f"{self.n_tasks} unnamed"
            raise RouteError(
                f"poly (tasks: {known}): {e}; pass task_ids=... or route={{'task': ...}}"
            ) from None
        if ids is None:
            return torch.zeros(rows, dtype=torch.long, device=device)
        bad = (ids < -1) | (ids >= self.n_tasks)
        if bool(bad.any()):
            raise RouteError(
                f"poly: route 'task' id {int(ids[bad][0])} is out of range; valid ids are "
                f"0..{self.n_tasks - 1} (tasks: {', '.join(self.tasks) or 'one unnamed'}) or -1 for no module"
            )
        return ids

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """w: (batch, h, S), each row's skill weights (training: sampled; eval: σ); zero rows for id -1."""
        logits = self.logits[ids.clamp(min=0)]  # (b, h, S)
        if self.training:
            z = torch.sigmoid((logits + self._logistic_noise(logits)) / self.temperature)
        else:
            z = torch.sigmoid(logits)
        w = z / (z.sum(-1, keepdim=True) + EPS)
        return w * (ids >= 0).to(w.dtype)[:, None, None]

    def _logistic_noise(self, like: torch.Tensor) -> torch.Tensor:
        """log u − log(1 − u), u ~ U(0, 1): drawn once per pass (keyed by the route object of the pass,
        so every site sees the same sample), or per call when the pass has no route."""
        route = current_route()
        cached = self._noise
        if route is not None and cached is not None and cached[0] is route and cached[1].shape == like.shape:
            return cached[1].to(like.device)
        u = torch.rand(like.shape, device=like.device, dtype=like.dtype).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        # A strong reference to the route: its id cannot be reused by a later pass while cached.
        self._noise = (route, noise) if route is not None else None
        return noise

    @torch.no_grad()
    def grow(self, task: str) -> int:
        """Append a fresh allocation row for `task`; returns its id."""
        old = self.raw_logits
        row = self._fresh(1, old.shape[1], old.shape[2]).to(device=old.device, dtype=old.dtype)
        self.raw_logits = nn.Parameter(torch.cat([old.detach(), row]), requires_grad=old.requires_grad)
        self.tasks = (*self.tasks, task)
        return self.n_tasks - 1

    def extra_repr(self) -> str:
        t, h, s = self.raw_logits.shape
        return f"tasks={t}, heads={h}, skills={s}, temperature={self.temperature}, lr_scale={self.lr_scale}"


class PolyUnit(Unit):
    """S skill LoRAs on one projection, mixed per example by the module's shared allocation.

    Args:
        in_features, out_features: the projection's sizes.
        r, alpha: each skill's rank and the scale numerator (s = alpha / r).
        n_skills, n_splits: S and the number of MHR heads h (dividing in and out).
        router: the module's `PolyRouter`; owned (registered) by the first unit only.
        own_router: whether this unit registers the router (and saves it).
        train_skills: skills as parameters; False: as buffers (fixed; few-shot adaptation).
        dropout: dropout on the branch input.
    """

    stage = 0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        n_skills: int,
        n_splits: int,
        router: PolyRouter,
        own_router: bool,
        train_skills: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.n_skills, self.n_splits = r, n_skills, n_splits
        self.scale = alpha / r
        a = torch.empty(n_skills, r, in_features)  # (S, r, in)
        for skill in a:
            nn.init.kaiming_uniform_(skill, a=math.sqrt(5))  # each skill as LoRA's A
        b = torch.zeros(n_skills, out_features, r)  # (S, out, r): a new module is the identity
        if train_skills:
            self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        else:
            self.register_buffer("lora_A", a)
            self.register_buffer("lora_B", b)
        if own_router:
            self.router = router
        else:
            self.__dict__["_router"] = router  # a plain reference: not a child, not in state_dict
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shared_router(self) -> PolyRouter:
        """The module's allocation (held by its first unit)."""
        shared = self.__dict__.get("_router")
        return cast(PolyRouter, shared if shared is not None else self.router)

    def mixed(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row LoRA factors from skill weights w (b, h, S): A (b, r, in), B (b, out, r)."""
        s, h, r = self.n_skills, self.n_splits, self.r
        a = cast(torch.Tensor, self.lora_A).view(s, r, h, self.in_features // h)  # head k: input block k
        b = cast(torch.Tensor, self.lora_B).view(s, h, self.out_features // h, r)  # head k: output block k
        w = w.to(a.dtype)
        mixed_a = torch.einsum("bks,srki->brki", w, a).reshape(-1, r, self.in_features)
        mixed_b = torch.einsum("bks,skor->bkor", w, b).reshape(-1, self.out_features, r)
        return mixed_a, mixed_b

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        x = call.inputs[0]  # (b, ..., in)
        router = self.shared_router
        w = router.weights(router.task_ids(x.shape[0], x.device))  # (b, h, S)
        a, b = self.mixed(w)  # (b, r, in), (b, out, r)
        flat = self.dropout(x.to(a.dtype)).reshape(x.shape[0], -1, self.in_features)  # (b, t, in)
        low = torch.einsum("bti,bri->btr", flat, a)  # (b, t, r): the rank-r product never forms B A
        delta = torch.einsum("btr,bor->bto", low, b).reshape(*x.shape[:-1], self.out_features)
        return h + (delta * self.scale).to(h.dtype)

    @torch.no_grad()
    def allocation(self) -> tuple[torch.Tensor, tuple[str, ...]]:
        """σ(ẑ), (T, h, S), and the task names: what `modfit routing-plot` draws."""
        shared = self.shared_router
        return torch.sigmoid(shared.logits.detach().float()).cpu(), shared.tasks

    def extra_repr(self) -> str:
        owner = ", holds the allocation" if "_router" not in self.__dict__ else ""
        fixed = "" if isinstance(self.lora_A, nn.Parameter) else ", fixed skills"
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, skills={self.n_skills}, "
            f"heads={self.n_splits}{fixed}{owner}"
        )


@register_method(
    "poly",
    PolyUnit,
    "Polytropon / MHR: S skill LoRAs mixed per task by a learned Gumbel-sigmoid allocation (Ponti 2023)",
)
@dataclass(frozen=True)
class PolyConfig(ModuleConfig):
    """Polytropon (MHR with n_splits > 1) settings.

    Attributes:
        tasks: task names in id order (the route's "task" ids index them); empty: a single unnamed
            task, which needs no route. `modfit train` fills them from the data's tasks.
        n_skills: S, the skill LoRAs per projection.
        n_splits: MHR heads h; 1 is Polytropon. Must divide the projections' in and out features.
        r, alpha: each skill's rank and scale numerator (s = alpha / r).
        dropout: dropout on the branch input.
        targets: projection roles, module-name suffixes, `re:<regex>` or `all-linear`.
        layers: only these layer indices (None: every layer).
        temperature: τ of the relaxed Bernoulli in training.
        router_lr_scale: the allocation learns this many times faster than the skills.
        train_skills: False keeps the skills fixed (buffers): training then moves the allocation only.
        skill: None (the default): the skills are LoRAs with `r`, `alpha`, `dropout`, `targets` and
            `layers`, run by a per-row batched kernel. Otherwise the config of any averageable method
            (a method name, a {"method": ..., field: ...} mapping or its JSON; e.g. ia3 on key and
            value, bitfit, ln), whose S instances are averaged per task (`methods/poly_skills.py`);
            its own fields say where it attaches, and MHR heads are not available.
    """

    tasks: tuple[str, ...] = ()
    n_skills: int = 4
    n_splits: int = 1
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    temperature: float = 1.0
    router_lr_scale: float = 10.0
    train_skills: bool = True
    skill: ModuleConfig | None = None

    def __post_init__(self) -> None:
        m = self.method
        if self.skill is not None:
            check(isinstance(self.skill, ModuleConfig), m, "skill", f"{self.skill!r} is not a method config")
            check(self.skill.method != m, m, "skill", "a poly module's skills cannot be poly modules")
            check(
                self.n_splits == 1, m, "n_splits", "MHR heads split LoRA's A and B: use them with LoRA skills"
            )
        check(self.n_skills >= 1, m, "n_skills", f"must be >= 1, got {self.n_skills}")
        check(self.n_splits >= 1, m, "n_splits", f"must be >= 1, got {self.n_splits}")
        check(self.r >= 1, m, "r", f"must be >= 1, got {self.r}")
        check(self.alpha > 0, m, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, m, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, m, "targets", "name at least one projection")
        check(self.temperature > 0, m, "temperature", f"must be > 0, got {self.temperature}")
        check(self.router_lr_scale > 0, m, "router_lr_scale", f"must be > 0, got {self.router_lr_scale}")
        check(all(t.strip() for t in self.tasks), m, "tasks", f"empty task name in {list(self.tasks)}")
        dupes = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        check(not dupes, m, "tasks", f"duplicate task names {dupes}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.skill is not None:
            out["skill"] = {"method": self.skill.method, **self.skill.to_dict()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> PolyConfig:
        """As `ModuleConfig.from_dict`, plus `skill` given as a config, a method name, a mapping with
        "method", or that mapping's JSON text (`--param skill='{"method": "ia3", "targets": "key"}'`)."""
        values = dict(values)
        skill = values.pop("skill", None)
        if isinstance(skill, str) and skill.strip().lower() in ("", "none", "null", "lora"):
            skill = None
        if isinstance(skill, str) and skill.strip().startswith("{"):
            try:
                skill = json.loads(skill)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: poly.skill is not valid JSON: {e}") from None
        config = cast(PolyConfig, super().from_dict(values, source=source))
        if skill is None:
            return config
        return config.replace(skill=member_config(skill, f"{source}: poly.skill"))

    def build(self, view: ModelView) -> list[Attachment]:
        """One `PolyUnit` per targeted projection (or, with another `skill` method, one
        `PolySkillsUnit` per site of that method); the first holds the shared allocation."""
        router = PolyRouter(self.tasks, self.n_skills, self.n_splits, self.temperature, self.router_lr_scale)
        if self.skill is not None:
            return build_skills(self.skill, view, self.n_skills, router, self.train_skills, self.method)
        attachments = []
        for i, path in enumerate(view.projections(self.targets, self.layers)):
            in_f, out_f, _ = projection_shape(view.module(path))
            if in_f % self.n_splits or out_f % self.n_splits:
                raise TargetError(
                    f"{self.method}.n_splits: {self.n_splits} heads do not divide {path} ({in_f} -> {out_f})"
                )
            unit = PolyUnit(
                in_f,
                out_f,
                self.r,
                self.alpha,
                self.n_skills,
                self.n_splits,
                router,
                own_router=i == 0,
                train_skills=self.train_skills,
                dropout=self.dropout,
            )
            attachments.append(Attachment(path, unit))
        return attachments


# -- working with a poly module on a model -------------------------------------------------------


def _poly_units(mm: ModularModel, name: str) -> list[tuple[str, PolyUnit | PolySkillsUnit]]:
    record = mm._record(name)
    if record.config.method != "poly":
        raise ConfigError(f"module '{name}' is a {record.config.method} module, not poly")
    return [(path, cast("PolyUnit | PolySkillsUnit", unit)) for path, unit in mm.units(name)]


def router(mm: ModularModel, name: str) -> PolyRouter:
    """The allocation of poly module `name`.

    Raises:
        KeyError: no such module; ConfigError: it is not a poly module.
    """
    return _poly_units(mm, name)[0][1].shared_router


def allocation(mm: ModularModel, name: str) -> torch.Tensor:
    """σ(ẑ) of poly module `name`: (T, h, S), on the CPU (what `modfit routing-plot` draws)."""
    return _poly_units(mm, name)[0][1].allocation()[0]


def add_task(mm: ModularModel, name: str, task: str) -> int:
    """Append an allocation row for a new task to poly module `name`; returns the new task's id.

    Call it before building an optimizer: the allocation becomes a new, larger parameter. The
    module's config (saved on its card) lists the new task.

    Raises:
        ConfigError: the module's tasks are unnamed, or `task` is already one of them.
    """
    shared = router(mm, name)
    record = mm._record(name)
    config = cast(PolyConfig, record.config)
    if not config.tasks:
        raise ConfigError(f"poly module '{name}' has one unnamed task; name its tasks to add more")
    if task in config.tasks:
        raise ConfigError(f"poly module '{name}' already has a task '{task}'")
    record.config = config.replace(tasks=(*config.tasks, task))
    return shared.grow(task)


@torch.no_grad()
def adapt(
    mm: ModularModel,
    source: str,
    name: str,
    tasks: tuple[str, ...] | list[str],
    *,
    train_skills: bool = False,
    copy_head: bool = True,
) -> str:
    """Add poly module `name` for new `tasks`, with a copy of module `source`'s skills and a fresh
    allocation row per task (few-shot adaptation).

    Args:
        mm: the model holding `source`.
        source: a trained poly module.
        name: the new module's name.
        tasks: the new tasks (the new module's task ids index them).
        train_skills: False: the copied skills are fixed (buffers) and training `name` moves its
            allocation only; True: they are parameters and train too.
        copy_head: give `name` a copy of `source`'s head (trained with it); False: no head
            (use `mm.activate(name, head=source)` to run the source's head, frozen).

    Returns:
        `name`.

    Raises:
        KeyError: no module `source`; ConfigError: it is not a poly module, or no tasks given.
    """
    units = dict(_poly_units(mm, source))
    record = mm._record(source)
    if not tasks:
        raise ConfigError(f"adapt: name at least one new task for '{name}'")
    config = cast(PolyConfig, record.config).replace(tasks=tuple(tasks), train_skills=train_skills)
    head = record.head if copy_head else None
    mm.add(name, config, head, task=record.card.get("task"), language=record.card.get("language"))
    for path, unit in mm.units(name):
        src = units[path]
        if isinstance(unit, PolySkillsUnit):
            unit.copy_skills(cast(PolySkillsUnit, src))
            continue
        cast(torch.Tensor, unit.lora_A).copy_(cast(torch.Tensor, src.lora_A))
        cast(torch.Tensor, unit.lora_B).copy_(cast(torch.Tensor, src.lora_B))
    source_head, new_head = mm.head_module(source), mm.head_module(name)
    if source_head is not None and new_head is not None:
        new_head.load_state_dict(source_head.state_dict())
    return name
