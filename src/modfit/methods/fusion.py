"""AdapterFusion: attention over several modules' outputs, learned per site (Pfeiffer et al. 2021,
arXiv:2005.00247), generalised from bottleneck adapters to any module type.

A fusion module holds one `FusionUnit` at every site where a module it fuses acts. Inside the
composition `fuse(a, b, c)` each branch (a module, or any sub-expression such as `stack(l, a)`)
returns its output o_i at that site, and the fusion unit combines them, per token::

    q = Q h            k_i = K o_i            v_i = V o_i          h: the site's output before the branches
    alpha_i = softmax_i(q . k_i / T)                               (batch, seq, n)
    fused = sum_i alpha_i v_i                                      (batch, seq, width)

Q and K start N(0, 0.02²) and V as the identity, so a new fusion starts close to the mean of the
branch outputs. Parameters per site: 3 (width² + width), as AdapterHub's fusion layers. `train_only`
on the fusion trains only Q, K, V (and its head); the fused modules stay frozen.

The fused modules must be on the model when the fusion is added or loaded (load them first); the
config names them by the textual form of each branch, so a saved fusion knows what it fuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..composition import CompositionError, parse
from ..config import ModuleConfig, check
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, TargetError, projection_shape

if TYPE_CHECKING:
    from ..model import ModularModel


_Folded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class FusionUnit(Unit):
    """The fusion layer of one site: Q, K, V (width -> width) and a temperature T.

    It is not an item the site runs by itself (`parts()` is empty): a `fuse(...)` node calls `fuse`.
    """

    def __init__(self, width: int, n: int, temperature: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.n = n
        self.temperature = temperature
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width))
            self.value.bias.zero_()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._record: dict[str, Any] | None = None  # see `FusionConfig.recording`
        self._fold_cache: tuple[tuple[Any, ...], _Folded] | None = None  # see `_folded`

    def parts(self) -> list[Unit]:
        return []

    def forward(self, h: Any, call: SiteCall) -> Any:  # pragma: no cover - never run as an item
        return h

    def fuse(self, h: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """h (..., width) and the branch outputs (n, ..., width) -> the fused output (..., width).

        The branches come first: stacking whole outputs one after another is a plain copy, where
        interleaving them per token, (..., n, width), is a strided one.

        Computed without the n keys and n values. With q = Q h + b_q and K, V linear,
            q . k_i = (Kᵀ q) . o_i + q . b_k          (the last term is the same for every i)
            sum_i alpha_i v_i = V (sum_i alpha_i o_i) + b_v      (the alpha_i sum to 1)
        and Kᵀ q = (Kᵀ Q) h + Kᵀ b_q: per token two width x width products ((Kᵀ Q) h and V) instead of
        1 + 2n, and the backward stores no (n, width) keys or values. Equal to the formula in the
        module docstring up to float roundoff (tested against it, gradients included).
        """
        dtype = self.query.weight.dtype
        x = h.to(dtype)  # (..., width)
        o = outputs.to(dtype)  # (n, ..., width)
        if x.numel() > x.shape[-1] ** 2:  # more tokens than width: fold Kᵀ Q once (width³)
            folded, folded_bias, q_bk, bq_bk = self._folded()
            q_in_branch_space = x @ folded + folded_bias  # (..., width): Kᵀ q as a row vector
            q_dot_bk = x @ q_bk + bq_bk  # (...,): q . b_k
        else:  # a few tokens: two products per token are cheaper than the width³ fold
            q = self.query(x)
            q_in_branch_space, q_dot_bk = q @ self.key.weight, q @ self.key.bias
        scores = torch.einsum("...w,n...w->...n", q_in_branch_space, o) + q_dot_bk.unsqueeze(-1)
        alpha = torch.softmax(self.dropout(scores / self.temperature), dim=-1)  # (..., n)
        if self._record is not None:
            self._accumulate(alpha.detach())
        mixed = torch.einsum("...n,n...w->...w", alpha, o)  # (..., width)
        return self.value(mixed).to(h.dtype)

    def _folded(self) -> _Folded:
        """(Kᵀ Q)ᵀ (width, width), Kᵀ b_q, Qᵀ b_k (width,) and b_q . b_k. Without autograd (inference)
        they are kept until a weight changes: every in-place change (optimizer step, `load`, `copy_`)
        bumps a tensor's version counter, which the key holds."""
        wq, bq, wk, bk = self.query.weight, self.query.bias, self.key.weight, self.key.bias
        tensors = (wq, bq, wk, bk)
        caching = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        caching = caching and not torch.compiler.is_compiling()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if caching and self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1]
        folded = (wq.T @ wk, bq @ wk, wq.T @ bk, bq @ bk)
        self._fold_cache = (key, folded) if caching else None  # no autograd: nothing to detach
        return folded

    def _accumulate(self, alpha: torch.Tensor) -> None:
        """Add the weights of the real tokens (per the recording's mask) to the running sums."""
        record = self._record
        assert record is not None
        flat = alpha.reshape(-1, self.n)
        mask = record.get("mask")
        if mask is not None and alpha.ndim == 3 and tuple(mask.shape) == tuple(alpha.shape[:2]):
            flat = flat[mask.reshape(-1).to(torch.bool)]
        record["sum"] = record.get("sum", 0) + flat.sum(dim=0).double().cpu()
        record["count"] = record.get("count", 0) + flat.shape[0]


