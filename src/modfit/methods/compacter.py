"""Compacter: bottleneck adapters with parameterised-hypercomplex (PHM) projections
(Mahabadi et al. 2021, arXiv:2106.04647, §3).

A PHM layer replaces a Linear's (in × out) weight by a sum of n Kronecker products::

    y = x H + b,    H = Σ_{i=1..n} A_i ⊗ W_i          x: (..., in), H: (in, out), b: (out,)
    A_i: (n, n) "rule" matrices, shared by every PHM layer of the module (`shared_phm_rule`)
    W_i: (in/n, out/n), factorised as W_i = s_i t_iᵀ of rank `phm_rank` (`factorized_phm_W`)
         s_i: (in/n, rank) = W_left[i],  t_i: (rank, out/n) = W_right[i]

so a layer trains n·(in/n + out/n)·rank + out parameters instead of in·out + out. Compacter puts such
an adapter (down PHM -> GELU -> up PHM, bottleneck = hidden / 32) after the attention and the FFN
(Houlsby's placement); Compacter++ after the FFN only (Pfeiffer's placement, the base LayerNorm
before the adapter). The adapter itself is `bottleneck.BottleneckUnit` with PHM layers as its
projections.

Defaults are AdapterHub `adapters`' `CompacterConfig` / `CompacterPlusPlusConfig` (phm_dim 4,
reduction factor 32, rank 1, one shared rule (n × n × n), factorised W, rule ~ N(0, 0.0001), biases),
so the counts equal theirs: on BERT-base Compacter trains 24 adapters × (816 + 1,560) + 64 shared
= 57,088 parameters, Compacter++ 12 × 2,376 + 64 = 28,576 (down: 4·192 + 4·6 + 24 = 816;
up: 4·6 + 4·192 + 768 = 1,560; the rule: 4·4·4 = 64).

Two deliberate differences: `init="zero_up"` (the default) zeroes the up layer's right factor t (its
W when not factorised), so a new module is exactly the identity, as every modfit adapter; `init="bert"`
keeps adapters' own initialisation (W factors Xavier-normal, near but not exactly the identity).
And `learn_phm=False` keeps the rule as a fixed buffer; adapters' `train_adapter` turns its gradient
back on (its count stays 57,088; here 57,024).

Shared tensors are one `nn.Parameter` held by every PHM layer of the module: the model counts and
trains it once (parameters are deduplicated by identity); a saved file repeats it under every layer's
key, and loading fills the same tensor each time, so it stays shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import nn

from ..config import check
from ..registry import register_method
from ..sites import Attachment
from ..targets import ModelView
from .bottleneck import BottleneckConfig, BottleneckUnit, Placement

RuleInit = Literal["normal", "uniform"]


def kronecker_sum(rule: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ W_i for rule (n, n, n) and weight (n, p, q): the (n·p, n·q) matrix H."""
    n, p, q = weight.shape
    # H[a·p + c, b·q + d] = Σ_i A_i[a, b] W_i[c, d]
    return torch.einsum("iab,icd->acbd", rule, weight).reshape(n * p, n * q)


