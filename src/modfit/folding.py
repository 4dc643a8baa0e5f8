"""Folding a unit into one inference call of its projection: the weight with the unit's change in it,
computed for that call alone, while the module stays unmerged.

Why: an unmerged LoRA branch costs two thin products per call, x Aᵀ (tokens × in × r multiply-adds)
and (x Aᵀ)(s B)ᵀ added into the output (tokens × r × out), each bound by memory traffic over a
(tokens, in) or (tokens, out) tensor rather than by arithmetic. Forming the folded weight costs
in × r × out multiply-adds and one pass over an (out, in) matrix, whatever the number of tokens::

    unmerged:  y = x Wᵀ + b + s (x Aᵀ) Bᵀ        ~ tokens · r · (in + out)
    folded:    W' = W + s B A,  y = x W'ᵀ + b    ~ in · out · r, then the base product as before

so from a few hundred tokens up (a batch rather than a decoding step) the folded call is the cheaper
one (`bench/peers.py --parts overhead --variants unfolded` times both ways in a model). Nothing is
written into the model: W' is a new tensor that lives for one product, so switching, stacking and
removing modules cost what they did.

How: a site whose lone unit can fold (`Unit.folds_per_call`) offers W' from a forward pre-hook on the
watched `nn.Linear` (`Site._on_input`), only where no gradient is recorded, the site's hooks are the
module's only ones and modfit's `CpuKernels` mode, which sees every `F.linear`, is active with
folding on (`ModularModel.fold_per_call`, the model in eval, some site of it able to fold). The
mode's `F.linear` route (`route` here) takes the offer when the call's weight is the offered
module's own weight, and keeps the output it produced; the site's output hook then finds that output
(`settle`) and leaves it as it is. An offer nobody took (another code path ran) is dropped there and
the unit runs as usual; one left by a forward that raised is dropped when the mode exits (`clear`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

SWITCH = "_modfit_fold_per_call"  # the model attribute `cpu_kernels` reads (ModularModel.fold_per_call)
ARMED = "_modfit_folds"  # the model attribute saying whether any site may fold (set at each activation)

Route = Callable[[dict[str, Any]], torch.Tensor | None]


class _Slot(threading.local):
    """This thread's one offer: a projection call does not nest another one."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None  # the projection's own weight, as its forward reads it
        self.folded: torch.Tensor | None = None  # W' for that call, until the product takes it
        self.output: torch.Tensor | None = None  # what the product with W' returned


_slot = _Slot()


def offer(weight: torch.Tensor, folded: torch.Tensor) -> None:
    """Have the next `F.linear` on `weight` in this thread use `folded` instead (same shape)."""
    _slot.weight, _slot.folded, _slot.output = weight, folded, None


def settle() -> torch.Tensor | None:
    """End the current offer: the output computed with the folded weight, or None if none was."""
    output = _slot.output
    clear()
    return output


def clear() -> None:
    """Drop any offer of this thread (taken or not)."""
    _slot.weight = _slot.folded = _slot.output = None


def route(call: dict[str, Any], inner: Route | None) -> torch.Tensor | None:
    """An `F.linear` call (arguments by name) with the offered weight if it is for this weight, through
    `inner` (modfit's own product, or None for torch's); None where torch runs it unchanged."""
    folded = _slot.folded
    if folded is None or call.get("weight") is not _slot.weight:
        return None if inner is None else inner(call)
    _slot.folded = None  # taken once
    call = {**call, "weight": folded}
    out = None if inner is None else inner(call)
    if out is None:
        out = F.linear(call["input"], folded, call.get("bias"))
    _slot.output = out
    return out
