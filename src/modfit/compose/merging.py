"""Merge formulas on task vectors: small pure functions over dicts of tensors.

A *task vector* τ is what a module changes, as a dict name -> tensor (`merge_modules` uses the
dense deltas of the base parameters, keyed "<site path>.<param>", or a module's own parameters).
A key missing from one vector is a zero there. Every formula below returns the merged vector τ*;
the merged model is θ0 + τ* (EWR returns θ* itself). Weights w_i (λ_i) default to 1 each.

====================  ===========================================================================
linear                τ* = Σ w_i τ_i / Σ w_i                       (weighted average; model soups)
task_arithmetic       τ* = Σ λ_i τ_i; λ < 0 removes a task           (Ilharco et al. 2023)
ties                  trim each τ_i to its top-k by |·|, elect the sign γ = sgn(Σ w_i τ̂_i), average
                      the entries that agree with γ: τ* = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i
                                                                     (Yadav et al. 2023)
dare_linear           τ̃_i = m_i ⊙ τ_i / (1 − p), m_i ~ Bernoulli(1 − p); τ* = Σ w_i τ̃_i
                                                                     (Yu et al. 2024)
dare_ties             DARE instead of the trim, then TIES' election and disjoint mean
magnitude_prune       trim each τ_i to its top-k by |·| (no election); τ* = Σ w_i τ̂_i
fisher                τ* = Σ λ_i F_i τ_i / Σ λ_i F_i                (Matena & Raffel 2022)
ewr                   θ* = (λ0 F0 θ0 + Σ λ_i F_i τ_i) / (λ0 F0 + Σ |λ_i| F_i), λ_i < 0: anti-expert
                                                                     (Daheim et al. 2024)
====================  ===========================================================================

`scale` multiplies every result (TIES' λ). `density` is the fraction kept: TIES' k (the paper's
top-k%), DARE's 1 − p. Trimming counts the entries a tensor *changes* (its non-zeros): on a dense
τ that is the paper's k% of all entries; on a sparse diff (sft) it keeps k% of the changed entries,
where k% of all entries would keep every one of them. The paper trims over the whole task vector
at once; here each tensor is trimmed on its own, as mergekit and PEFT do, so that a module's small
tensors (biases next to weight deltas) are not wiped out by its large ones.

Fisher merging with F_i = F for every i is the weighted average `linear` (Matena & Raffel §2).
Fisher values are floored at `fisher_floor` (1e-6, as EWR's released code does), so a
parameter no example moved is averaged rather than divided by zero. For EWR the normaliser takes
|λ_i|: the anti-expert's vector enters negated with a positive weight, as in the EWR code
(ndaheim/faithful-dialogue, `MakeAndApplyTaskVectorsEWRJob`); with λ_i in Z it could be zero.
Note that EWR combines θ0 with the task vectors themselves (a Gaussian around −τ for an
anti-expert), not with θ0 + τ_i: where F_i dominates F0 the parameter tends to the vector, not to
θ0 − τ_i. That is the paper's formula, kept as published.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

TaskVector = Mapping[str, torch.Tensor]


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the module, site or setting."""


# -- one tensor at a time ---------------------------------------------------------------------------


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k entries of largest magnitude, zero the rest.

    k = max(1, int(density · n)) with n the non-zero entries (0 when there are none).
    """
    flat = tensor.reshape(-1)
    nonzero = int(torch.count_nonzero(flat))
    k = max(1, int(density * nonzero)) if nonzero else 0
    if k >= nonzero:
        return tensor.clone()
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(tensor)


def elect_sign(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election: γ = sgn(Σ_i w_i τ̂_i), per entry (0 where the sum is 0)."""
    return torch.sign(_weighted_sum(tensors, weights))


def disjoint_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor
) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the w-weighted mean over the τ̂_i whose sign equals γ.

    Entries where no τ̂_i agrees (γ = 0, or every τ̂_i zero) are 0. With equal weights this is the
    paper's 1/|A| Σ_{i∈A} τ̂_i.
    """
    total = torch.zeros_like(tensors[0])
    count = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        agrees = (torch.sign(t) == sign) & (t != 0)
        total = total + torch.where(agrees, t * w, 0.0)
        count = count + agrees.to(t.dtype) * w
    return torch.where(count != 0, total / torch.where(count != 0, count, 1.0), 0.0)


def dare(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability p = 1 − density, rescale the rest by 1 / (1 − p).

    The draw comes from `generator` (on the CPU), so a seed fixes it; E[dare(τ)] = τ.
    """
    if density >= 1.0:
        return tensor.clone()
    keep = torch.rand(tensor.shape, generator=generator) < density  # Bernoulli(1 - p) per entry
    return torch.where(keep.to(tensor.device), tensor / density, 0.0)


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        total = total + t * w
    return total