def _width(module: nn.Module, hidden: int | None) -> int:
    """The output width of a site: a projection's out_features, else the model's hidden size."""
    if isinstance(module, nn.Linear) or (hasattr(module, "weight") and hasattr(module, "nf")):
        return projection_shape(module)[1]
    if hidden is None:
        raise TargetError(f"fusion: cannot tell the output width of {type(module).__name__}")
    return hidden


@register_method(
    "fusion",
    FusionUnit,
    "AdapterFusion: learned attention over several modules' outputs per site (Pfeiffer et al. 2021)",
    standalone=False,
)
@dataclass(frozen=True)
class FusionConfig(ModuleConfig):
    """Fusion layers over the branches `children` (textual composition forms, e.g. ("a", "stack(l, b)")).

    Attributes:
        children: what is fused, in order; `fuse(<children>)` is the composition that uses it.
        temperature: T of the softmax.
        dropout: dropout on the attention scores.
    """

    identity_at_init: ClassVar[bool] = False  # the fusion starts near the mean of the branches
    # Measured on MiniLM: fuse(sentiment, topic) of two pfeiffer modules trained on the demo data, the
    # fusion then trained 48 steps of batch 16 on sentiment (seed 0): held-out sentiment accuracy 0.880
    # at lr 5e-4, 0.900 at 1e-3, 0.910 at 2e-3, 0.865 at 5e-3 (the sentiment module alone: 0.850);
    # at 2e-3 in tests/test_learning_fusion.py, 0.875..0.920 over seeds 0..4. The paper's 5e-5 is for
    # 10 epochs on full data sets, far too small for short runs.
    default_lr: ClassVar[float | None] = 2e-3

    children: tuple[str, ...] = ()
    temperature: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(len(self.children) >= 2, "fusion", "children", "name at least 2 modules or expressions to fuse")
        check(self.temperature > 0, "fusion", "temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.dropout < 1, "fusion", "dropout", f"must be in [0, 1), got {self.dropout}")
        for child in self.children:
            try:
                parse(child)
            except CompositionError as e:
                check(False, "fusion", "children", str(e))

    def composition(self) -> str:
        """The expression that uses this fusion: fuse(children...)."""
        return f"fuse({', '.join(self.children)})"

    def module_names(self) -> list[str]:
        return parse(self.composition()).names()

    def build(self, view: ModelView) -> list[Attachment]:
        raise TargetError("fusion: layers go where the fused modules are; add it through a ModularModel")

    def build_on(self, mm: ModularModel) -> list[Attachment]:
        """One `FusionUnit` at every site where a fused module has a unit.

        Raises:
            ValueError: a fused module is not on `mm`.
        """
        paths: dict[str, None] = {}
        for name in self.module_names():
            if name not in mm.records:
                known = ", ".join(mm.records) or "none"
                raise ValueError(
                    f"fusion of {self.composition()}: module '{name}' is not on this model "
                    f"(modules: {known}); add or load the fused modules first"
                )
            for path in mm.records[name].sites:
                paths.setdefault(path, None)
        n = len(self.children)
        return [
            Attachment(
                path,
                FusionUnit(
                    _width(mm.view.module(path), mm.view.hidden_size), n, self.temperature, self.dropout
                ),
            )
            for path in paths
        ]


@contextmanager
def recording(mm: ModularModel, name: str) -> Iterator[dict[str, dict[str, Any]]]:
    """Record the fusion weights of fusion module `name` while the block runs.

    Yields a dict site path -> {"sum": (n,) float64, "count": tokens, "mask": None}; set
    `record[path]["mask"]` (or use `set_mask`) to a (batch, seq) attention mask before each forward
    pass so that padding is not counted.
    """
    records: dict[str, dict[str, Any]] = {}
    units = [(path, unit) for path, unit in mm.units(name) if isinstance(unit, FusionUnit)]
    for path, unit in units:
        records[path] = {}
        unit._record = records[path]
    try:
        yield records
    finally:
        for _, unit in units:
            unit._record = None


def set_mask(records: dict[str, dict[str, Any]], mask: torch.Tensor | None) -> None:
    """Use `mask` (batch, seq) for the next forward pass of a `recording`."""
    for record in records.values():
        record["mask"] = mask
