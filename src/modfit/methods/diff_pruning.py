"""Diff pruning: a dense diff with per-entry hard-concrete gates (Guo et al. 2021, arXiv:2012.07463).

::

    W' = W + z ⊙ w                       w: (out, in) like W, zero at the start (an exact identity)
    z  = min(1, max(0, s (ζ − γ) + γ))   s = σ((log u − log(1 − u) + log α) / β),  u ~ U(0, 1)
    loss += λ · Σ E[z ≠ 0] = λ · Σ σ(log α − β log(−γ / ζ))

The gates are the hard-concrete relaxation of L0 (Louizos et al. 2018, arXiv:1712.01312)
with temperature β = 2/3 and stretch (γ, ζ) = (−0.1, 1.1); one log α per entry, starting at 5 (the
reference code's `alpha_init`: the gates start open). In training z is sampled afresh at every
forward; in eval mode it is deterministic, z = min(1, max(0, σ(log α)(ζ − γ) + γ)), and that is
also what `merge` folds into W. The penalty reaches the loss through the units' `regularizer()`
(`ModularModel.forward` adds it in training mode; see `Unit.regularizer`).

Gate learning rate: the reference code trains log α with its own AdamW at lr 0.1 while w uses
1e-5. modfit's loop has one learning rate, so log α is stored divided by `gate_lr_scale` (the
Parameter `gate`, log α = gate_lr_scale · gate): Adam's steps are scale-free, so log α then moves
`gate_lr_scale` times faster than with the plain parameter, under any optimizer of the Adam family
(the default 1000 at lr 1e-4 gives log α the reference's 0.1).
Weight decay (off by default) would pull the gates towards log α = 0, half open: leave it off.

Memory: like full fine-tuning of the targeted weights, twice over (w and log α, each with AdamW
moments), plus one sampled gate per entry in the forward.

Saving: after training (`train()` does it, `DiffPruningConfig.fit`; with the HF Trainer call
`finalize(mm, name)`), the module keeps only the entries whose deterministic gate is non-zero, as
indices + values (z ⊙ w): the storage of sft's `SparseDiffUnit`, whose sparse mode this unit
inherits. The config then records the entries per weight (`sizes`), so the file is proportional to
the entries kept and loads as the same sparse module. `target_density` keeps only the top entries
by |z ⊙ w| (the paper's projection by magnitude to a target sparsity). Training a finalized module
trains the kept values (the paper's fixed-mask stage). `modfit.methods.sft.sparse_diff` and
`sum_modules` read it. In a short run the gates barely close (log α starts at 5 and moves about
gate_lr_scale × lr a step): use `target_density` there, as the paper does after its long runs.

Parameter count while training: 2 per targeted entry (w and log α); after finalize: the kept entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from torch import nn

from ..config import ModuleConfig, check
from ..model import ModularModel
from ..registry import register_method
from ..sites import Attachment
from ..targets import ModelView, projection_shape
from .sft import SparseDiffUnit, ordered_units, top_k, weight_of

if TYPE_CHECKING:
    from ..train import TrainResult

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # Louizos et al.'s temperature and stretch


# -- the hard-concrete gate (pure functions) -------------------------------------------------------


def hard_concrete(
    log_alpha: torch.Tensor,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sample of the stretched, clamped concrete gate z ∈ [0, 1] (differentiable in log α).

    Args:
        u: the uniform noise (default: drawn now), of log_alpha's shape.
    """
    if u is None:
        u = torch.rand_like(log_alpha)
    u = u.clamp(1e-6, 1 - 1e-6)  # log(0) guard
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The test-time gate: min(1, max(0, σ(log α)(ζ − γ) + γ))."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(
    log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> torch.Tensor:
    """P(z ≠ 0) per gate: σ(log α − β log(−γ / ζ)); its sum is the expected number of open gates."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


# -- the unit ----------------------------------------------------------------------------------


class DiffPruningUnit(SparseDiffUnit):
    """z ⊙ w on one projection weight while training; then, finalized, a sparse diff (sft's storage).

    Args:
        shape: the base weight's shape; fan_in_fan_out: it is stored (in, out) (Conv1D).
        l0_lambda: λ; init_log_alpha: log α at the start; gate_lr_scale: log α = scale · gate.
        beta, gamma, zeta: the hard-concrete temperature and stretch.
        size: build the finalized, sparse form with this many entries (None: the training form).
        device: where to create w and the gates (the base weight's device).
    """

    dense_names = ("w", "gate")

    w: nn.Parameter | None
    gate: nn.Parameter | None

    def __init__(
        self,
        shape: tuple[int, ...],
        fan_in_fan_out: bool,
        *,
        l0_lambda: float,
        init_log_alpha: float,
        gate_lr_scale: float,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
        size: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(shape, fan_in_fan_out, size or 0)
        self.l0_lambda, self.gate_lr_scale = l0_lambda, gate_lr_scale
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        if size is None:  # the training form: w and the gates, no sparse entries yet
            # made where the base weight lives: no host copy of two weight-sized tensors (nothing on meta)
            self.w = nn.Parameter(torch.zeros(shape, device=device))
            self.gate = nn.Parameter(torch.full(shape, init_log_alpha / gate_lr_scale, device=device))
            self.values = None
            self.indices = None
        else:
            self.register_parameter("w", None)
            self.register_parameter("gate", None)

    @property
    def log_alpha(self) -> torch.Tensor:
        assert self.gate is not None, "a finalized diff-pruning unit has no gates"
        return self.gate * self.gate_lr_scale

    def gates(self) -> torch.Tensor:
        """z: sampled in training mode, deterministic in eval mode."""
        if self.training:
            return hard_concrete(self.log_alpha, self.beta, self.gamma, self.zeta)
        return deterministic_gate(self.log_alpha, self.gamma, self.zeta)

    def dense_part(self) -> torch.Tensor:
        assert self.w is not None
        return self.gates() * self.w  # (out, in), sampled gates while training

    def dense_delta(self) -> torch.Tensor:
        """ΔW with the deterministic gate (what merging and saving use, in any mode)."""
        if self.values is not None or self.w is None:
            return super().dense_delta()
        return deterministic_gate(self.log_alpha, self.gamma, self.zeta) * self.w

    def regularizer(self) -> torch.Tensor | None:
        """λ · E[number of open gates] of this weight (None once finalized)."""
        if self.gate is None:
            return None
        return self.l0_lambda * expected_l0(self.log_alpha, self.beta, self.gamma, self.zeta).sum()


def finalize(mm: ModularModel, name: str, density: float | None = None) -> None:
    """Keep the entries of diff-pruning module `name` whose deterministic gate is open, as a sparse
    diff (indices + z ⊙ w values); the gates and w are dropped and the config records the sizes.

    Args:
        density: keep instead exactly this fraction of the targeted entries, the largest |z ⊙ w|.

    Raises:
        ValueError: the module is already finalized, or is not a diff-pruning module.
    """
    units = [unit for _, unit in ordered_units(mm, name)]
    record = mm.records[name]
    config = record.config
    if not all(isinstance(u, DiffPruningUnit) and u.gate is not None for u in units):
        raise ValueError(f"module '{name}' is not a diff-pruning module in its training form")
    gated = cast(list[DiffPruningUnit], units)
    with torch.no_grad():
        deltas = [unit.dense_delta().detach() for unit in gated]  # (out, in) each, z ⊙ w
        if density is None:  # every open gate
            opened = [deterministic_gate(u.log_alpha, u.gamma, u.zeta) > 0 for u in gated]
            picks = [o.reshape(-1).nonzero().reshape(-1) for o in opened]
        else:
            total = sum(d.numel() for d in deltas)
            picks = top_k([d.abs() for d in deltas], max(1, int(density * total)))
        for unit, delta, chosen in zip(gated, deltas, picks, strict=True):
            unit.sparsify(chosen, delta.reshape(-1)[chosen])
    record.config = config.replace(sizes=tuple(p.numel() for p in picks))


@register_method(
    "diff_pruning",
    DiffPruningUnit,
    "diff pruning: a dense diff with hard-concrete L0 gates, saved sparse (Guo et al. 2021); mergeable",
)
@dataclass(frozen=True)
class DiffPruningConfig(ModuleConfig):
    """Diff pruning settings.

    Attributes:
        targets: projection roles, module-name suffixes, `re:<regex>` or `all-linear` (the default).
        layers: only these layer indices (None: every layer).
        l0_lambda: λ, the weight of the expected number of open gates in the loss (the paper's 1.25e-7).
        init_log_alpha: log α at the start (5: gates open).
        gate_lr_scale: log α moves this many times faster than a plain parameter (see the module doc).
        beta, gamma, zeta: hard-concrete temperature and stretch.
        target_density: after training keep this fraction of the entries, the largest |z ⊙ w|
            (None: every entry with an open gate).
        sizes: entries per targeted weight after `finalize`, in model order (users leave it None).
    """

    targets: tuple[str, ...] = ("all-linear",)
    layers: tuple[int, ...] | None = None
    l0_lambda: float = 1.25e-7
    init_log_alpha: float = 5.0
    gate_lr_scale: float = 1000.0
    beta: float = BETA
    gamma: float = GAMMA
    zeta: float = ZETA
    target_density: float | None = None
    sizes: tuple[int, ...] | None = None

    default_lr: ClassVar[float | None] = 1e-4  # w is a full fine-tuning delta: full fine-tuning's rates

    def __post_init__(self) -> None:
        m = "diff_pruning"
        check(len(self.targets) > 0, m, "targets", "name at least one projection")
        check(self.l0_lambda >= 0, m, "l0_lambda", f"must be >= 0, got {self.l0_lambda}")
        check(self.gate_lr_scale > 0, m, "gate_lr_scale", f"must be > 0, got {self.gate_lr_scale}")
        check(self.beta > 0, m, "beta", f"must be > 0, got {self.beta}")
        check(self.gamma < 0, m, "gamma", f"must be < 0 (the stretch below 0), got {self.gamma}")
        check(self.zeta > 1, m, "zeta", f"must be > 1 (the stretch above 1), got {self.zeta}")
        check(
            self.target_density is None or 0 < self.target_density <= 1,
            m,
            "target_density",
            f"must be in (0, 1] or None, got {self.target_density}",
        )
        check(self.sizes is None or min(self.sizes, default=0) >= 0, m, "sizes", "counts must be >= 0")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `DiffPruningUnit` per targeted projection (sparse when `sizes` is set)."""
        paths = view.projections(self.targets, self.layers)
        sizes: list[int | None] = [None] * len(paths) if self.sizes is None else list(self.sizes)
        check(
            len(sizes) == len(paths),
            "diff_pruning",
            "sizes",
            f"{len(sizes)} counts for the {len(paths)} weights the targets name on this model",
        )
        attachments = []
        for path, size in zip(paths, sizes, strict=True):
            module = view.module(path)
            weight = weight_of(module)
            unit = DiffPruningUnit(
                tuple(weight.shape),
                projection_shape(module)[2],
                l0_lambda=self.l0_lambda,
                init_log_alpha=self.init_log_alpha,
                gate_lr_scale=self.gate_lr_scale,
                beta=self.beta,
                gamma=self.gamma,
                zeta=self.zeta,
                size=size,
                device=weight.device,
            )
            attachments.append(Attachment(path, unit))
        return attachments

    def fit(self, mm: ModularModel, name: str, run: Callable[..., TrainResult]) -> None:
        """Train with the gates, then `finalize` (unless stopped early or already finalized)."""
        result = run()
        if self.sizes is None and result.step == result.total_steps:
            finalize(mm, name, self.target_density)
