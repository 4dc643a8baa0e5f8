"""Sparse fine-tuning: a sparse diff of k weight entries (LT-SFT: Ansell et al. 2022, arXiv:2110.07560).

::

    W' = W + ΔW        ΔW = scatter(values at indices)      values: (k_i,), indices: flat, in W's layout
    h  = W x + ΔW x    (ΔW: (out, in); GPT-2's Conv1D stores W and ΔW as (in, out))

Which k entries (k = `k`, or `density` × the targeted entries, rounded down as composable-sft does):

- `lottery` (LT-SFT): fine-tune the targeted weights densely (a dense delta Δ, zero at
  the start) for `full_ft_steps`; keep the global top-k entries by |Δ| over all targeted weights;
  reset Δ to zero (and the head to where it started, as composable-sft resets every parameter); then
  train only those k entries. `train()` runs the three steps (`SftConfig.fit`).
- `random`: k entries drawn at random, split across the weights in proportion to their size; no
  dense phase.

Memory: during the dense phase every targeted weight has a dense Δ with its AdamW moments, as much as
full fine-tuning of those weights; that is inherent to LT-SFT (composable-sft keeps θ0 and dense masks
besides). The sparse phase trains k values. Its forward builds ΔW by a scatter and multiplies
densely; a custom autograd function rebuilds ΔW in backward instead of keeping it, so backward keeps
k values and indices per weight, not a dense ΔW (a 1536×384 weight at density 1%: 0.05 MiB instead
of 2.3 MiB, measured with saved-tensor hooks). Time per forward + backward on one CPU thread, 768
tokens, a 1536×384 weight at density 1% / 5%: scatter + dense matmul 33 / 27 ms, torch.sparse COO
32 / 73 ms, a gather per entry 56 / 432 ms; the dense weight's own step 33 ms. So: scatter (the
custom function is within noise of autograd's scatter).

Storage: per weight, `indices` (a buffer: sorted flat indices, int32 where the weight has fewer
than 2^31 entries, else int64) and `values` (the Parameter), so the file holds 8 bytes an entry in
float32 (plus the head). How many entries each weight holds is data-dependent after LT-SFT; the
selection writes it into the config (`sizes`), so that loading rebuilds units of the right size
(as PEFT's AdaLoRA keeps its `rank_pattern` in its config).

Composition (composable-sft's `SFT.apply` / `revert`): `sparse_diff(mm, name)` reads a module's
diff as a `SparseDiff`; `diff.apply(model)` / `diff.revert(model)` add / subtract it in place;
`a + b` is the union of the entries with the values of shared ones added; `sum_modules(mm, "ab",
["a", "b"])` adds that sum as a new module. With the HF `Trainer`, run LT-SFT's phases yourself::

    mm.add("sst", modfit.config("sft", density=0.01), head=modfit.head("seq-cls", labels))
    dense(mm, "sst")                                       # a dense Δ per weight: phase 1
    Trainer(model=mm, args=TrainingArguments(max_steps=500, ...), ...).train()
    select(mm, "sst")                                      # top-k of |Δ|, values reset to zero
    Trainer(model=mm, args=..., ...).train()               # a new Trainer: the parameters changed

Parameter count: k (composable-sft has no convention of its own; it trains exactly k entries).
Targets are weight matrices of Linear/Conv1D projections (LoRA's roles and patterns; default every
projection in the layer stacks); embeddings could be added as another kind of unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import ModuleConfig, check
from ..heads import HeadConfig
from ..model import ModularModel
from ..registry import register_method
from ..sites import Attachment, SiteCall, Unit
from ..targets import ModelView, projection_shape

if TYPE_CHECKING:
    from ..train import TrainResult

Selection = Literal["lottery", "random"]
INT32_MAX = torch.iinfo(torch.int32).max


# -- tensor helpers (pure functions) ---------------------------------------------------------------


def index_dtype(numel: int) -> torch.dtype:
    """int32 for flat indices into a weight of fewer than 2^31 entries (half the file), else int64."""
    return torch.int32 if numel <= INT32_MAX else torch.int64


def split_count(k: int, numels: Sequence[int]) -> list[int]:
    """k entries split across weights in proportion to their sizes (largest remainder): sums to k.

    Raises:
        ValueError: k is more than the weights hold.
    """
    total = sum(numels)
    if not 0 <= k <= total:
        raise ValueError(f"cannot pick {k} entries from weights holding {total}")
    counts = [k * n // total for n in numels]  # integers: exact even for billions of entries
    by_remainder = sorted(range(len(numels)), key=lambda i: (-(k * numels[i] % total), i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    return counts


def random_indices(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct flat indices in [0, numel), uniformly at random, sorted (int64)."""
    if 4 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    # Sparse case: draw with replacement until k distinct values, without a numel-long permutation.
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < k:
        draw = torch.randint(numel, (2 * (k - picked.numel()) + 16,), generator=generator)
        picked = torch.unique(torch.cat([picked, draw]))
    keep = torch.randperm(picked.numel(), generator=generator)[:k]
    return picked[keep].sort().values


