"""Bottleneck adapters: small MLPs inserted at sub-layer outputs (function composition).

Sequential (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247)::

    h (sub-layer output, before the residual add)
    └─> [base LN(h + r) if original_ln_before] ─> down ─> act ─> up ─> ·scaling ─> (+ h) ─> h'

Parallel (He et al. 2022, arXiv:2110.04366) reads the sub-layer *input*, the residual r::

    h' = h + scaling · up(act(down(r)))

The base model then adds r and applies its own LayerNorm as usual, so `h'` replaces `h`. With
`init="zero_up"` (the default) the up projection starts at zero and a new adapter is exactly the
identity. Bottleneck size = hidden // reduction_factor unless `bottleneck_size` is given.

Presets (registered names): `houlsby` (after attention and FFN, swish), `pfeiffer` (after FFN,
relu, the base LayerNorm before the adapter), `parallel` (branch from the FFN input, scaling 1),
`scaled_parallel` (the same with scaling 4, He et al.'s "scaled PA"). On BERT-base at reduction
factor 16, pfeiffer trains 12 × (768·48 + 48 + 48·768 + 768) = 894,528 parameters; houlsby twice
that, 1,789,056.

Learned scaling and gating (as AdapterHub `adapters`' `Adapter`, used by UniPELT, Mao et al. 2022,
arXiv:2110.07577): `scaling="learned"` trains one scalar (init 1), `scaling="channel"` one factor per
hidden unit (init 1); `use_gating=True` adds a gate g = mean over the sequence of sigmoid(W_g x + b_g)
(W_g: 1×hidden, x the adapter input), one value per example, multiplying the adapter output::

    h' = h + g · scaling · up(act(down(x)))        g: (batch, 1, 1)

The down and up projections are `nn.Linear` unless a method passes its own modules (Compacter's
PHM layers, `methods/compacter.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import nn
from transformers.activations import get_activation

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView

Placement = Literal["attn_output", "ffn_output"]
Mode = Literal["sequential", "parallel"]
Init = Literal["zero_up", "bert", "houlsby"]
LearnedScaling = Literal["learned", "channel"]


class BottleneckUnit(Unit):
    """One adapter MLP at one sub-layer output.

    Args:
        hidden: the model width; bottleneck: the inner width.
        config: placement-independent settings (mode, activation, layer norms, scaling, gating, init).
        down, up: the projections hidden -> bottleneck and bottleneck -> hidden (default: `nn.Linear`).
            Modules given here initialise themselves: `config.init` only sets `nn.Linear` projections.
    """

    stage = 1
    needs_residual = True

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        config: BottleneckConfig,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.parallel = config.mode == "parallel"
        self.original_ln_before = config.original_ln_before
        self.residual_before_ln = config.residual_before_ln
        self.scaling: float | nn.Parameter
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))  # one factor per hidden unit
        else:
            self.scaling = float(config.scaling)
        self.ln_before = nn.LayerNorm(hidden) if config.ln_before else None
        self.down = down if down is not None else nn.Linear(hidden, bottleneck)
        self.act = get_activation(config.activation)
        self.up = up if up is not None else nn.Linear(bottleneck, hidden)
        self.ln_after = nn.LayerNorm(hidden) if config.ln_after else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gate = nn.Linear(hidden, 1) if config.use_gating else None
        _initialise(self, config.init)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (its own parameters' dtype)."""
        return next(self.down.parameters()).dtype

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """g · scaling · up(act(down(x))), with the optional adapter-own layer norm. (..., hidden)."""
        out = self.ln_before(x) if self.ln_before is not None else x
        out = self.dropout(self.up(self.act(self.down(out))))
        if not (isinstance(self.scaling, float) and self.scaling == 1.0):  # 1.0: no full-size copy
            out = out * self.scaling
        if self.gate is not None:
            # As adapters: one gate per example, the mean over the sequence (padding included) of a
            # per-token sigmoid: (batch, seq, 1) -> (batch, 1, 1).
            out = out * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        return out

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return self.around(h, call, self.branch, lambda name, x: getattr(self, name)(x))

    def around(
        self,
        h: torch.Tensor,
        call: SiteCall,
        branch: Callable[[torch.Tensor], torch.Tensor],
        norm: Callable[[str, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The adapter around its `branch` (mode, residuals, layer norms), with this unit's options;
        `norm(name, x)` applies the adapter-own LayerNorm `name`. Shared with the batched kernel, which
        passes per-row `branch` and `norm`."""
        r = call.residual
        if self.parallel:
            if r is None:
                raise RuntimeError("parallel adapter: the site did not capture the sub-layer input")
            out = branch(r.to(self.dtype))
            if self.ln_after is not None:
                out = norm("ln_after", out)
            return h + out.to(h.dtype)
        x = h.to(self.dtype)
        residual = x
        if self.original_ln_before:
            if r is None:
                raise RuntimeError("adapter with original_ln_before: the site did not capture the residual")
            # The base model's own post-LN (when the family has one) feeds the adapter, as in Pfeiffer.
            x = x + r.to(x.dtype)
            x = call.norm(x) if call.norm is not None else x
            if not self.residual_before_ln:
                residual = x
        out = branch(x)
        if self.ln_after is not None:
            out = norm("ln_after", out + residual)
            return out.to(h.dtype)
        return (out + residual).to(h.dtype)

    # -- per-example routing (`route(...)`, routing/fixed.py) --------------------------------------

    @classmethod
    def can_batch(cls, units: Sequence[BottleneckUnit | None]) -> bool:
        """Batched when the units differ only in weights and sizes: `nn.Linear` projections (not PHM), and
        the same mode, layer-norm placement, activation, adapter-own norms, gating and dropout."""
        real = [u for u in units if u is not None]
        if not all(isinstance(u.down, nn.Linear) and isinstance(u.up, nn.Linear) for u in real):
            return False
        return len({_options(u) for u in real}) == 1

    @classmethod
    def batched(
        cls, units: Sequence[BottleneckUnit | None], index: torch.Tensor, h: torch.Tensor, call: SiteCall
    ) -> torch.Tensor:
        """Row b through units[index[b]]; rows with index M = len(units) (or a None unit) keep h exactly.

        The same computation as `forward`, with each row's weights gathered: down (B, K, H) and up
        (B, H, K), K the largest bottleneck (zero-padded: a padded unit's activation meets a zero column
        of up), biases, scaling, adapter-own LayerNorm affines and gates (B, H). h: (B, T, H).
        """
        real = [u for u in units if u is not None]
        size = max(cast(nn.Linear, u.down).out_features for u in real)
        rows = _RowWeights(units, index, size)
        out = real[0].around(h, call, rows.branch, rows.norm)  # the options agree (`can_batch`)
        acting = (index < len(units)).view(-1, *([1] * (h.ndim - 1)))
        return torch.where(acting, out, h)  # no module: exactly the site's output


def _options(unit: BottleneckUnit) -> tuple[Any, ...]:
    """What must agree between units batched together (everything but weights and sizes)."""

    def norm(layer: nn.LayerNorm | None) -> tuple[Any, ...] | None:
        return None if layer is None else (layer.normalized_shape, layer.eps, layer.elementwise_affine)

    dropout = unit.dropout.p if isinstance(unit.dropout, nn.Dropout) else 0.0
    return (
        unit.parallel,
        unit.original_ln_before,
        unit.residual_before_ln,
        type(unit.act),
        repr(unit.act),
        norm(unit.ln_before),
        norm(unit.ln_after),
        unit.gate is not None,
        dropout,
    )


class _RowWeights:
    """The weights of each row's adapter, gathered from the units (the last slot: zeros)."""

    def __init__(self, units: Sequence[BottleneckUnit | None], index: torch.Tensor, size: int) -> None:
        self.units, self.index = units, index
        self.first = next(u for u in units if u is not None)
        down = [cast(nn.Linear, u.down) if u is not None else None for u in units]
        up = [cast(nn.Linear, u.up) if u is not None else None for u in units]
        self.down_w = self.gather([None if d is None else _pad(d.weight, size, 0) for d in down])  # (B, K, H)
        self.down_b = self.gather([None if d is None else _pad(d.bias, size, 0) for d in down])  # (B, K)
        self.up_w = self.gather([None if u is None else _pad(u.weight, size, 1) for u in up])  # (B, H, K)
        self.up_b = self.gather([None if u is None else u.bias for u in up])  # (B, H)

    def gather(self, values: list[torch.Tensor | None], fill: float = 0.0) -> torch.Tensor:
        """Stack per-unit tensors (None: `fill`) plus the empty slot, then pick each row's: (B, ...)."""
        like = next(v for v in values if v is not None)
        empty = torch.full_like(like, fill)
        return torch.stack([v if v is not None else empty for v in values] + [empty])[self.index]

    def scaling(self, hidden: int) -> torch.Tensor:
        """Each row's scaling as (B, 1, H): numbers, learned scalars and per-channel factors alike."""
        like = cast(nn.Linear, self.first.up).weight
        values = [
            None
            if u is None
            else torch.as_tensor(u.scaling, dtype=like.dtype, device=like.device).expand(hidden)
            for u in self.units
        ]
        return self.gather(values).unsqueeze(1)

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter-own LayerNorm `name` with each row's affine: normalise, then (B, 1, H) weight and
        bias."""
        layer = cast(nn.LayerNorm, getattr(self.first, name))
        out = nn.functional.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
        if not layer.elementwise_affine:
            return out
        norms = [None if u is None else cast(nn.LayerNorm, getattr(u, name)) for u in self.units]
        weight = self.gather([None if n is None else n.weight for n in norms], fill=1.0)
        bias = self.gather([None if n is None else n.bias for n in norms])
        return out * weight.unsqueeze(1) + bias.unsqueeze(1)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """`BottleneckUnit.branch` with per-row weights: x (B, T, H) -> (B, T, H)."""
        first = self.first
        out = self.norm("ln_before", x) if first.ln_before is not None else x
        z = torch.bmm(out, self.down_w.transpose(1, 2)) + self.down_b.unsqueeze(1)  # (B, T, K)
        out = torch.bmm(first.act(z), self.up_w.transpose(1, 2)) + self.up_b.unsqueeze(1)  # (B, T, H)
        out = first.dropout(out) * self.scaling(x.shape[-1])
        if first.gate is not None:
            gates = [None if u is None else cast(nn.Linear, u.gate) for u in self.units]
            weight = self.gather([None if g is None else g.weight[0] for g in gates])  # (B, H)
            bias = self.gather([None if g is None else g.bias for g in gates])  # (B, 1)
            logits = torch.bmm(x, weight.unsqueeze(-1)) + bias.unsqueeze(1)  # (B, T, 1)
            out = out * torch.sigmoid(logits).mean(dim=-2, keepdim=True)
        return out


def _pad(weight: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`weight` zero-padded along `dim` to `size` (the bottleneck axis)."""
    missing = size - weight.shape[dim]
    if missing == 0:
        return weight
    shape = list(weight.shape)
    shape[dim] = missing
    return torch.cat([weight, weight.new_zeros(shape)], dim=dim)


def _initialise(unit: BottleneckUnit, init: str) -> None:
    # Only nn.Linear projections: modules a method passes in (PHM layers) initialise themselves.
    down = unit.down if isinstance(unit.down, nn.Linear) else None
    up = unit.up if isinstance(unit.up, nn.Linear) else None
    linears = [linear for linear in (down, up) if linear is not None]
    with torch.no_grad():
        if init == "zero_up":
            if down is not None:
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
            if up is not None:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        elif init == "bert":
            for linear in linears:
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        elif init == "houlsby":
            for linear in linears:
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(linear.bias)
        # adapters initialises the gate like BERT for "bert" and "mam_adapter" (our "zero_up"), and
        # leaves nn.Linear's default for "houlsby"
        if unit.gate is not None and init in ("zero_up", "bert"):
            nn.init.normal_(unit.gate.weight, std=0.02)
            nn.init.zeros_(unit.gate.bias)


@dataclass(frozen=True)
class BottleneckConfig(ModuleConfig):
    """Bottleneck adapter settings (shared by the four presets; each preset changes defaults).

    Attributes:
        reduction_factor: bottleneck = hidden // reduction_factor.
        bottleneck_size: explicit inner width (overrides reduction_factor).
        placement: sub-layer outputs to adapt: "attn_output", "ffn_output".
        mode: "sequential" (transform h) or "parallel" (branch from the sub-layer input r).
        activation: any HuggingFace activation name (relu, swish/silu, gelu, tanh, ...).
        scaling: multiplier on the adapter output: a number, "learned" (one trained scalar, init 1)
            or "channel" (one trained factor per hidden unit, init 1).
        use_gating: multiply the adapter output by a learned gate (sigmoid, averaged over the sequence).
        original_ln_before: feed the adapter LN(h + r) using the base model's LayerNorm.
        residual_before_ln: the adapter's own residual is h (True) or LN(h + r) (False).
        ln_before, ln_after: adapter-own LayerNorms on its input / output.
        dropout: dropout on the adapter output.
        init: "zero_up" (exact identity at start), "bert" (N(0, 0.02)), "houlsby" (trunc. N(0, 0.01)).
        layers: only these layer indices (None: all).
    """

    reduction_factor: float = 16.0
    bottleneck_size: int | None = None
    placement: tuple[Placement, ...] = ("ffn_output",)
    mode: Mode = "sequential"
    activation: str = "relu"
    scaling: float | LearnedScaling = 1.0
    use_gating: bool = False
    original_ln_before: bool = False
    residual_before_ln: bool = True
    ln_before: bool = False
    ln_after: bool = False
    dropout: float = 0.0
    init: Init = "zero_up"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        m = self.method or "bottleneck"
        check(self.reduction_factor > 0, m, "reduction_factor", f"must be > 0, got {self.reduction_factor}")
        check(
            self.bottleneck_size is None or self.bottleneck_size >= 1,
            m,
            "bottleneck_size",
            f"must be >= 1, got {self.bottleneck_size}",
        )
        check(len(self.placement) > 0, m, "placement", "name at least one of attn_output, ffn_output")
        check(len(set(self.placement)) == len(self.placement), m, "placement", "names a sub-layer twice")
        # Literal fields are checked here too: `replace()` and direct construction skip `from_dict`.
        for name, value, allowed in (
            *(("placement", p, get_args(Placement)) for p in self.placement),
            ("mode", self.mode, get_args(Mode)),
            ("init", self.init, get_args(Init)),
        ):
            check(value in allowed, m, name, f"unknown value {value!r}; use one of {', '.join(allowed)}")
        check(0 <= self.dropout < 1, m, "dropout", f"must be in [0, 1), got {self.dropout}")
        scaling = self.scaling
        if isinstance(scaling, str):
            valid = scaling in get_args(LearnedScaling)
        else:
            valid = (
                isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling)
            )
        check(valid, m, "scaling", f"expected a number, 'learned' or 'channel', got {scaling!r}")
        try:
            get_activation(self.activation)
        except KeyError:
            check(False, m, "activation", f"unknown activation '{self.activation}'")

    def inner_size(self, hidden: int) -> int:
        """The bottleneck width for a model of width `hidden`."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))

    def build(self, view: ModelView) -> list[Attachment]:
        """One `BottleneckUnit` per placement in every chosen layer."""
        if view.hidden_size is None:
            raise ValueError(f"{self.method}: cannot read hidden_size from the {view.model_type} config")
        inner = self.inner_size(view.hidden_size)
        return [
            Attachment(point.path, BottleneckUnit(view.hidden_size, inner, self), hook=point)
            for point in view.hook_points(self.placement, self.layers)
        ]


@register_method(
    "houlsby", BottleneckUnit, "sequential bottleneck after attention and FFN (Houlsby et al. 2019)"
)
@dataclass(frozen=True)
class HoulsbyConfig(BottleneckConfig):
    placement: tuple[Placement, ...] = ("attn_output", "ffn_output")
    activation: str = "swish"


@register_method(
    "pfeiffer", BottleneckUnit, "sequential bottleneck after the FFN only (Pfeiffer et al. 2021)"
)
@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    placement: tuple[Placement, ...] = ("ffn_output",)
    activation: str = "relu"
    original_ln_before: bool = True


@register_method("parallel", BottleneckUnit, "bottleneck branch parallel to the FFN (He et al. 2022)")
@dataclass(frozen=True)
class ParallelConfig(BottleneckConfig):
    mode: Mode = "parallel"


@register_method(
    "scaled_parallel", BottleneckUnit, "parallel bottleneck with output scaling 4 (He et al. 2022)"
)
@dataclass(frozen=True)
class ScaledParallelConfig(BottleneckConfig):
    mode: Mode = "parallel"
    scaling: float | LearnedScaling = 4.0