# -- whole task vectors ------------------------------------------------------------------------------


def _keys(vectors: Sequence[TaskVector]) -> list[str]:
    """Every key of the vectors, first-seen order."""
    return list(dict.fromkeys(k for v in vectors for k in v))


def _aligned(vectors: Sequence[TaskVector], key: str) -> list[torch.Tensor]:
    """The vectors' tensors for `key`, a zero where a vector lacks it."""
    reference = next(v[key] for v in vectors if key in v)
    return [v[key] if key in v else torch.zeros_like(reference) for v in vectors]


def _check_weights(vectors: Sequence[TaskVector], weights: Sequence[float] | None) -> list[float]:
    if not vectors:
        raise MergeError("nothing to merge: give at least one task vector")
    if weights is None:
        return [1.0] * len(vectors)
    if len(weights) != len(vectors):
        raise MergeError(f"{len(weights)} weights for {len(vectors)} modules: give one weight per module")
    return [float(w) for w in weights]


def linear(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average τ* = Σ w_i τ_i / Σ w_i.

    Raises:
        MergeError: the weights sum to 0.
    """
    w = _check_weights(vectors, weights)
    total = sum(w)
    if total == 0:
        raise MergeError(f"linear: the weights {w} sum to 0; an average needs a non-zero sum")
    return {k: _weighted_sum(_aligned(vectors, k), w) / total for k in _keys(vectors)}


def task_arithmetic(
    vectors: Sequence[TaskVector], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """τ* = Σ λ_i τ_i. λ_i < 0 negates a task (forgetting); τ and −τ cancel exactly."""
    w = _check_weights(vectors, weights)
    return {k: _weighted_sum(_aligned(vectors, k), w) for k in _keys(vectors)}


def _positive(weights: list[float], method: str) -> None:
    if any(w <= 0 for w in weights):
        raise MergeError(
            f"{method}: weights must be > 0 (got {weights}); the sign election and disjoint mean "
            "have no meaning for a negated task; use task_arithmetic or fisher with base_weight"
        )


def ties(
    vectors: Sequence[TaskVector], weights: Sequence[float] | None = None, *, density: float = 0.2
) -> dict[str, torch.Tensor]:
    """TIES-merging: trim, elect sign, disjoint mean (see `trim`, `elect_sign`, `disjoint_mean`)."""
    w = _check_weights(vectors, weights)
    _positive(w, "ties")
    out = {}
    for key in _keys(vectors):
        trimmed = [trim(t, density) for t in _aligned(vectors, key)]
        out[key] = disjoint_mean(trimmed, w, elect_sign(trimmed, w))
    return out


def dare_linear(
    vectors: Sequence[TaskVector],
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.5,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """DARE on each τ_i (keys in sorted order, vectors in order), then τ* = Σ w_i τ̃_i."""
    w = _check_weights(vectors, weights)
    dropped = _dare_all(vectors, density, generator)
    return {k: _weighted_sum(_aligned(dropped, k), w) for k in _keys(vectors)}


def dare_ties(
    vectors: Sequence[TaskVector],
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.5,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """DARE on each τ_i (as `dare_linear`), then TIES' sign election and disjoint mean (no trim)."""
    w = _check_weights(vectors, weights)
    _positive(w, "dare_ties")
    dropped = _dare_all(vectors, density, generator)
    out = {}
    for key in _keys(vectors):
        tensors = _aligned(dropped, key)
        out[key] = disjoint_mean(tensors, w, elect_sign(tensors, w))
    return out


def _dare_all(
    vectors: Sequence[TaskVector], density: float, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    # A fixed order of draws: by key (sorted), then by vector, so a seed gives one result.
    dropped: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key in sorted(_keys(vectors)):
        for i, vector in enumerate(vectors):
            if key in vector:
                dropped[i][key] = dare(vector[key], density, generator)
    return dropped


def magnitude_prune(
    vectors: Sequence[TaskVector], weights: Sequence[float] | None = None, *, density: float = 0.2
) -> dict[str, torch.Tensor]:
    """Trim each τ_i to its top-k by magnitude (`trim`), then τ* = Σ w_i τ̂_i."""
    w = _check_weights(vectors, weights)
    return {k: _weighted_sum([trim(t, density) for t in _aligned(vectors, k)], w) for k in _keys(vectors)}


def _fisher_for(fishers: Sequence[TaskVector], i: int, key: str, floor: float) -> torch.Tensor:
    try:
        return fishers[i][key].clamp_min(floor)
    except KeyError:
        raise MergeError(f"fisher: module {i + 1} has no Fisher values for {key}") from None


def fisher(
    vectors: Sequence[TaskVector],
    fishers: Sequence[TaskVector],
    weights: Sequence[float] | None = None,
    *,
    fisher_floor: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Fisher-weighted average τ* = Σ λ_i F_i τ_i / Σ λ_i F_i (F floored at `fisher_floor`).

    A vector without `key` takes no part in that key's average (its F_i is unknown there).

    Raises:
        MergeError: a weight <= 0 (an anti-expert needs `ewr`), or a Fisher missing for a key.
    """
    w = _check_weights(vectors, weights)
    if len(fishers) != len(vectors):
        raise MergeError(f"fisher: {len(fishers)} Fisher sets for {len(vectors)} modules")
    if any(x <= 0 for x in w):
        raise MergeError(
            f"fisher: weights must be > 0 (got {w}); to remove an anti-expert use Elastic Weight "
            "Removal (a base weight λ0 with the base Fisher)"
        )
    out = {}
    for key in _keys(vectors):
        present = [i for i, v in enumerate(vectors) if key in v]
        numerator: torch.Tensor | None = None
        normaliser: torch.Tensor | None = None
        for i in present:
            f = w[i] * _fisher_for(fishers, i, key, fisher_floor)  # λ_i F_i
            term = f * vectors[i][key]
            numerator = term if numerator is None else numerator + term
            normaliser = f if normaliser is None else normaliser + f
        assert numerator is not None and normaliser is not None  # every key has a vector
        out[key] = numerator / normaliser
    return out


def ewr(
    theta0: TaskVector,
    fisher0: TaskVector,
    vectors: Sequence[TaskVector],
    fishers: Sequence[TaskVector],
    weights: Sequence[float] | None = None,
    *,
    base_weight: float = 1.0,
    fisher_floor: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Elastic Weight Removal: θ* = (λ0 F0 θ0 + Σ λ_i F_i τ_i) / (λ0 F0 + Σ |λ_i| F_i).

    Args:
        theta0, fisher0: the base parameters and their Fisher, for every key of the vectors.
        vectors, fishers: task vectors and their Fishers; weights: λ_i, negative for an anti-expert.
        base_weight: λ0 > 0.

    Returns:
        θ* (parameters, not a task vector) for every key of the vectors.

    Raises:
        MergeError: λ0 <= 0, or θ0 / F0 / F_i missing for a key.
    """
    w = _check_weights(vectors, weights)
    if base_weight <= 0:
        raise MergeError(f"ewr: the base weight λ0 must be > 0, got {base_weight}")
    if len(fishers) != len(vectors):
        raise MergeError(f"ewr: {len(fishers)} Fisher sets for {len(vectors)} modules")
    out = {}
    for key in _keys(vectors):
        if key not in theta0 or key not in fisher0:
            raise MergeError(f"ewr: no base parameter or base Fisher for {key}")
        f0 = base_weight * fisher0[key].clamp_min(fisher_floor)
        numerator = f0 * theta0[key]
        normaliser = f0.clone()
        for i, vector in enumerate(vectors):
            if key in vector:
                f = _fisher_for(fishers, i, key, fisher_floor)
                numerator = numerator + w[i] * f * vector[key]
                normaliser = normaliser + abs(w[i]) * f
        out[key] = numerator / normaliser
    return out


# -- the registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: a registered method and its settings (validated here).

    Attributes:
        method: a name in `merge_methods()`.
        weights: one w_i / λ_i per module (None: 1 each).
        density: fraction kept by ties / magnitude_prune (default 0.2) and dare_* (default 0.5).
        scale: multiplies the merged task vector (TIES' λ).
        seed: seeds DARE's drop.
        base_weight: λ0 of Elastic Weight Removal (method fisher); None: Matena & Raffel's average.
        fisher_floor: the smallest Fisher value used.
    """

    method: str = "linear"
    weights: tuple[float, ...] | None = None
    density: float | None = None
    scale: float = 1.0
    seed: int = 0
    base_weight: float | None = None
    fisher_floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise MergeError(f"unknown merge method '{self.method}'; available: {', '.join(merge_methods())}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not all(math.isfinite(w) for w in self.weights):
                raise MergeError(f"weights must be finite numbers, got {list(self.weights)}")
        if self.density is not None and not 0 < self.density <= 1:
            raise MergeError(f"density must be in (0, 1], got {self.density}")
        if self.density is not None and not _METHODS[self.method].uses_density:
            raise MergeError(
                f"{self.method} takes no density (ties, dare_linear, dare_ties and magnitude_prune do)"
            )
        if not math.isfinite(self.scale):
            raise MergeError(f"scale must be a finite number, got {self.scale}")
        if self.base_weight is not None and self.method != "fisher":
            raise MergeError("a base weight (λ0, Elastic Weight Removal) goes with method fisher only")
        if self.base_weight is not None and not self.base_weight > 0:
            raise MergeError(f"the base weight λ0 must be > 0, got {self.base_weight}")
        if not self.fisher_floor > 0:
            raise MergeError(f"fisher_floor must be > 0, got {self.fisher_floor}")

    @property
    def needs_fisher(self) -> bool:
        return self.method == "fisher"

    @property
    def is_ewr(self) -> bool:
        return self.base_weight is not None


@dataclass(frozen=True)
class FisherInputs:
    """What Fisher merging reads: one Fisher dict per vector; for EWR also θ0 and F0."""

    fishers: Sequence[TaskVector]
    theta0: TaskVector | None = None
    fisher0: TaskVector | None = None


MergeFn = Callable[[Sequence[TaskVector], MergeSpec, "FisherInputs | None"], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Entry:
    fn: MergeFn
    uses_density: bool
    summary: str


_METHODS: dict[str, _Entry] = {}


def register_merge_method(
    name: str, summary: str, *, uses_density: bool = False
) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering `fn(vectors, spec, fisher_inputs) -> merged` under `name`."""

    def decorate(fn: MergeFn) -> MergeFn:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"merge method '{name}' is already registered")
        _METHODS[name] = _Entry(fn, uses_density, summary)
        return fn

    return decorate


def merge_methods() -> dict[str, str]:
    """Registered merge method name -> one-line summary, sorted by name."""
    return {name: _METHODS[name].summary for name in sorted(_METHODS)}


def merge(
    vectors: Sequence[TaskVector], spec: MergeSpec, fisher_inputs: FisherInputs | None = None
) -> dict[str, torch.Tensor]:
    """Run `spec.method` on the task vectors and multiply by `spec.scale`.

    For EWR (`spec.base_weight`) the result is θ* − θ0, a task vector like every other method's.
    """
    merged = _METHODS[spec.method].fn(vectors, spec, fisher_inputs)
    if spec.scale != 1.0:
        merged = {k: v * spec.scale for k, v in merged.items()}
    return merged


def _generator(spec: MergeSpec) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed)


@register_merge_method("linear", "weighted average Σ w_i τ_i / Σ w_i")
def _linear(
    vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None
) -> dict[str, torch.Tensor]:
    return linear(vectors, spec.weights)


@register_merge_method("task_arithmetic", "θ0 + Σ λ_i τ_i; negative λ removes a task (Ilharco et al. 2023)")
def _task_arithmetic(
    vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None
) -> dict[str, torch.Tensor]:
    return task_arithmetic(vectors, spec.weights)


@register_merge_method(
    "ties", "trim to top-k by magnitude, elect sign, disjoint mean (Yadav et al. 2023)", uses_density=True
)
def _ties(vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None) -> dict[str, torch.Tensor]:
    return ties(vectors, spec.weights, density=0.2 if spec.density is None else spec.density)


@register_merge_method(
    "dare_linear",
    "drop with probability p, rescale by 1/(1-p), then Σ w_i τ_i (Yu et al. 2024)",
    uses_density=True,
)
def _dare_linear(
    vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None
) -> dict[str, torch.Tensor]:
    density = 0.5 if spec.density is None else spec.density
    return dare_linear(vectors, spec.weights, density=density, generator=_generator(spec))


@register_merge_method("dare_ties", "DARE's drop and rescale, then TIES' sign election", uses_density=True)
def _dare_ties(
    vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None
) -> dict[str, torch.Tensor]:
    density = 0.5 if spec.density is None else spec.density
    return dare_ties(vectors, spec.weights, density=density, generator=_generator(spec))


@register_merge_method(
    "magnitude_prune", "trim each to top-k by magnitude, then Σ w_i τ_i", uses_density=True
)
def _magnitude_prune(
    vectors: Sequence[TaskVector], spec: MergeSpec, _: FisherInputs | None
) -> dict[str, torch.Tensor]:
    return magnitude_prune(vectors, spec.weights, density=0.2 if spec.density is None else spec.density)


@register_merge_method(
    "fisher",
    "Fisher-weighted average (Matena & Raffel 2022); with a base weight λ0, Elastic Weight Removal "
    "(Daheim et al. 2024)",
)
def _fisher(
    vectors: Sequence[TaskVector], spec: MergeSpec, inputs: FisherInputs | None
) -> dict[str, torch.Tensor]:
    if inputs is None:
        raise MergeError("fisher: no Fisher values given; compute them first (modfit fisher)")
    if spec.base_weight is None:
        return fisher(vectors, inputs.fishers, spec.weights, fisher_floor=spec.fisher_floor)
    if inputs.theta0 is None or inputs.fisher0 is None:
        raise MergeError("Elastic Weight Removal needs the base parameters θ0 and their Fisher F0")
    theta = ewr(
        inputs.theta0,
        inputs.fisher0,
        vectors,
        inputs.fishers,
        spec.weights,
        base_weight=spec.base_weight,
        fisher_floor=spec.fisher_floor,
    )
    return {k: v - inputs.theta0[k] for k, v in theta.items()}
