"""modfit's CPU kernels in a forward: a `TorchFunctionMode` routes the frozen base model's
torch calls to them, with no change to the model's classes or forward code.

| torch call                                    | kernel                | switch (on by default)        |
|-----------------------------------------------|-----------------------|-------------------------------|
| `F.dropout`, `F.scaled_dot_product_attention` | `modfit.fast_dropout` | `ModularModel.fast_dropout`   |
| (only attention with dropout)                 |                       |                               |
| `F.linear` in float32                         | `modfit.fast_linear`  | `ModularModel.fast_linear`    |
| `F.linear` of a projection whose unit folds   | `modfit.folding`      | `ModularModel.fold_per_call`  |
| into this call's weight (inference)           |                       |                               |

Each kernel keeps to CPU tensors (folding, which adds no product of its own, applies on any device)
and hands any call it does not cover back to torch; every other torch call passes through
untouched. `install(model, entries)` enters the mode around the forward of the modules a caller may
call first, reading the switches at each call: both kernels while the model trains, the linear one
and folding in eval (dropout is off there), and none of them

- while `torch.compile` traces the model (inductor chooses its own kernels);
- nor in training with activation checkpointing: the recomputation in backward runs outside the
  mode, so it would draw torch's dropout masks instead of the ones drawn here, and torch's `F.linear`
  saves other tensors for backward than `fast_linear` does, which checkpointing's check refuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from . import fast_dropout, fast_linear, folding
from .base import is_checkpointing

Route = Callable[[dict[str, Any]], torch.Tensor | None]  # a call's arguments by name -> result, or None
_ARGS: dict[Callable[..., Any], tuple[str, ...]] = {  # each routed function's parameters, in order
    F.dropout: ("input", "p", "training", "inplace"),
    F.scaled_dot_product_attention: (
        *("query", "key", "value", "attn_mask"),
        *("dropout_p", "is_causal", "scale", "enable_gqa"),
    ),
    F.linear: ("input", "weight", "bias"),
}


class CpuKernels(TorchFunctionMode):
    """Routes `F.dropout` and SDPA with dropout (if `dropout`) and `F.linear` (if `linear`) to modfit's
    kernels, and (if `fold`) gives an `F.linear` the weight a site offered for it (`folding.py`);
    every other call, and any routed call a kernel does not cover, runs as without the mode."""

    def __init__(self, dropout: bool = True, linear: bool = True, fold: bool = False) -> None:
        super().__init__()
        self.routes: dict[Callable[..., Any], Route] = {}
        self.fold = fold
        if dropout:
            self.routes[F.dropout] = fast_dropout.route_dropout
            self.routes[F.scaled_dot_product_attention] = fast_dropout.route_attention
        if fold:
            self.routes[F.linear] = partial(folding.route, inner=fast_linear.route if linear else None)
        elif linear:
            self.routes[F.linear] = fast_linear.route

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        route = self.routes.get(func)
        if route is None:  # nearly every call
            return func(*args, **kwargs)
        names = _ARGS[func]
        if len(args) <= len(names) and set(kwargs) <= set(names):  # else: a signature not known here
            out = route({**dict(zip(names, args, strict=False)), **kwargs})
            if out is not None:
                return out
        return func(*args, **kwargs)


_local = threading.local()  # per thread: the modes entered by the hooks, innermost last


def _kernels(owner: nn.Module) -> CpuKernels | None:
    """The mode for one forward of `owner`, or None where no kernel applies."""
    if torch.compiler.is_compiling() or (owner.training and is_checkpointing(owner)):
        return None
    dropout = owner.training and bool(owner.__dict__.get(fast_dropout.SWITCH, False))
    linear = bool(owner.__dict__.get(fast_linear.SWITCH, False))
    # folding needs the mode only where some site may fold: a model without one keeps torch's path
    fold = not owner.training and bool(
        owner.__dict__.get(folding.SWITCH) and owner.__dict__.get(folding.ARMED)
    )
    return CpuKernels(dropout, linear, fold) if dropout or linear or fold else None


def folding_on() -> bool:
    """Whether this thread runs inside a model's forward whose `CpuKernels` mode folds (see
    `folding.py`): only then does an offered weight reach the product."""
    stack: list[CpuKernels | None] = _local.__dict__.get("modes", [])
    return bool(stack) and stack[-1] is not None and stack[-1].fold


def _enter(owner: nn.Module, module: nn.Module, args: Any, kwargs: Any) -> None:
    stack: list[CpuKernels | None] = _local.__dict__.setdefault("modes", [])
    mode = _kernels(owner)
    if mode is not None:
        mode.__enter__()
    stack.append(mode)


def _leave(owner: nn.Module, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    stack: list[CpuKernels | None] = _local.__dict__.get("modes", [])
    mode = stack.pop() if stack else None
    if mode is not None:
        mode.__exit__(None, None, None)
    if not stack:  # the outermost forward ends: no offer outlives it (one left by a forward that raised)
        folding.clear()


def install(owner: nn.Module, entries: list[nn.Module]) -> list[RemovableHandle]:
    """Enter `CpuKernels` around the forward of each of `entries` (the modules a caller may call first:
    the model, its bare encoder), with the kernels whose switches are true in
    `owner.__dict__` (plain attributes, so a deep copy of the model keeps its own settings).

    The exit hook runs even when the forward raises; entered twice (the model calls its encoder), the
    inner entry is the one that acts. Returns the hooks' handles (`handle.remove()` uninstalls).
    """
    handles = []
    for module in dict.fromkeys(entries):  # unique, in order
        handles.append(module.register_forward_pre_hook(partial(_enter, owner), with_kwargs=True))
        handles.append(
            module.register_forward_hook(partial(_leave, owner), with_kwargs=True, always_call=True)
        )
    return handles
