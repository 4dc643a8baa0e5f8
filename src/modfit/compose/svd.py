"""LoRA re-ranking: a dense weight delta -> rank-r factors by truncated SVD.

    ΔW = U S Vᵀ                         (out, in), singular values S descending
    B  = U[:, :r] · √S[:r]              (out, r)
    A  = √S[:r] · Vᵀ[:r]                (r, in)          so  B A = best rank-r approximation of ΔW

By Eckart–Young the Frobenius error is √(Σ_{j>r} S_j²), and it is 0 when r is at least the rank of
ΔW: two rank-8 LoRAs summed have a delta of rank ≤ 16, and r = 16 stores their sum exactly. The
singular values are split evenly between B and A (√S on each), so neither factor dominates if the
module is trained further. The new module's scale is 1 (alpha = r), so s · B A = B A.

`lora_rank(deltas)` picks the smallest r that keeps every delta exactly (up to float tolerance):
the largest numerical rank among them. Merges that change every entry (TIES, DARE) give deltas of
nearly full rank; pass a rank to compress them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..config import ModuleConfig
from ..heads import HeadConfig
from ..methods.lora import LoraConfig, LoraUnit
from ..model import ModularModel
from ..targets import ModelView, is_projection
from .merging import MergeError

# Singular values below this fraction of the largest (and of the matrix size times float32's
# epsilon) are rounding noise, not rank.
RANK_RTOL = 1e-5


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in) with B A the best rank-r approximation of `delta` (out, in).

    Computed in float64 (float32 for larger matrices would do; the deltas of a module are small).
    When r exceeds min(out, in) the extra rows and columns are zero.
    """
    out_features, in_features = delta.shape
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)  # (out,k) (k,) (k,in)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(out_features, rank, dtype=torch.float64)
    a = torch.zeros(rank, in_features, dtype=torch.float64)
    b[:, :k] = u[:, :k] * root  # (out, k)
    a[:k] = root[:, None] * vh[:k]  # (k, in)
    return b.to(delta.dtype), a.to(delta.dtype)


def numerical_rank(delta: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """The number of singular values above `rtol` × the largest (0 for a zero matrix)."""
    s = torch.linalg.svdvals(delta.to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * rtol).sum())


def lora_rank(deltas: Mapping[str, torch.Tensor]) -> int:
    """The rank that keeps every delta: the largest numerical rank, at least 1."""
    return max([1, *(numerical_rank(d) for d in deltas.values())])


def add_lora_from_deltas(
    mm: ModularModel,
    name: str,
    deltas: Mapping[str, torch.Tensor],
    head: HeadConfig | None = None,
    *,
    rank: int | None = None,
    like: Sequence[ModuleConfig] = (),
) -> None:
    """Add a LoRA module `name` whose s·B A approximates each weight delta (exact at full rank).

    Args:
        deltas: "<site path>.weight" -> ΔW in the base weight's layout ((in, out) for Conv1D).
        rank: r (None: `lora_rank(deltas)`, lossless).
        like: source configs; the first whose targets and layers name exactly these sites lends
            them to the new card (else the site paths themselves are the targets).

    Raises:
        MergeError: a delta is not a projection's weight (a bias, a norm) or its site is not a projection.
    """
    paths = []
    for key in deltas:
        path, param = key.rsplit(".", 1)
        module = mm.view.module(path)
        if param != "weight" or not is_projection(module):
            raise MergeError(
                f"to='lora' stores changes of projection weights; the merge also changes {param} of "
                f"{path or 'the model'}, which a LoRA module cannot hold (use to='full', or to='same' "
                "for modules of one method)"
            )
        paths.append(path)
    r = lora_rank(deltas) if rank is None else rank
    if r < 1:
        raise MergeError(f"rank must be >= 1, got {r}")
    targets, layers = _targets(mm.view, paths, like)
    config = LoraConfig(r=r, alpha=float(r), targets=targets, layers=layers)
    mm.add(name, config, head)
    with torch.no_grad():
        for path, unit in mm.units(name):
            assert isinstance(unit, LoraUnit)
            delta = deltas[f"{path}.weight"]
            delta = delta.t() if unit.fan_in_fan_out else delta  # factor the (out, in) matrix
            b, a = lora_factors(delta.to(unit.lora_A.dtype), r)
            unit.lora_B.copy_(b / unit.scale)  # scale is alpha / r = 1
            unit.lora_A.copy_(a)


def _targets(
    view: ModelView, paths: Sequence[str], like: Sequence[ModuleConfig]
) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    wanted = set(paths)
    for config in like:
        targets, layers = getattr(config, "targets", None), getattr(config, "layers", None)
        if not targets:
            continue
        try:
            if set(view.projections(targets, layers)) == wanted:
                return tuple(targets), layers
        except ValueError:  # a target that names nothing here
            continue
    return tuple(p for p in view.projections(paths)), None
