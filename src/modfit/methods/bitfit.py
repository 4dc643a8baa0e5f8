"""BitFit: train only the bias terms (Ben Zaken et al., 2022, arXiv:2106.10199).

Each targeted module keeps its frozen bias b and gets a learned delta Δb, added to its output::

    x ──> W x + b (frozen) ──(+ Δb)──> h' = W x + (b + Δb)        Linear / Conv1D
    x ──> w ⊙ x̂ + b (frozen) ──(+ Δb)──> h' = w ⊙ x̂ + (b + Δb)   LayerNorm

Δb starts at zero, so a new module is exactly the identity, and it merges exactly: b' = b + Δb.

Default targets are every bias term inside the transformer layers, LayerNorm biases included, as in
the paper (per BERT layer: query, key, value, attention output, FFN in and out, both LayerNorms). The
authors' code (benzakenelad/BitFit, `--bias-terms all`) also trains the embedding LayerNorm and pooler
biases, outside the layers: add `embeddings.LayerNorm` and `pooler.dense` to `targets` for that
(+2 · 768 on BERT-base).

Parameter count: per BERT layer the q, k, v, attention-output, FFN-in (4h), FFN-out and two
LayerNorm biases, 7h + 4h = 11h; BERT-base: 12 × (7 · 768 + 3072) = 101,376 (0.093% of 110M; on
BERT-large 24 × 11 · 1024 = 270,336, the paper's 0.08%).

Families without bias terms (Llama, Mistral, T5) have nothing to tune; with `add_bias="auto"` (the
default) the targeted modules then each get a new learned bias, the way T-Few's BitFit for T5 adds
zero biases to q, k, v, o, wi, wo (r-three/t-few, src/models/bitfit.py). A new bias has no base
parameter to fold into, so it is not mergeable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ..archs import PROJECTION_ROLES
from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError, is_projection, projection_shape

AddBias = Literal["auto", "never", "always"]


class _OutputBias(Unit):
    """Adds a learned vector to the watched module's output: h' = h + Δb, Δb of shape (out,)."""

    stage = 0
    averageable = True

    def __init__(self, size: torch.Size | tuple[int, ...]) -> None:
        super().__init__()
        self.delta_bias = nn.Parameter(torch.zeros(size))  # (out,): broadcasts over (..., out)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return h + self.delta_bias.to(h.dtype)


class BiasUnit(_OutputBias):
    """A delta on an existing bias b (Linear, Conv1D or LayerNorm): merges as b += Δb."""

    mergeable = True

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"bias": self.delta_bias}


class AddedBiasUnit(_OutputBias):
    """A new bias on a module that has none (Llama's projections, RMSNorms): nothing to merge into."""


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def _out_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape a bias of `module` has: (out,) for a projection, the weight's shape for a norm."""
    if is_projection(module):
        return (projection_shape(module)[1],)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    return tuple(getattr(module, "normalized_shape", ()))


def resolve(view: ModelView, targets: tuple[str, ...], layers: tuple[int, ...] | None) -> list[str]:
    """Paths of the projections and norms `targets` name, in model order.

    `all-linear` and projection roles name projections, `all-norm` names the norms inside the layers;
    a module-name suffix or `re:<regex>` may name either kind.

    Raises:
        TargetError: a target names neither a projection nor a norm.
    """
    found: dict[str, None] = {}
    for target in targets:
        if target in PROJECTION_ROLES or target == "all-linear":
            matched = view.projections([target], layers)
        elif target == "all-norm":
            matched = view.norms([target], layers)
        else:
            matched = []
            for finder in (view.projections, view.norms):
                with contextlib.suppress(TargetError):  # it may name the other kind only
                    matched += finder([target], layers)
            if not matched:
                raise TargetError(
                    f"bitfit: target '{target}' matches no Linear/Conv1D or LayerNorm/RMSNorm module of this "
                    f"{view.model_type} model"
                )
        found.update(dict.fromkeys(matched))
    order = {p: i for i, (p, _) in enumerate(view.base_model.named_modules())}
    return sorted(found, key=order.__getitem__)


@register_method(
    "bitfit", BiasUnit, "bias terms only: Δb on the layers' biases (Ben Zaken et al. 2022); mergeable"
)
@dataclass(frozen=True)
class BitfitConfig(ModuleConfig):
    """BitFit settings.

    Attributes:
        targets: which modules' biases: `all-linear` (every projection in the layers), `all-norm`
            (every LayerNorm/RMSNorm in the layers), projection roles (`query`, `value`, ...),
            module-name suffixes (`LayerNorm`, `c_attn`) or `re:<regex>`.
        layers: only these layer indices (None: every layer).
        add_bias: at targeted modules without a bias: "never" skips them; "always" gives each a
            new learned bias (not mergeable); "auto" does that only when no targeted module has a
            bias (Llama, Mistral, T5), so a model with biases gets exactly the paper's method.
    """

    targets: tuple[str, ...] = ("all-linear", "all-norm")
    layers: tuple[int, ...] | None = None
    add_bias: AddBias = "auto"

    def __post_init__(self) -> None:
        check(len(self.targets) > 0, "bitfit", "targets", "name at least one module kind, role or pattern")
        check(
            self.add_bias in get_args(AddBias),
            "bitfit",
            "add_bias",
            f"unknown {self.add_bias!r}; use one of {', '.join(get_args(AddBias))}",
        )

    def build(self, view: ModelView) -> list[Attachment]:
        """A `BiasUnit` per targeted module with a bias; an `AddedBiasUnit` per one without (see add_bias).

        Raises:
            TargetError: the targets match nothing, or only bias-free modules with add_bias="never".
        """
        paths = resolve(view, self.targets, self.layers)
        biased = [p for p in paths if _has_bias(view.module(p))]
        add = self.add_bias == "always" or (self.add_bias == "auto" and not biased)
        if not biased and not add:
            raise TargetError(
                f"bitfit: none of the {len(paths)} modules the targets name on this {view.model_type} model "
                "has a bias; set add_bias=auto or always to give them new ones"
            )
        attachments = []
        for path in paths:
            module = view.module(path)
            if _has_bias(module):
                bias = module.bias
                assert isinstance(bias, torch.Tensor)
                attachments.append(Attachment(path, BiasUnit(bias.shape)))
            elif add:
                attachments.append(Attachment(path, AddedBiasUnit(_out_shape(module))))
        return attachments
