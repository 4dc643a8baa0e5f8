"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits a projection's weight into a magnitude and a direction, trains the magnitude m
directly and the direction with LoRA (eq. 5)::

    W' = m ⊙ (W + s·BA) / ||W + s·BA||_c

||·||_c is the L2 norm of each output feature's weights over the input dimension, one value per
output feature (PEFT's `weight_norm`: `linalg.norm(W + s·BA, dim=1)` on the (out, in) weight; over
dim 0 of GPT-2's (in, out) Conv1D weight). m starts as ||W||_c, B at zero, so W' = W at init.

The unit never forms W'. With ratio = m / ||W + s·BA||_c, one value per output feature::

    h' = W'x + b = h + (ratio − 1) ⊙ (W x) + ratio ⊙ s·BAx          h = W x + b, the base output

W x is the base output less its bias, so the only extra work beside LoRA's is the norm, which needs
the (out, in) matrix W + s·BA once per call. As in the paper (§4.3) and PEFT, the norm is treated as
a constant: no gradient flows through it, which saves the memory of its graph. At init B = 0 makes
W + s·BA equal W bit for bit, so the norm is the same computation as the one that set m: ratio is
exactly 1, both terms are exactly 0, and a new module leaves outputs exactly unchanged. With
dropout in training, W x is recomputed from the dropped input, so both terms see the same x (as
PEFT does).

Merging writes W' into the weight. Unmerging restores W = W' / ratio − s·BA from the ratio kept at
merge time (as PEFT keeps the norm): exact up to rounding, a few ulps of W in float32. Where a
ratio is 0 (m = 0) the division cannot undo it, and the unit keeps a copy of W instead (exact).
The unit assumes W is what it was at merge time when unmerging: unmerge modules in reverse order.

Parameter count per projection: LoRA's r · (in + out) plus out magnitudes; r=8 on BERT-base query
and value: 294,912 + 12 × 2 × 768 = 313,344, as PEFT's `use_dora=True` (its `lora_magnitude_vector`
holds one value per output feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..config import check
from ..registry import register_method
from ..sites import Attachment, SiteCall
from ..targets import ModelView, projection_shape
from .lora import LoraConfig, LoraUnit


class DoraUnit(LoraUnit):
    """LoRA with a learned magnitude per output feature, on one projection.

    Args:
        in_features, out_features, r, alpha, dropout, rslora, fan_in_fan_out: as for `LoraUnit`.
        weight: the projection's frozen weight, (out, in) or (in, out) for Conv1D: m starts as its
            norm per output feature.
    """

    writes_in_place = False  # its own forward, which reads the base output (`call.output`)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        fan_in_fan_out: bool = False,
        *,
        weight: torch.Tensor,
    ) -> None:
        super().__init__(in_features, out_features, r, alpha, dropout, rslora, fan_in_fan_out)
        # In the dtype the model gives units (at least float32, see ModularModel), so that the
        # forward's norm at B = 0 repeats this computation exactly.
        self.to(torch.promote_types(weight.dtype, torch.float32))
        self.magnitude = nn.Parameter(self.direction_norm(weight))  # (out,) = ||W||_c
        self._merged_ratio: torch.Tensor | None = None  # m / ||W + s·BA||_c at merge time
        self._merged_copy: torch.Tensor | None = None  # W itself, only when some ratio is 0

    @torch.no_grad()
    def direction_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·BA||_c, (out,): each output feature's L2 norm over the input dimension, detached."""
        v = weight.to(self.lora_A.dtype) + self.delta_weight().to(weight.device)  # the weight's layout
        return torch.linalg.vector_norm(v, dim=0 if self.fan_in_fan_out else 1)

    def ratio(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + s·BA||_c, (out,); differentiable in m only."""
        norm = self.direction_norm(weight)
        # A zero row of W + s·BA (pruned weights) would give 0/0; m/tiny keeps it finite.
        return self.magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def _along_out(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to scale the weight's output axis."""
        return v[None, :] if self.fan_in_fan_out else v[:, None]

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        weight = cast(torch.Tensor, call.base.weight)
        ratio = self.ratio(weight)  # (out,)
        x = self.dropout(call.inputs[0].to(self.lora_A.dtype))
        lora = ((x @ self.lora_A.t()) @ self.lora_B.t()) * self.scale  # (..., out)
        output = call.output
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if dropping or not isinstance(output, torch.Tensor):
            w = weight.to(x.dtype)
            base = x @ (w if self.fan_in_fan_out else w.t())  # W x from the dropped input, (..., out)
        else:
            base = output.to(lora.dtype)  # the base output before any unit: W x + b
            bias = getattr(call.base, "bias", None)
            if isinstance(bias, torch.Tensor):
                base = base - bias.to(base.dtype)
        change = (ratio - 1) * base + ratio * lora
        return h + change.to(h.dtype)

    def folded_weight(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """W' = ratio ⊙ (W + s·BA) for one inference call, at any number of tokens: the forward forms
        W + s·BA for its norm on every call anyway. Not with dropout running (the base part would read
        the dropped input), nor into a weight of another dtype."""
        weight = base.weight
        return self.merged_weight(weight) if self._foldable_into(weight) else None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = ratio ⊙ (W + s·BA) in the weight's layout, in the unit's dtype."""
        return (weight.to(self.lora_A.dtype) + self.delta_weight()) * self._along_out(self.ratio(weight))

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """W' − W for the unmerged base (DoRA's change depends on W: merge() does not add this)."""
        weight = cast(torch.Tensor, base.weight)
        return {"weight": self.merged_weight(weight) - weight.to(self.lora_A.dtype)}

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Write W' into the weight, keeping the ratio (and W itself where a ratio is 0) for unmerge."""
        weight = cast(torch.Tensor, base.weight)
        ratio = self.ratio(weight)
        self._merged_copy = weight.detach().clone() if bool((ratio == 0).any()) else None
        merged = (weight.to(ratio.dtype) + self.delta_weight()) * self._along_out(ratio)
        self._merged_ratio = ratio
        weight.copy_(merged.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Restore W = W' / ratio − s·BA (exact up to rounding; exact from the copy if one was kept)."""
        if self._merged_ratio is None:
            raise RuntimeError("DoraUnit.unmerge: this unit is not merged")
        weight = cast(torch.Tensor, base.weight)
        if self._merged_copy is not None:
            weight.copy_(self._merged_copy)
        else:
            ratio = self._along_out(self._merged_ratio)
            weight.copy_((weight.to(ratio.dtype) / ratio - self.delta_weight()).to(weight.dtype))
        self._merged_ratio = None
        self._merged_copy = None


@register_method(
    "dora", DoraUnit, "LoRA with a learned magnitude per output feature (Liu et al. 2024); mergeable"
)
@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA settings: LoRA's (`r`, `alpha`, `dropout`, `targets`, `layers`, `rslora`, `init`); the
    magnitude vector has no settings (it starts as the weight's norm per output feature)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not self.use_gating, self.method, "use_gating", "is a LoRA option; DoRA has no gate")

    def build(self, view: ModelView) -> list[Attachment]:
        """One `DoraUnit` per targeted projection."""
        attachments = []
        for path in view.projections(self.targets, self.layers):
            module = view.module(path)
            in_f, out_f, fan_in_fan_out = projection_shape(module)
            weight = cast(torch.Tensor, module.weight)
            unit = DoraUnit(
                in_f, out_f, self.r, self.alpha, self.dropout, self.rslora, fan_in_fan_out, weight=weight
            )
            if self.init == "gaussian":
                nn.init.normal_(unit.lora_A, std=1 / self.r)  # B = 0: the norm, hence m, does not depend on A
            attachments.append(Attachment(path, unit))
        return attachments
