"""(IA)³: learned rescaling vectors on chosen projections (Liu et al. 2022, arXiv:2205.05638, §3.3).

(IA)³ ("Infused Adapter by Inhibiting and Amplifying Inner Activations") multiplies activations
element-wise by learned vectors l, initialised to ones (so a new module is exactly the identity)::

    keys, values:  h = (W x + b) ⊙ l            l: (out,)   scales the projection's output
    FFN:           h = W ((x) ⊙ l) + b          l: (in,)    scales the projection's input

The paper rescales the keys and values of every attention and the FFN's intermediate activations,
i.e. the *input* of the FFN output projection. PEFT (`tuners/ia3/`) expresses this with
`target_modules` (every scaled projection) and `feedforward_modules` (those of them scaled at the
input); modfit's `targets` and `feedforward` mean the same, as projection roles or name patterns.

Defaults follow PEFT's table per model type (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`
and `..._FEEDFORWARD_MODULES_MAPPING`). For BERT and RoBERTa PEFT names `key, value, output.dense`
with `output.dense` feed-forward, and its suffix matching makes `attention.output.dense` feed-forward
too: the roles are key, value (output) and attn_out, ffn_out (input), 12 × (768 + 768 + 768 + 3072)
= 64,512 parameters on BERT-base. GPT-2's fused `c_attn` gets one vector over its whole output
(query included), as in PEFT.

Both scalings are linear in the weights, so they merge multiplicatively: output scaling multiplies
the rows of W (and b) by l, input scaling the columns of W; unmerge divides (an entry of l that is
exactly 0 erases its row or column, which unmerge cannot restore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError, projection_shape

# PEFT's default placement per `config.model_type`, as (targets, feedforward) roles. The bert-family
# rows: PEFT has bert and roberta; xlm-roberta and electra (no PEFT row) copy BERT's layers, so they
# get BERT's. qwen2, qwen3 and gemma scale q (not k) in PEFT. Every other model type gets the paper's
# placement, which is also PEFT's for gpt2, llama, mistral and t5.
_BERT = (("key", "value", "attn_out", "ffn_out"), ("attn_out", "ffn_out"))
_QUERY_VALUE = (("query", "value", "ffn_out"), ("ffn_out",))
_PAPER = (("key", "value", "ffn_out"), ("ffn_out",))
DEFAULT_PLACEMENT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "qwen2": _QUERY_VALUE,
    "qwen3": _QUERY_VALUE,
    "gemma": _QUERY_VALUE,
}


class Ia3Unit(Unit):
    """A learned scaling vector `ia3_l` on one projection (ones at the start).

    PEFT stores the same vector as (out, 1) or (1, in); here it is 1-D.

    Args:
        features: the length of l (out_features to scale the output, in_features the input).
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2's Conv1D).
    """

    stage = 0
    mergeable = True

    def __init__(self, features: int, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(features))
        self.fan_in_fan_out = fan_in_fan_out

    def _rescale(self, base: nn.Module, out_axis: bool, undo: bool) -> None:
        """Multiply (or, to `undo`, divide) base.weight along its output or input axis by l, and the
        bias too for output scaling. Division, not a reciprocal, so unmerge undoes merge to rounding."""
        weight = cast(torch.Tensor, base.weight)
        # Linear weights are (out, in), Conv1D weights (in, out)
        dim = (0 if out_axis else 1) if not self.fan_in_fan_out else (1 if out_axis else 0)
        shape = [1, 1]
        shape[dim] = -1
        targets = [(weight, self.ia3_l.reshape(shape))]
        bias = cast("torch.Tensor | None", getattr(base, "bias", None))
        if out_axis and bias is not None:
            targets.append((bias, self.ia3_l))  # PEFT scales the whole output, bias included
        for param, factor in targets:
            factor = factor.to(device=param.device, dtype=param.dtype)
            if undo:
                param.div_(factor)
            else:
                param.mul_(factor)


class Ia3OutputUnit(Ia3Unit):
    """(IA)³ on a projection's output: h = (W x + b) ⊙ l, l: (out,). The bias is scaled too, as in PEFT."""

    averageable = True

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return (h * self.ia3_l).to(h.dtype)  # (..., out) ⊙ (out,)

    @classmethod
    def batched(
        cls, units: Sequence[Ia3Unit | None], index: torch.Tensor, h: torch.Tensor, call: SiteCall
    ) -> torch.Tensor:
        """Per-example routing (`route(...)`): row b scaled by its module's l (ones for index M = len(units)
        or a None unit: the row is unchanged). h: (B, ..., out)."""
        return (h * _row_vectors(units, index, h.ndim)).to(h.dtype)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self._rescale(base, out_axis=True, undo=False)  # diag(l) W, l ⊙ b

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        self._rescale(base, out_axis=True, undo=True)


