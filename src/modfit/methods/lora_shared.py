"""One down-projection for the LoRA units of sibling projections that read the same input (inference).

Why: a LoRA branch's down-projection x Aᵀ reads the whole input x, (tokens, in), to produce r columns.
On a CPU that read of x, not the r columns' arithmetic, is most of its cost: the product onto 2r
columns takes about what the one onto r does (`bench/lora_overhead.py --pieces` separates LoRA's
pieces in a model's forward; the down-projection is the larger one). Query and value, or query, key
and value, are called on the same hidden states, so with LoRA on each of them the model reads x once
per group instead of once per projection::

    both = x [A_1; ...; A_k]ᵀ                (..., r_1 + ... + r_k)
    x A_iᵀ = both[..., r_1 + ... + r_{i-1} : ... + r_i]     (a view: no copy)

The units are grouped by the model (`siblings.py`: LoRA units running alone at children of one
parent module). Only in inference, on the site's in-place path (`SiteCall.writable`: no gradient
recorded, a lone unit, plain tensors), in eval mode (no dropout mask to share) and outside
`torch.compile`: every other call computes its own product as before.

The first unit of a group to run computes the product for all units whose A reads the same width in
the same dtype and device, and keeps the others' columns with a weak reference to the input they
came from (nothing is kept alive) and version counters of that input and of each A. A unit uses
kept columns only if its input is that very tensor and its A the same tensor, both unchanged since
(a tensor made under `torch.inference_mode` has no counter: there identity alone decides);
otherwise (a cross-attention's query reads other states than its key and value; a unit called on
its own) it computes the group's product for its own input, at about the cost of its own product.
Each unit's columns are handed out once; the keeping ends with the last.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..siblings import SiblingGroup
    from .lora import LoraUnit

# the group scratch attribute: (weakref to x, x's version, {unit: (its columns, its A, A's version)})
_KEY = "lora_down"


def shared_down_projection(unit: LoraUnit, x: torch.Tensor, group: SiblingGroup) -> torch.Tensor:
    """x A_unitᵀ, shape (..., r), from the product of x with the stacked A of `unit`'s group."""
    a = unit.lora_A
    if torch.compiler.is_compiling():  # a weak reference and thread-local state are not for tracing
        return F.linear(x.to(a.dtype), a)
    scratch = group.scratch.__dict__
    kept = scratch.get(_KEY)
    if kept is not None and kept[0]() is x and kept[1] == _version(x):
        columns, source_a, version = kept[2].pop(unit, (None, None, None))
        if not kept[2]:
            del scratch[_KEY]
        if columns is not None and source_a is a and version == _version(a):
            out: torch.Tensor = columns
            return out
    siblings = cast("tuple[LoraUnit, ...]", group.units)
    units = [u for u in siblings if _same_input(u.lora_A, a)]  # unit itself among them
    both = F.linear(x.to(a.dtype), torch.cat([u.lora_A for u in units]))  # (..., Σ r)
    parts = both.split([u.lora_A.shape[0] for u in units], dim=-1)
    others: dict[Any, tuple[torch.Tensor, torch.Tensor, int | None]] = {
        u: (part, u.lora_A, _version(u.lora_A)) for u, part in zip(units, parts, strict=True) if u is not unit
    }
    if others:
        scratch[_KEY] = (weakref.ref(x), _version(x), others)
    else:
        scratch.pop(_KEY, None)
    return parts[units.index(unit)]


def _version(t: torch.Tensor) -> int | None:
    """t's in-place-change counter; None for a tensor made under `torch.inference_mode`, which has
    none (there identity is the check: nothing in a forward rewrites a projection's input between
    its sibling projections)."""
    return None if t.is_inference() else t._version


def _same_input(a: torch.Tensor, reference: torch.Tensor) -> bool:
    return a.shape[1] == reference.shape[1] and a.dtype == reference.dtype and a.device == reference.device
