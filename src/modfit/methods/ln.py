"""LayerNorm tuning: train only the normalisation layers' weights and biases (Zhao et al., 2023,
"Tuning LayerNorm in Attention", arXiv:2312.11420; PEFT's LN_TUNING).

A norm computes y = w ⊙ x̂ + b from its input x, with x̂ = (x − mean) / std (LayerNorm) or
x̂ = x / rms(x) (RMSNorm: Llama, Mistral, Qwen, T5's T5LayerNorm, which has no b). The module keeps
w and b frozen and learns deltas Δw, Δb (zero at init)::

    x ──> norm (frozen) ─────────────────────(+)──> y' = w ⊙ x̂ + b + (x̂ ⊙ Δw + Δb)
    └──> x̂ = normalise(x) ──> ⊙ Δw ──> + Δb ──┘

Since y is affine in (w, b) with ∂y/∂w = x̂, the change is exactly x̂ ⊙ Δw + Δb, for every norm of
that form (Gemma's x̂ ⊙ (1 + w) too). We recompute x̂ from the norm's *input* rather than recover it
from the output as (y − b) / w: the division is inexact and fails where w is 0 (Gemma's w is an
offset from 1, 0 at init), while renormalising costs one more elementwise pass and a row reduction over
the hidden size, the same as the norm itself and small next to any projection. A zero delta adds
exactly 0, so a new module is the identity, and it merges exactly: w' = w + Δw, b' = b + Δb.

The default targets every norm inside the transformer layers; `outside_layers=True` adds the
embedding LayerNorm (BERT family) and the final norm (GPT-2's `ln_f`, Llama's `norm`, T5's
`final_layer_norm`). Parameter count: the size of every targeted weight and bias. PEFT's defaults
(`ln_1, ln_2, ln_f` on GPT-2; `input_layernorm, post_attention_layernorm, norm` on Llama;
`layer_norm, final_layer_norm` on T5) are `outside_layers=True`; on BERT, where PEFT has no
default, `target_modules=["LayerNorm"]` is 25 × 2 × 768 = 38,400, the same as here with
`outside_layers=True` or `targets=LayerNorm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError

Kind = Literal["layer", "rms"]

# T5's T5LayerNorm (and the MT5/UMT5/LongT5 copies of it) is an RMSNorm under another name.
_RMS_CLASS_SUFFIXES = ("RMSNorm", "T5LayerNorm")


def norm_kind(module: nn.Module) -> Kind | None:
    """ "layer" (mean-centred, like nn.LayerNorm), "rms", or None for a class we cannot tell."""
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if type(module).__name__.endswith(_RMS_CLASS_SUFFIXES):
        return "rms"
    return None


def _eps(module: nn.Module) -> float | None:
    """The norm's epsilon (`eps` in torch and Gemma, `variance_epsilon` in Llama-style and T5 norms)."""
    for name in ("eps", "variance_epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None  # nn.RMSNorm(eps=None): the machine epsilon of the input dtype


class NormUnit(Unit):
    """Deltas on one norm's weight and bias: h' = h + x̂ ⊙ Δw + Δb.

    Args:
        shape: the norm's weight shape (its normalised shape, e.g. (hidden,)).
        has_bias: whether the norm has a bias (nn.LayerNorm) or not (RMSNorm).
        kind: "layer" or "rms", how x̂ is computed from the input.
        eps: the norm's epsilon.
    """

    stage = 0
    mergeable = True
    averageable = True

    def __init__(self, shape: torch.Size, has_bias: bool, kind: Kind, eps: float | None) -> None:
        super().__init__()
        self.delta_weight = nn.Parameter(torch.zeros(shape))
        self.delta_bias = nn.Parameter(torch.zeros(shape)) if has_bias else None
        self.kind = kind
        self.eps = eps

    def normalise(self, x: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
        """x̂ over the trailing `shape` dimensions of x (..., *shape), in x's dtype."""
        shape = tuple(self.delta_weight.shape)
        eps = self.eps if self.eps is not None else torch.finfo(input_dtype).eps
        if self.kind == "layer":
            return F.layer_norm(x, shape, eps=eps)
        dims = tuple(range(-len(shape), 0))
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        x = call.inputs[0]
        x_hat = self.normalise(x.to(self.delta_weight.dtype), x.dtype)  # (..., hidden), unit dtype
        change = x_hat * self.delta_weight
        if self.delta_bias is not None:
            change = change + self.delta_bias
        return h + change.to(h.dtype)

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"weight": self.delta_weight}
        if self.delta_bias is not None:
            out["bias"] = self.delta_bias
        return out


@register_method(
    "ln",
    NormUnit,
    "LayerNorm/RMSNorm tuning: Δw, Δb on the norms (Zhao et al. 2023, PEFT LN_TUNING); mergeable",
)
@dataclass(frozen=True)
class LnConfig(ModuleConfig):
    """LayerNorm tuning settings.

    Attributes:
        targets: `all-norm` (every LayerNorm/RMSNorm inside the layers), norm-name suffixes
            (`LayerNorm`, `input_layernorm`, `ln_1`) or `re:<regex>`.
        layers: only norms in these layer indices (None: every layer).
        outside_layers: also the norms outside the layer stacks (the embedding LayerNorm, the
            final norm), as PEFT's defaults for GPT-2, Llama and T5 include them.
    """

    targets: tuple[str, ...] = ("all-norm",)
    layers: tuple[int, ...] | None = None
    outside_layers: bool = False

    def __post_init__(self) -> None:
        check(len(self.targets) > 0, "ln", "targets", "name at least one norm (or all-norm)")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `NormUnit` per targeted norm with a learned weight.

        Raises:
            TargetError: the targets match no norm, only norms without parameters, or a norm class
                whose normalisation (mean-centred or RMS) this method does not know.
        """
        attachments = []
        for path in view.norms(self.targets, self.layers, outside_layers=self.outside_layers):
            module = view.module(path)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue  # nn.LayerNorm(elementwise_affine=False): nothing to tune
            kind = norm_kind(module)
            if kind is None:
                raise TargetError(
                    f"ln: cannot tell whether {type(module).__name__} at {path} is mean-centred (like "
                    "nn.LayerNorm) or an RMSNorm; name other targets"
                )
            has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
            attachments.append(Attachment(path, NormUnit(weight.shape, has_bias, kind, _eps(module))))
        if not attachments:
            raise TargetError(f"ln: no targeted norm of this {view.model_type} model has a learned weight")
        return attachments