def top_k(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest entries over several tensors together (global top-k, exactly k).

    Returns:
        Per tensor, the sorted flat indices (int64) of its entries among the k.

    Raises:
        ValueError: k is more than the tensors hold.
    """
    flat = torch.cat([s.detach().reshape(-1).to(scores[0].device) for s in scores])  # (N,)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot pick {k} entries from weights holding {flat.numel()}")
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values  # ties broken by topk, count exact
    ends = torch.tensor([s.numel() for s in scores], device=flat.device).cumsum(0)
    cuts = torch.searchsorted(chosen, ends).tolist()  # chosen[cuts[i-1]:cuts[i]] fall in tensor i
    starts = [0, *ends.tolist()[:-1]]
    return [chosen[a:b] - start for a, b, start in zip([0, *cuts[:-1]], cuts, starts, strict=True)]


def scatter(values: torch.Tensor, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense tensor of `shape` holding `values` at the flat `indices` and zero elsewhere."""
    flat = values.new_zeros(math.prod(shape))
    return flat.index_put((indices.long(),), values).view(*shape)


def weight_of(module: nn.Module) -> torch.Tensor:
    """A projection's weight tensor."""
    return cast(torch.Tensor, module.weight)


def _project(x: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    # (..., in) -> (..., out); delta in the weight's layout: (out, in), or (in, out) for Conv1D
    return x @ delta if fan_in_fan_out else F.linear(x, delta)


class _SparseProjection(torch.autograd.Function):
    """y = x ΔWᵀ with ΔW = scatter(values, indices); ΔW is rebuilt in backward, never kept."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        shape: tuple[int, ...],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.fan_in_fan_out = shape, fan_in_fan_out
        return _project(x.to(values.dtype), scatter(values, indices, shape), fan_in_fan_out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, values, indices = ctx.saved_tensors
        delta = scatter(values, indices, ctx.shape)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ (delta.t() if ctx.fan_in_fan_out else delta)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
            xs = x.reshape(-1, x.shape[-1]).to(g.dtype)  # (tokens, in)
            full = xs.t() @ g if ctx.fan_in_fan_out else g.t() @ xs  # dL/dΔW in the weight's layout
            grad_values = full.reshape(-1)[indices.long()]  # (k,)
        return grad_x, grad_values, None, None, None


# -- the unit ----------------------------------------------------------------------------------


class SparseDiffUnit(Unit):
    """A change ΔW of one projection weight, sparse (indices + values) or, while selecting, dense.

    Args:
        shape: the base weight's shape; fan_in_fan_out: it is stored (in, out) (GPT-2's Conv1D).
        size: entries of the sparse diff (they start at flat indices 0..size-1 with value zero).

    Attributes:
        indices: (k_i,) sorted flat indices, a buffer; None in dense mode.
        values: (k_i,) the trained values; None in dense mode.
        delta: the dense Δ (weight layout) in dense mode (`densify`), else None.
    """

    stage = 0
    mergeable = True
    dense_names: ClassVar[tuple[str, ...]] = ("delta",)  # the parameters of the dense mode

    indices: torch.Tensor | None
    values: nn.Parameter | None
    delta: nn.Parameter | None

    def __init__(self, shape: Sequence[int], fan_in_fan_out: bool, size: int) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.fan_in_fan_out = fan_in_fan_out
        self.register_buffer("indices", torch.arange(size, dtype=index_dtype(self.numel)))
        self.values = nn.Parameter(torch.zeros(size))
        self.register_parameter("delta", None)

    @property
    def numel(self) -> int:
        """Entries of the weight."""
        return math.prod(self.shape)

    @property
    def is_sparse(self) -> bool:
        return self.values is not None

    def dense_delta(self) -> torch.Tensor:
        """ΔW in the base weight's layout (differentiable)."""
        if self.values is not None:
            assert self.indices is not None
            return scatter(self.values, self.indices, self.shape)
        return self.dense_part()

    def dense_part(self) -> torch.Tensor:
        """ΔW of the dense mode as the forward uses it (diff pruning: sampled gates ⊙ w)."""
        assert self.delta is not None, "no dense delta: densify() first"
        return self.delta

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        x = call.inputs[0]
        if self.values is not None:
            y = _SparseProjection.apply(x, self.values, self.indices, self.shape, self.fan_in_fan_out)
        else:
            delta = self.dense_part()
            y = _project(x.to(delta.dtype), delta, self.fan_in_fan_out)
        return h + y.to(h.dtype)

    def deltas(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": self.dense_delta()}

    @torch.no_grad()
    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 flat indices, values) of the diff; in dense mode, its non-zero entries."""
        if self.values is not None:
            assert self.indices is not None
            return self.indices.long(), self.values.detach()
        flat = self.dense_delta().detach().reshape(-1)
        where = flat.nonzero().reshape(-1)
        return where, flat[where]

    @torch.no_grad()
    def densify(self) -> None:
        """Switch to a dense Δ (a new Parameter) holding the current diff."""
        if self.values is None:
            return
        self.delta = nn.Parameter(self.dense_delta().detach().clone())
        self.values = None
        self.indices = None

    @torch.no_grad()
    def sparsify(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Switch to (or replace) the sparse diff: `values` at the flat `indices` (new Parameter)."""
        reference = next(p for p in self.parameters())  # device and dtype the unit was placed with
        order = indices.long().argsort()
        self.indices = indices.long()[order].to(reference.device, index_dtype(self.numel))
        self.values = nn.Parameter(
            values[order.to(values.device)].to(reference.device, reference.dtype).clone()
        )
        for name in self.dense_names:
            setattr(self, name, None)


def ordered_units(mm: ModularModel, name: str) -> list[tuple[str, SparseDiffUnit]]:
    """(path, unit) of module `name` in the order its config built them (the order of `sizes`).

    Raises:
        ValueError: the module's units are not sparse-diff units, or it is merged.
    """
    record = mm._record(name)
    if record.merged:
        raise ValueError(f"module '{name}' is merged into the weights; unmerge it first")
    by_path = dict(mm.units(name))
    units = [(path, by_path[path]) for path in record.sites]
    for path, unit in units:
        if not isinstance(unit, SparseDiffUnit):
            raise ValueError(f"module '{name}' ({record.config.method}) holds no sparse diff at {path}")
    return units  # type: ignore[return-value]


# -- the diff as a value: apply, revert, add -------------------------------------------------------


@dataclass(frozen=True)
class SparseEntries:
    """A sparse change of one weight: `values` at the sorted, distinct flat `indices` of `shape`."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # (k,) int64
    values: torch.Tensor  # (k,)

    def dense(self) -> torch.Tensor:
        return scatter(self.values, self.indices, self.shape)

    def __add__(self, other: SparseEntries) -> SparseEntries:
        if other.shape != self.shape:
            raise ValueError(f"cannot add sparse changes of shapes {self.shape} and {other.shape}")
        indices = torch.cat([self.indices, other.indices.to(self.indices.device)])
        values = torch.cat([self.values, other.values.to(self.values)])
        union, position = torch.unique(indices, sorted=True, return_inverse=True)
        return SparseEntries(
            self.shape, union, values.new_zeros(union.numel()).index_add_(0, position, values)
        )


class SparseDiff:
    """Sparse changes of base weights, by site path (relative to `base_model`), as composable-sft's
    `SFT`: `apply` adds them to a model in place, `revert` subtracts them, `+` sums two diffs.

    Args:
        entries: site path -> `SparseEntries`.
    """

    def __init__(self, entries: Mapping[str, SparseEntries]) -> None:
        self.entries = dict(entries)

    @property
    def numel(self) -> int:
        """Stored entries over all weights."""
        return sum(e.indices.numel() for e in self.entries.values())

    def __add__(self, other: SparseDiff) -> SparseDiff:
        summed = dict(self.entries)
        for path, entries in other.entries.items():
            summed[path] = summed[path] + entries if path in summed else entries
        return SparseDiff(summed)

    @torch.no_grad()
    def apply(self, model: ModularModel | nn.Module, scale: float = 1.0) -> None:
        """W += scale · ΔW for every weight of the diff, in place.

        Args:
            model: a ModularModel or the HuggingFace model the paths refer to.
        """
        view = model.view if isinstance(model, ModularModel) else ModelView(model)
        for path, e in self.entries.items():
            weight = weight_of(view.module(path))
            if tuple(weight.shape) != e.shape:
                raise ValueError(
                    f"{path}: the diff is for shape {e.shape}, the weight is {tuple(weight.shape)}"
                )
            values = (e.values * scale).to(weight.device, weight.dtype)
            weight.view(-1).index_add_(0, e.indices.to(weight.device), values)

    def revert(self, model: ModularModel | nn.Module) -> None:
        """Undo `apply`: W -= ΔW."""
        self.apply(model, scale=-1.0)


def sparse_diff(mm: ModularModel, name: str) -> SparseDiff:
    """The diff of module `name` (an sft module, or a diff-pruning one), detached copies."""
    entries = {}
    for path, unit in ordered_units(mm, name):
        indices, values = unit.entries()
        entries[path] = SparseEntries(unit.shape, indices.clone(), values.clone())
    return SparseDiff(entries)


def add_diff(
    mm: ModularModel,
    name: str,
    diff: SparseDiff,
    head: HeadConfig | None = None,
    *,
    like: ModuleConfig | None = None,
) -> None:
    """Add a new sft module `name` holding `diff` (inactive until activated, like `mm.add`).

    Args:
        like: a config whose `targets` and `layers` to reuse when they name exactly the diff's
            weights (the card then reads like the source's); otherwise the exact paths are targets.
    """
    targets: tuple[str, ...] = tuple(mm.view.projections(diff.entries))  # exact paths, model order
    layers = None
    like_targets, like_layers = getattr(like, "targets", None), getattr(like, "layers", None)
    if like_targets is not None and set(mm.view.projections(like_targets, like_layers)) == set(diff.entries):
        targets, layers = tuple(like_targets), like_layers
    paths = mm.view.projections(targets, layers)
    sizes = tuple(diff.entries[p].indices.numel() if p in diff.entries else 0 for p in paths)
    config = SftConfig(targets=targets, layers=layers, k=max(1, sum(sizes)), sizes=sizes)
    mm.add(name, config, head)
    for path, unit in ordered_units(mm, name):
        if path in diff.entries:
            unit.sparsify(diff.entries[path].indices, diff.entries[path].values)


def sum_modules(mm: ModularModel, name: str, sources: Iterable[str], head: HeadConfig | None = None) -> None:
    """Add module `name` = the sum of the sparse diffs of `sources` (union of entries, values added).

    Merging it equals merging the sources one after the other (up to float rounding).
    """
    sources = list(sources)
    if not sources:
        raise ValueError("sum_modules: name at least one source module")
    total = sparse_diff(mm, sources[0])
    for source in sources[1:]:
        total = total + sparse_diff(mm, source)
    configs = [mm.records[s].config for s in sources]
    same = all(
        getattr(c, "targets", None) == getattr(configs[0], "targets", None)
        and getattr(c, "layers", None) == getattr(configs[0], "layers", None)
        for c in configs
    )
    add_diff(mm, name, total, head, like=configs[0] if same else None)


# -- LT-SFT's phases -------------------------------------------------------------------------------


def dense(mm: ModularModel, name: str) -> None:
    """Give every weight of sft module `name` a dense Δ (LT-SFT's first phase); its parameters change.

    A module in this state is saved by training checkpoints (resumed in place), not as a module
    that `mm.load` can read: `select` first.
    """
    units, config = _sft_module(mm, name)
    for _, unit in units:
        unit.densify()
    mm.records[name].config = config.replace(sizes=None)


def select(mm: ModularModel, name: str, k: int | None = None, *, reset: bool = True) -> None:
    """Keep the global top-k entries of module `name`'s dense Δ by |Δ| (LT-SFT's selection).

    Afterwards each weight holds its share of the k entries as `indices` and `values` (new
    Parameters: build a new optimizer), and the module's config records k and the shares.

    Args:
        k: entries to keep (default: the config's `k`, or its `density` × the targeted entries).
        reset: start the values at zero (LT-SFT: retrain from the base); False keeps Δ's values.

    Raises:
        ValueError: the module is not in its dense phase (`dense`), or k is out of range.
    """
    units, config = _sft_module(mm, name)
    if any(unit.is_sparse for _, unit in units):
        raise ValueError(f"module '{name}' has no dense delta to select from; call dense() and train first")
    k = config.count(sum(unit.numel for _, unit in units)) if k is None else k
    with torch.no_grad():
        deltas = [unit.dense_part().detach() for _, unit in units]
        picks = top_k([d.abs() for d in deltas], k)
        for (_, unit), delta, chosen in zip(units, deltas, picks, strict=True):
            values = torch.zeros(chosen.numel()) if reset else delta.reshape(-1)[chosen]
            unit.sparsify(chosen, values)
    mm.records[name].config = config.replace(k=k, density=None, sizes=tuple(p.numel() for p in picks))


def _sft_module(mm: ModularModel, name: str) -> tuple[list[tuple[str, SparseDiffUnit]], SftConfig]:
    units, config = ordered_units(mm, name), mm.records[name].config
    if not isinstance(config, SftConfig):
        raise ValueError(f"module '{name}' is a {config.method} module, not an sft one")
    return units, config


@register_method(
    "sft",
    SparseDiffUnit,
    "sparse fine-tuning: a sparse diff of k weight entries, lottery-ticket (LT-SFT, Ansell et al. 2022) "
    "or random; mergeable, composable by summing",
)
@dataclass(frozen=True)
class SftConfig(ModuleConfig):
    """Sparse fine-tuning settings.

    Attributes:
        selection: "lottery" (LT-SFT: dense phase, global top-k by |Δ|, reset, sparse phase) or
            "random" (k random entries, no dense phase).
        density: k as a fraction of the targeted weights' entries (ignored when `k` is given).
        k: the exact number of entries.
        full_ft_steps: steps of the dense phase (None: as many as the sparse phase, the run's
            steps or epochs).
        full_ft_lr: peak learning rate of the dense phase (None: the run's).
        targets: projection roles (`query`, `ffn_out`, ...), module-name suffixes, `re:<regex>` or
            `all-linear` (default: every projection of the layer stacks).
        layers: only these layer indices (None: every layer).
        seed: seeds the random entries (`random`, and a `lottery` module's entries before selection).
        sizes: entries per targeted weight, in model order; written by the selection (users leave
            it None), so that a saved module loads with the right shapes.
    """

    selection: Selection = "lottery"
    density: float | None = 0.01
    k: int | None = None
    full_ft_steps: int | None = None
    full_ft_lr: float | None = None
    targets: tuple[str, ...] = ("all-linear",)
    layers: tuple[int, ...] | None = None
    seed: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check(self.selection in get_args(Selection), "sft", "selection", f"use one of {get_args(Selection)}")
        check(self.k is None or self.k >= 1, "sft", "k", f"must be >= 1, got {self.k}")
        if self.k is not None:
            object.__setattr__(self, "density", None)  # k decides; the card shows one of the two
        check(self.density is not None or self.k is not None, "sft", "density", "give density or k")
        check(
            self.density is None or 0 < self.density <= 1,
            "sft",
            "density",
            f"must be in (0, 1], got {self.density}",
        )
        for field in ("full_ft_steps", "full_ft_lr"):
            value = getattr(self, field)
            check(value is None or value > 0, "sft", field, f"must be > 0 or None, got {value}")
        check(len(self.targets) > 0, "sft", "targets", "name at least one projection")
        check(self.sizes is None or min(self.sizes, default=0) >= 0, "sft", "sizes", "counts must be >= 0")

    def count(self, total: int) -> int:
        """k for weights holding `total` entries.

        Raises:
            ConfigError: k is more than the weights hold.
        """
        k = self.k if self.k is not None else max(1, int((self.density or 0.0) * total))
        check(k <= total, "sft", "k", f"{k} entries asked, but the targeted weights hold only {total}")
        return k

    def build(self, view: ModelView) -> list[Attachment]:
        """One `SparseDiffUnit` per targeted projection, holding its share of the k entries."""
        paths = view.projections(self.targets, self.layers)
        shapes = [tuple(weight_of(view.module(p)).shape) for p in paths]
        numels = [math.prod(s) for s in shapes]
        if self.sizes is not None:
            check(
                len(self.sizes) == len(paths),
                "sft",
                "sizes",
                f"{len(self.sizes)} counts for the {len(paths)} weights the targets name on this model",
            )
            sizes = list(self.sizes)
        else:
            sizes = split_count(self.count(sum(numels)), numels)
        generator = torch.Generator().manual_seed(self.seed)
        attachments = []
        for path, shape, numel, size in zip(paths, shapes, numels, sizes, strict=True):
            check(size <= numel, "sft", "sizes", f"{size} entries for {path}, which has {numel}")
            unit = SparseDiffUnit(shape, projection_shape(view.module(path))[2], size)
            if self.sizes is None:  # before selection: random entries (a lottery module replaces them)
                unit.sparsify(random_indices(numel, size, generator), torch.zeros(size))
            attachments.append(Attachment(path, unit))
        return attachments

    def fit(self, mm: ModularModel, name: str, run: Callable[..., TrainResult]) -> None:
        """LT-SFT in one training run: dense phase, selection, reset, sparse phase.

        A `random` module, or one already selected (`sizes` set), trains in one plain run.
        """
        if self.selection != "lottery" or self.sizes is not None:
            run()
            return
        head = mm.head_module(name)
        head_start = {k: v.detach().clone() for k, v in head.state_dict().items()} if head else None
        dense(mm, name)
        overrides: dict[str, Any] = {} if self.full_ft_lr is None else {"lr": self.full_ft_lr}
        if self.full_ft_steps is not None:
            overrides.update(steps=self.full_ft_steps, epochs=None)
        first = run(phase="dense", **overrides)
        if first.step < first.total_steps:
            return  # stopped early (stop_after_steps): select once the dense phase is complete
        select(mm, name)
        if head is not None and head_start is not None:
            head.load_state_dict(head_start)  # composable-sft resets every trained parameter
        run(phase="sparse")
