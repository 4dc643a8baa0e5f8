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
from dataclasses import dataclass
from typing import Literal, get_args

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
        out = self.dropout(self.up(self.act(self.down(out)))) * self.scaling
        if self.gate is not None:
            # As adapters: one gate per example, the mean over the sequence (padding included) of a
            # per-token sigmoid: (batch, seq, 1) -> (batch, 1, 1).
            out = out * torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)
        return out

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        r = call.residual
        if self.parallel:
            if r is None:
                raise RuntimeError("parallel adapter: the site did not capture the sub-layer input")
            out = self.branch(r.to(self.dtype))
            if self.ln_after is not None:
                out = self.ln_after(out)
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
        out = self.branch(x)
        if self.ln_after is not None:
            out = self.ln_after(out + residual)
            return out.to(h.dtype)
        return (out + residual).to(h.dtype)


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