class PHMLayer(nn.Module):
    """y = x H + b with H = Σ_i A_i ⊗ W_i (see the module docstring).

    Args:
        in_features, out_features: both divisible by n (the rule's size).
        rule: "phm_rule" (n, n, n), or "phm_rule_left" (n, n, 1) and "phm_rule_right" (n, 1, n) whose
            batched product is the rule; nn.Parameters (learned) or tensors (fixed, kept as buffers).
        weight: "W" (n, in/n, out/n), or "W_left" (n, in/n, rank) and "W_right" (n, rank, out/n).
        bias: add a bias b (out,), initialised to zero.

    Shared tensors are passed in already made; the layer only registers them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rule: dict[str, torch.Tensor],
        weight: dict[str, nn.Parameter],
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._rule_names = tuple(rule)
        self._weight_names = tuple(weight)
        for name, tensor in rule.items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
        for name, param in weight.items():
            self.register_parameter(name, param)
        self.b = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _factor(self, names: tuple[str, ...]) -> torch.Tensor:
        tensors = [getattr(self, name) for name in names]
        return tensors[0] if len(tensors) == 1 else torch.bmm(tensors[0], tensors[1])

    def matrix(self) -> torch.Tensor:
        """H (in, out)."""
        return kronecker_sum(self._factor(self._rule_names), self._factor(self._weight_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.matrix()  # (..., in) @ (in, out)
        return y + self.b if self.b is not None else y


@register_method(
    "compacter",
    BottleneckUnit,
    "bottleneck with PHM (Kronecker) projections after attention and FFN (Mahabadi et al. 2021)",
)
@dataclass(frozen=True)
class CompacterConfig(BottleneckConfig):
    """Compacter settings: the bottleneck adapter's (see `BottleneckConfig`) plus the PHM layers'.

    Attributes:
        phm_dim: n, the number of Kronecker summands and the rule size (hidden and bottleneck must be
            divisible by it; a bottleneck from `reduction_factor` is rounded up to a multiple of n).
        phm_rank: rank of each factorised W_i.
        shared_phm_rule: one rule for every PHM layer of the module (else one per layer).
        factorized_phm_rule: the rule as the product of (n, n, 1) and (n, 1, n) factors.
        shared_W_phm: one W for every down layer and one for every up layer of the module.
        factorized_phm_W: W_i = W_left[i] W_right[i] of rank `phm_rank` (else a full W_i).
        phm_c_init: rule initialisation, "normal" (N(0, phm_init_range) when shared, N(0, 0.01) per
            layer) or "uniform" (U(-1, 1) when shared, U(-0.01, 0.01) per layer), as in adapters.
        phm_init_range: the shared rule's standard deviation for "normal".
        learn_phm: train the rule (False: it stays fixed).
        phm_bias: PHM layers have a bias.
        init: "zero_up" (exact identity: the up layer's W starts at zero) or "bert" (adapters'
            initialisation).
    """

    # `modfit train`'s rate without --lr (measured on MiniLM, see tests/test_learning_compacter.py:
    # 5e-3 and 1e-2 give 0.83 held out, Compacter++ 0.81 at 1e-2; 3e-3 0.77, 2e-2 0.78)
    default_lr: ClassVar[float | None] = 1e-2

    reduction_factor: float = 32.0
    placement: tuple[Placement, ...] = ("attn_output", "ffn_output")
    activation: str = "gelu"
    phm_dim: int = 4
    phm_rank: int = 1
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    shared_W_phm: bool = False
    factorized_phm_W: bool = True
    phm_c_init: RuleInit = "normal"
    phm_init_range: float = 1e-4
    learn_phm: bool = True
    phm_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.method or "compacter"
        check(self.phm_dim >= 1, m, "phm_dim", f"must be >= 1, got {self.phm_dim}")
        check(self.phm_rank >= 1, m, "phm_rank", f"must be >= 1, got {self.phm_rank}")
        check(self.phm_init_range > 0, m, "phm_init_range", f"must be > 0, got {self.phm_init_range}")
        check(
            self.phm_c_init in get_args(RuleInit),
            m,
            "phm_c_init",
            f"unknown value {self.phm_c_init!r}; use one of {', '.join(get_args(RuleInit))}",
        )
        check(
            self.init in ("zero_up", "bert"),
            m,
            "init",
            f"PHM layers support 'zero_up' and 'bert', got {self.init!r}",
        )
        check(
            self.bottleneck_size is None or self.bottleneck_size % self.phm_dim == 0,
            m,
            "bottleneck_size",
            f"{self.bottleneck_size} is not divisible by phm_dim {self.phm_dim}",
        )

    def inner_size(self, hidden: int) -> int:
        """The bottleneck width; one derived from `reduction_factor` is rounded up to a multiple of
        phm_dim (adapters refuses such widths instead)."""
        size = super().inner_size(hidden)
        if self.bottleneck_size is None:
            size = -(-size // self.phm_dim) * self.phm_dim
        return size

    def build(self, view: ModelView) -> list[Attachment]:
        """One `BottleneckUnit` with PHM projections per placement in every chosen layer."""
        hidden = view.hidden_size
        if hidden is None:
            raise ValueError(f"{self.method}: cannot read hidden_size from the {view.model_type} config")
        if hidden % self.phm_dim:
            raise ValueError(
                f"{self.method}.phm_dim: the model width {hidden} is not divisible by {self.phm_dim}"
            )
        inner = self.inner_size(hidden)
        # Shared tensors are made where the units will live: moving a Parameter to another kind of
        # device (e.g. meta, for counting) makes a new one per module and would break the sharing.
        reference = next(view.base_model.parameters())
        device, dtype = reference.device, torch.promote_types(reference.dtype, torch.float32)
        zero_up = self.init == "zero_up"
        rule = self._rule(shared=True, device=device, dtype=dtype) if self.shared_phm_rule else None
        w_down = self._weight(hidden, inner, False, device, dtype) if self.shared_W_phm else None
        w_up = self._weight(inner, hidden, zero_up, device, dtype) if self.shared_W_phm else None
        attachments = []
        for point in view.hook_points(self.placement, self.layers):
            down = PHMLayer(
                hidden,
                inner,
                rule if rule is not None else self._rule(shared=False),
                w_down if w_down is not None else self._weight(hidden, inner, zero=False),
                self.phm_bias,
            )
            up = PHMLayer(
                inner,
                hidden,
                rule if rule is not None else self._rule(shared=False),
                w_up if w_up is not None else self._weight(inner, hidden, zero=zero_up),
                self.phm_bias,
            )
            unit = BottleneckUnit(hidden, inner, self, down=down, up=up)
            attachments.append(Attachment(point.path, unit, hook=point))
        return attachments

    def _rule(
        self, shared: bool, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The rule tensors, initialised as adapters does (its shared and per-layer inits differ)."""
        n = self.phm_dim
        shapes = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
        if not self.factorized_phm_rule:
            shapes = {"phm_rule": (n, n, n)}
        std, bound = (self.phm_init_range, 1.0) if shared else (0.01, 0.01)
        rule: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            tensor = torch.empty(shape, device=device, dtype=dtype)
            with torch.no_grad():
                if self.phm_c_init == "normal":
                    tensor.normal_(0.0, std)
                else:
                    tensor.uniform_(-bound, bound)
            rule[name] = nn.Parameter(tensor) if self.learn_phm else tensor
        return rule

    def _weight(
        self,
        in_features: int,
        out_features: int,
        zero: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, nn.Parameter]:
        """W (or its factors) for an (in → out) PHM layer: Xavier-normal per slice i, as adapters does
        (its `hypercomplex_nonlinearity` is tested for truth, so every setting gives Xavier-normal);
        with `zero`, the last factor starts at zero."""
        n, rank = self.phm_dim, self.phm_rank
        p, q = in_features // n, out_features // n
        shapes = (
            {"W_left": (n, p, rank), "W_right": (n, rank, q)} if self.factorized_phm_W else {"W": (n, p, q)}
        )
        weight: dict[str, nn.Parameter] = {}
        for name, shape in shapes.items():
            tensor = torch.empty(shape, device=device, dtype=dtype)
            with torch.no_grad():
                for i in range(n):
                    nn.init.xavier_normal_(tensor[i])
            weight[name] = nn.Parameter(tensor)
        if zero:
            with torch.no_grad():
                weight[list(shapes)[-1]].zero_()  # W_right (or W): H = 0, the adapter adds nothing
        return weight


@register_method(
    "compacter++",
    BottleneckUnit,
    "Compacter after the FFN only, base LayerNorm first (Mahabadi et al. 2021)",
)
@dataclass(frozen=True)
class CompacterPlusPlusConfig(CompacterConfig):
    placement: tuple[Placement, ...] = ("ffn_output",)
    original_ln_before: bool = True
