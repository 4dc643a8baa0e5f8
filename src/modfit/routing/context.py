"""The routing information of one forward pass, visible to every site while that pass runs.

A batch may carry, per example, which module to use or which task and language it belongs to::

    mm(**batch, route=["en", "sw", None, ...])                 # one module name (or None) per row
    mm(**batch, route={"task": task_ids, "language": lang_ids})   # (batch,) integer ids per key
    with modfit.routing.routed({"task": task_ids}):            # the same around a direct mm.model(...) call
        mm.model(**batch)

The information is held in a `ContextVar` for the duration of the call only: concurrent calls in
other threads or asyncio tasks each see their own, and nothing stays behind after the call. Units
and composition nodes read it with `current_route()` / `route_ids(...)`. A plain list means
`{"module": list}`. Row-splitting compositions (`batchsplit`, `parallel`) hand each branch its rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch

RouteValue = torch.Tensor | Sequence[Any]
Route = dict[str, RouteValue]
RouteLike = Mapping[str, RouteValue] | Sequence[Any] | torch.Tensor

_CURRENT: ContextVar[Route | None] = ContextVar("modfit_route", default=None)


class RouteError(ValueError):
    """Routing information that does not fit the batch or names unknown modules."""


def as_route(value: RouteLike | None) -> Route | None:
    """Normalise a route argument: a mapping stays (copied), a list or tensor becomes {"module": it}."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (torch.Tensor, list, tuple)):
        return {"module": value}
    raise RouteError(f"route must be a mapping, a list or a tensor, got {type(value).__name__}")


def current_route() -> Route | None:
    """The routing information of the forward pass running now, or None."""
    return _CURRENT.get()


@contextmanager
def routed(value: RouteLike | None) -> Iterator[Route | None]:
    """Make `value` the routing information of the forward passes run inside the block."""
    token = _CURRENT.set(as_route(value))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def checkpoint_context() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant): the recomputation of a checkpointed
    layer runs during backward, after the forward call and its route are gone; this puts the very same
    route object back for it (the same object, so per-pass caches keyed by it, such as Polytropon's
    relaxed-Bernoulli sample, are found again). Returns (forward context, recompute context)."""
    route = _CURRENT.get()
    return nullcontext(), _restoring(route)


@contextmanager
def _restoring(route: Route | None) -> Iterator[None]:
    token = _CURRENT.set(route)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def route_ids(
    key: str,
    batch: int,
    names: Sequence[str] | None = None,
    *,
    device: torch.device | None = None,
    required: bool = True,
) -> torch.Tensor | None:
    """The (batch,) long ids of `key` in the current route; -1 marks "no module" (None) rows.

    Args:
        key: "module", "task", "language", ...
        batch: the number of rows the caller sees (checked against the route).
        names: for values given as names, the names in id order (id = position); a name not in it
            is an error listing them.
        required: raise when the route lacks `key` (else return None).

    Raises:
        RouteError: missing key, wrong length, unknown name.
    """
    route = _CURRENT.get()
    value = route.get(key) if route is not None else None
    if value is None:
        if required:
            given = ", ".join(route) if route else "none"
            raise RouteError(
                f"this forward pass needs per-example '{key}' routing (route keys given: {given})"
            )
        return None
    if isinstance(value, torch.Tensor):
        ids = value.to(device=device, dtype=torch.long).reshape(-1)
    else:
        ids = torch.tensor([_to_id(v, names, key) for v in value], dtype=torch.long, device=device)
    if ids.numel() != batch:
        raise RouteError(f"route '{key}' has {ids.numel()} entries for a batch of {batch} rows")
    return ids


def _to_id(value: Any, names: Sequence[str] | None, key: str) -> int:
    if value is None:
        return -1
    if isinstance(value, str):
        if names is None:
            raise RouteError(f"route '{key}' gives a name ({value!r}) where ids are expected")
        try:
            return list(names).index(value)
        except ValueError:
            raise RouteError(f"route '{key}': unknown name {value!r}; known: {', '.join(names)}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RouteError(f"route '{key}': expected names, ints or None, got {value!r}")
    return value


def narrowed(route: Route | None, start: int, size: int, length: int) -> Route | None:
    """The route of rows start..start+size-1 of a batch of `length` rows."""
    if route is None:
        return None
    out: Route = {}
    for key, value in route.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == length:
            out[key] = value.narrow(0, start, size)
        elif isinstance(value, (list, tuple)) and len(value) == length:
            out[key] = list(value[start : start + size])
        else:
            out[key] = value
    return out


def repeated(route: Route | None, copies: int) -> Route | None:
    """The route of a batch repeated block-wise `copies` times (`parallel`)."""
    if route is None or copies == 1:
        return route
    out: Route = {}
    for key, value in route.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            out[key] = value.repeat(copies, *([1] * (value.ndim - 1)))
        elif isinstance(value, (list, tuple)):
            out[key] = list(value) * copies
        else:
            out[key] = value
    return out
