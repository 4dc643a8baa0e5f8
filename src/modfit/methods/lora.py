"""LoRA: a trainable low-rank change to frozen projections (Hu et al., 2021, arXiv:2106.09685).

::

    x ──> W (frozen) ──────────────(+)──> h = W x + s · B A x
    └──> dropout ──> A (r×in) ──> B (out×r) ──> ·s

`A` starts Kaiming-uniform and `B` at zero, so a new module leaves the model unchanged. The scale
is s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732). Because
the branch is linear, it merges into the weight exactly: W' = W + s · B A (transposed for GPT-2's
Conv1D, whose weight is stored as (in, out)).

Parameter count per target projection: r · (in + out); r=8 on BERT-base query and value gives
12 layers × 2 × 8 × (768 + 768) = 294,912.

`use_gating=True` (UniPELT, Mao et al. 2022, arXiv:2110.07577) scales the branch by a learned gate
read from the projection's input, one value per example as in AdapterHub `adapters`::

    g = mean over the sequence of sigmoid(w · x_t + b)      (batch, 1, 1); w: (in,), + in + 1 parameters
    h = W x + g · s · B A x

A gated branch depends on the input through g, so it no longer merges into the weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast_linear
from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, projection_shape
from .lora_shared import shared_down_projection

# Folding pays from about in·out/(in + out) tokens (equal multiply-adds); twice that leaves a margin for
# the pass over W that forming W' takes (`bench/peers.py --parts overhead --variants unfolded`).
FOLD_TOKENS = 2


def fold_tokens(in_features: int, out_features: int) -> float:
    """The number of tokens from which a LoRA call on an (in -> out) projection folds (`folding.py`)."""
    return FOLD_TOKENS * in_features * out_features / (in_features + out_features)


class LoraUnit(Unit):
    """Low-rank delta on one projection.

    Args:
        in_features, out_features: the projection's sizes.
        r: rank; alpha: scale numerator; rslora: divide by sqrt(r) instead of r.
        dropout: dropout on the branch input; fan_in_fan_out: the base weight is (in, out).
    """

    stage = 0
    mergeable = True
    averageable = True
    writes_in_place = True  # in inference, the branch is added into the projection's output itself
    folds_per_call = True  # in inference on many tokens, W + s·BA for the call (folding.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fan_in_fan_out = fan_in_fan_out

    def down_projection(self, x: torch.Tensor, call: SiteCall) -> torch.Tensor:
        """x Aᵀ (after dropout), (..., in) -> (..., r); in inference one product shared with this unit's
        siblings that read the same x (methods/lora_shared.py)."""
        if call.writable and self.siblings is not None and not self.training:
            return shared_down_projection(self, x, self.siblings)
        # F.linear, so that modfit's CPU kernels (cpu_kernels.py) take it like the base's own products
        return F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        # (..., in) @ (in, r) @ (r, out) -> (..., out); the rank-r product never forms B A
        xa = self.down_projection(call.inputs[0], call)  # (..., r)
        if h.dtype == xa.dtype and h.shape[:-1] == xa.shape[:-1]:
            # h + s · (xa @ Bᵀ) as one addmm: no separate scaled delta and sum, two fewer passes
            # over the (tokens, out) output per call; into h itself where the site allows it
            h2d, xa2d = h.reshape(-1, h.shape[-1]), xa.reshape(-1, xa.shape[-1])  # (tokens, out), (tokens, r)
            if call.writable:
                out = h2d.addmm_(xa2d, self.lora_B.t(), alpha=self.scale)
            else:
                out = torch.addmm(h2d, xa2d, self.lora_B.t(), alpha=self.scale)
            return out.view(h.shape)
        return h + ((xa @ self.lora_B.t()) * self.scale).to(h.dtype)

    def folded_weight(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """W + s·BA, (out, in), for one inference call on x where its in·out·r multiply-adds cost less
        than the branch's tokens·r·(in + out): from FOLD_TOKENS·in·out/(in + out) tokens on. Not with
        dropout running, nor into a weight of another dtype (a bfloat16 W would round the change away)."""
        weight = base.weight
        if not self._foldable_into(weight):
            return None
        out_features, in_features = weight.shape
        if x.numel() // in_features < fold_tokens(in_features, out_features):
            return None
        return fast_linear.add_product(weight, self.lora_B, self.lora_A, self.scale)  # (out, r) @ (r, in)

    def _foldable_into(self, weight: torch.Tensor) -> bool:
        """Whether this unit's change may go into `weight` for a call: no dropout running (the branch
        reads a dropped input), an (out, in) weight (not Conv1D's), of this unit's dtype and device."""
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        same = weight.dtype == self.lora_A.dtype and weight.device == self.lora_A.device
        return not dropping and not self.fan_in_fan_out and same

    def delta_weight(self) -> torch.Tensor:
        """s · B A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": self.delta_weight()}

    # -- per-example routing (`route(...)`, routing/fixed.py) --------------------------------------

    @classmethod
    def can_batch(cls, units: Sequence[LoraUnit | None]) -> bool:
        """One dropout serves all rows, so the units must agree on its rate."""
        return len({_dropout_rate(u) for u in units if u is not None}) == 1

    @classmethod
    def batched(
        cls, units: Sequence[LoraUnit | None], index: torch.Tensor, h: torch.Tensor, call: SiteCall
    ) -> torch.Tensor:
        """Row b through units[index[b]] (index M = len(units), or a None unit: no change)::

            h_b + s_i B_i A_i x_b        A_i zero-padded to (R, in), B_i to (out, R), R the largest rank

        The per-row A and B are gathered and applied with two batched products, so the cost does not
        grow with the number of distinct modules in the batch. x: (B, ..., in), h: (B, ..., out).
        """
        real = [u for u in units if u is not None]
        rank = max(u.lora_A.shape[0] for u in real)
        first = real[0]
        none_a = first.lora_A.new_zeros(rank, first.lora_A.shape[1])
        none_b = first.lora_B.new_zeros(first.lora_B.shape[0], rank)
        # (M + 1, R, in) and (M + 1, out, R); the last slot (and a child absent here) adds nothing
        a = torch.stack([_pad(u.lora_A, rank, 0) if u is not None else none_a for u in units] + [none_a])
        b = torch.stack(
            [_pad(u.lora_B * u.scale, rank, 1) if u is not None else none_b for u in units] + [none_b]
        )
        x = call.inputs[0]
        batch = x.shape[0]
        x = first.dropout(x.to(a.dtype)).reshape(batch, -1, a.shape[-1])  # (B, T, in)
        down = torch.bmm(x, a[index].transpose(1, 2))  # (B, T, R)
        delta = torch.bmm(down, b[index].transpose(1, 2))  # (B, T, out)
        return h + delta.reshape(h.shape).to(h.dtype)


def _dropout_rate(unit: LoraUnit) -> float:
    return float(unit.dropout.p) if isinstance(unit.dropout, nn.Dropout) else 0.0


def _pad(weight: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`weight` zero-padded along `dim` to `size` (the rank axis: extra rank directions add nothing)."""
    missing = size - weight.shape[dim]
    if missing == 0:
        return weight
    shape = list(weight.shape)
    shape[dim] = missing
    return torch.cat([weight, weight.new_zeros(shape)], dim=dim)


class GatedLoraUnit(LoraUnit):
    """A LoRA branch scaled per example by a learned sigmoid gate of the input (UniPELT); not mergeable."""

    mergeable = False
    writes_in_place = False  # its own forward: h + gate · branch
    folds_per_call = False  # the gate depends on the input

    def __init__(self, in_features: int, out_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, *args, **kwargs)
        self.gate = nn.Linear(in_features, 1)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        x = call.inputs[0].to(self.lora_A.dtype)  # (batch, seq, in)
        # As adapters: the mean over the sequence (padding included) of a per-token gate: (batch, 1, 1)
        gate = torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        delta = (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()
        return h + (delta * (self.scale * gate)).to(h.dtype)

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError("a gated LoRA branch depends on its input through its gate: not mergeable")


Init = Literal["kaiming", "gaussian"]


@register_method("lora", LoraUnit, "low-rank delta s·BA on chosen projections (Hu et al. 2021); mergeable")
@dataclass(frozen=True)
class LoraConfig(ModuleConfig):
    """LoRA settings.

    Attributes:
        r: rank of the update.
        alpha: scale numerator (s = alpha / r, or alpha / sqrt(r) with `rslora`).
        dropout: dropout on the LoRA branch input.
        targets: projection roles (`query`, `key`, `value`, `attn_out`, `ffn_in`, `ffn_out`),
            module-name suffixes, `re:<regex>` or `all-linear`.
        layers: only these layer indices (None: every layer).
        rslora: rank-stabilised scaling alpha / sqrt(r).
        init: "kaiming" (A Kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r), B zero).
        use_gating: scale the branch by a learned per-example gate (UniPELT); not mergeable then.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    init: Init = "kaiming"
    use_gating: bool = False

    def __post_init__(self) -> None:
        check(self.r >= 1, self.method, "r", f"must be >= 1, got {self.r}")
        allowed = get_args(Init)
        check(self.init in allowed, self.method, "init", f"unknown {self.init!r}; use {allowed}")
        check(self.alpha > 0, self.method, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, self.method, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, self.method, "targets", "name at least one projection")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `LoraUnit` per targeted projection."""
        attachments = []
        for path in view.projections(self.targets, self.layers):
            in_f, out_f, fan_in_fan_out = projection_shape(view.module(path))
            unit_class = GatedLoraUnit if self.use_gating else LoraUnit
            unit = unit_class(in_f, out_f, self.r, self.alpha, self.dropout, self.rslora, fan_in_fan_out)
            if self.init == "gaussian":
                nn.init.normal_(unit.lora_A, std=1 / self.r)
            attachments.append(Attachment(path, unit))
        return attachments