class Ia3InputUnit(Ia3Unit):
    """(IA)³ on a projection's input (the FFN activations): h = W (x ⊙ l) + b, l: (in,)."""

    edits_input = True

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            x = args[0]
            return ((x * self.ia3_l).to(x.dtype), *args[1:]), kwargs  # (..., in) ⊙ (in,)
        key = next(iter(kwargs))  # a projection called with its input as a keyword
        return args, {**kwargs, key: (kwargs[key] * self.ia3_l).to(kwargs[key].dtype)}

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return h  # the work happened on the input

    @classmethod
    def batched_before(
        cls,
        units: Sequence[Ia3Unit | None],
        rows: Callable[[int, torch.device], torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Per-example routing (`route(...)`): row b of the input scaled by its module's l (ones for rows
        without a module here). x: (B, ..., in)."""
        x = args[0] if args else next(iter(kwargs.values()))  # a keyword input: the projection's first
        scaled = (x * _row_vectors(units, rows(x.shape[0], x.device), x.ndim)).to(x.dtype)
        if args:
            return (scaled, *args[1:]), kwargs
        return args, {**kwargs, next(iter(kwargs)): scaled}

    @classmethod
    def batched(
        cls, units: Sequence[Ia3Unit | None], index: torch.Tensor, h: torch.Tensor, call: SiteCall
    ) -> torch.Tensor:
        return h  # the work happened on the input, per row

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self._rescale(base, out_axis=False, undo=False)  # W diag(l); the bias is untouched

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        self._rescale(base, out_axis=False, undo=True)


def _row_vectors(units: Sequence[Ia3Unit | None], index: torch.Tensor, ndim: int) -> torch.Tensor:
    """Each row's l, shaped (B, 1, ..., features) to broadcast over a (B, ..., features) tensor; the
    last slot (index M) and units that are None hold ones."""
    first = next(u for u in units if u is not None).ia3_l
    ones = torch.ones_like(first)
    table = torch.stack([u.ia3_l if u is not None else ones for u in units] + [ones])  # (M + 1, features)
    rows = table[index]  # (B, features)
    return rows.view(rows.shape[0], *([1] * (ndim - 2)), rows.shape[1])


@register_method(
    "ia3",
    Ia3Unit,
    "(IA)³: learned rescaling of keys, values and FFN activations (Liu et al. 2022); mergeable",
)
@dataclass(frozen=True)
class Ia3Config(ModuleConfig):
    """(IA)³ settings.

    Attributes:
        targets: every projection to rescale: roles (`query`, `key`, `value`, `attn_out`, `ffn_in`,
            `ffn_out`), module-name suffixes, `re:<regex>` or `all-linear`. None: PEFT's default for
            the model type (see `DEFAULT_PLACEMENT`).
        feedforward: which of the targets are scaled at their input rather than their output (PEFT's
            `feedforward_modules`). None: the model type's default; () for none.
        layers: only these layer indices (None: every layer).
    """

    # `modfit train`'s rate without --lr: the vectors are few, the rate high (measured on MiniLM, see
    # tests/test_learning_ia3.py: 3e-2 gives 0.84-0.85 held out, 1e-1 diverges)
    default_lr: ClassVar[float | None] = 3e-2

    targets: tuple[str, ...] | None = None
    feedforward: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check(self.targets is None or len(self.targets) > 0, "ia3", "targets", "name at least one projection")

    def placement(self, view: ModelView) -> tuple[list[str], set[str]]:
        """(paths of every scaled projection, the subset scaled at the input) on this model.

        Raises:
            TargetError: a target matches nothing, the model type has no default placement (name
                targets), or `feedforward` names a projection that is not a target.
        """
        default_targets, default_feedforward = DEFAULT_PLACEMENT.get(view.model_type, _PAPER)
        if self.targets is None and view.arch is None:
            raise TargetError(
                f"ia3 has no default placement for model type '{view.model_type}'; name the projections "
                "to scale (targets=...) and those scaled at their input (feedforward=...)"
            )
        paths = view.projections(self.targets or default_targets, self.layers)
        if self.feedforward is not None:
            feedforward = set(view.projections(self.feedforward, self.layers)) if self.feedforward else set()
            outside = sorted(feedforward - set(paths))
            if outside:
                raise TargetError(f"ia3.feedforward: {', '.join(outside[:3])} not among the targets")
        elif view.arch is not None:
            # the default only picks feed-forward projections among the targets, as PEFT's does
            feedforward = set(view.projections(default_feedforward, self.layers)) & set(paths)
        else:
            feedforward = set()  # a model without a table row: only what `feedforward` names
        return paths, feedforward

    def build(self, view: ModelView) -> list[Attachment]:
        """One `Ia3InputUnit` per feed-forward target, one `Ia3OutputUnit` per other target."""
        paths, feedforward = self.placement(view)
        attachments = []
        for path in paths:
            in_f, out_f, fan_in_fan_out = projection_shape(view.module(path))
            if path in feedforward:
                unit: Ia3Unit = Ia3InputUnit(in_f, fan_in_fan_out)
            else:
                unit = Ia3OutputUnit(out_f, fan_in_fan_out)
            attachments.append(Attachment(path, unit))
        return attachments
