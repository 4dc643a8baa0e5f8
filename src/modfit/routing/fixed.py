"""Fixed per-example routing: `route(a, b, c)` sends every batch row through the module its route names.

::

    mm.activate("route(a, b, c)")
    mm(**batch, route=["a", None, "c", "a"])          # row 0 through a, row 1 through no module, ...
    with modfit.routing.routed(["a", None, "c", "a"]):  # the same around a direct HF call
        mm.model(**batch)
    mm.activate("route(en, de, key=language)")        # rows by another key: names or child positions
    mm(**batch, language_ids=torch.tensor([0, 1, 1, -1]))

At every site the children run on the rows routed to them; a row routed to None (id -1) keeps the site's
output, i.e. the base model's. With i_b the child of row b (`route_ids(key, B, names)`, names = the
children's textual forms, so a child may be any expression: "stack(en, ner)")::

    h'_b = child_{i_b}(h)_b        h: (B, ..., width) the site's output; i_b = -1: h'_b = h_b

Batched kernels. When every child is one module whose unit at this site is of one class, and that
class defines `batched` in its own body (a subclass computing differently does not inherit it), the
node gathers each row's weights and runs all rows at once (`torch.bmm` over per-row weights) instead
of looping over the modules. The protocol, all class methods over `units` (one per child, None where a
child has no unit here) and `index` (B,) long in 0..M (M = len(units): "no module" for that row)::

    can_batch(units) -> bool                          optional: whether these units' options allow it
    batched(units, index, h, call) -> h               the site's output, every row through its unit
    batched_before(units, rows, args, kwargs)         classes with `edits_input`: the input, per row;
                                                      rows(batch, device) gives the index

LoRA, (IA)³, bottleneck adapters, prompt and prefix tuning define them in their own files. Any other
unit kind (or a child that is an expression) runs the generic way: for every child present in the
batch, its rows are selected (`index_select`), run through the child, and written back
(`index_copy`): correct, but one pass per distinct child. Prompt and prefix units change the whole
pass (virtual tokens), so they have no generic path: they need their kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from ..composition import Composition, CompositionError, _as_children, register_operator
from ..sites import SiteCall, Unit
from .context import Route, RouteError, current_route, route_ids, routed

if TYPE_CHECKING:
    from ..compose.plan import Branch


@dataclass(frozen=True, init=False)
class FixedRoute(Composition):
    """Each batch row through the child its route entry names (fixed, per-example routing).

    Attributes:
        items: the children; a row's route entry is a child's textual form (a module name) or its
            position, None / -1 for no module.
        key: the route key read per row ("module": `mm(..., route=[...])`; "task", "language": the
            `task_ids` / `language_ids` columns, ids = child positions).
    """

    op: ClassVar[str] = "route"
    items: tuple[Composition, ...]
    key: str = "module"

    def __init__(self, *children: Composition | str, key: str = "module") -> None:
        if not isinstance(key, str) or not key:
            raise CompositionError(f"route(): key must be a non-empty name, got {key!r}")
        object.__setattr__(self, "items", _as_children("route", children, 1))
        object.__setattr__(self, "key", key)
        _register_node()

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {} if self.key == "module" else {"key": self.key}

    def child_names(self) -> list[str]:
        """The names a route entry may use: each child's textual form, in child order (id = position)."""
        return [str(c) for c in self.items]


register_operator(FixedRoute, {"key": "name"})


class RouteNode:
    """`route(...)` at one site: a combining item `(h, call) -> h` (see `compose/plan.py`).

    Args:
        expr: the expression; branches: its compiled children at this site.
        kernel: the unit class whose batched kernel runs every row at once, or None (generic path).
        units: with a kernel, each child's unit here (None: the child does not act here).
        where: the site's path, for messages.
    """

    def __init__(
        self,
        expr: FixedRoute,
        branches: list[Branch],
        kernel: type[Unit] | None,
        units: list[Unit | None],
        where: str,
    ) -> None:
        self.expr = expr
        self.branches = branches
        self.kernel = kernel
        self.units = units
        self.where = where
        self.names = expr.child_names()
        stages = [getattr(i, "stage", 1) for b in branches for i in b.items]
        # parameter-composition children (LoRA, (IA)³) keep their place before function units in a stack
        self.stage = max(stages, default=1)
        self.whole_output = bool(kernel is not None and kernel.whole_output)
        self.edits_input = bool(kernel is not None and kernel.edits_input)
        # which slots act at this site; the last slot (M) is "no module"
        self._acting = torch.tensor([u is not None for u in units] + [False]) if kernel is not None else None

    def ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """This pass's (batch,) child ids for the rows, -1 for none; checked against the children."""
        ids = route_ids(self.expr.key, batch, self.names, device=device)
        assert ids is not None
        bad = ids[(ids >= len(self.names)) | (ids < -1)]
        if bad.numel():
            raise RouteError(
                f"route '{self.expr.key}': id {int(bad[0])} is out of range for {self.expr} "
                f"(children 0..{len(self.names) - 1}, -1 for no module)"
            )
        return ids

    def index(self, batch: int, device: torch.device) -> torch.Tensor:
        """The kernel's row index: (batch,) in 0..M, M for rows without a unit at this site."""
        ids = self.ids(batch, device)
        m = len(self.units)
        slots = torch.where(ids < 0, torch.full_like(ids, m), ids)
        assert self._acting is not None
        return torch.where(self._acting.to(device)[slots], slots, torch.full_like(ids, m))

    def __call__(self, h: Any, call: SiteCall) -> Any:
        if self.kernel is not None:
            batch_of = _batch_of(h) if self.whole_output else h.shape[0]
            device = _device_of(h) if self.whole_output else h.device
            return self.kernel.batched(self.units, self.index(batch_of, device), h, call)  # type: ignore[attr-defined]
        return self._generic(h, call)

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Per-row input edits (only with a kernel whose units edit the input). The kernel knows where
        its call keeps the batch, so it gets `self.index` to call with (batch, device)."""
        assert self.kernel is not None
        return self.kernel.batched_before(self.units, self.index, args, kwargs)  # type: ignore[attr-defined,no-any-return]

    def _generic(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        """One pass per child present in the batch, on its rows only."""
        batch = h.shape[0]
        ids = self.ids(batch, h.device)
        out: torch.Tensor | None = None
        route = current_route()
        for child in torch.unique(ids).tolist():
            if child < 0 or self.branches[child].empty:
                continue
            rows = (ids == child).nonzero().squeeze(1)
            sub_call = _select_call(call, rows, batch)
            with routed(_select_route(route, rows, batch)):
                y = self.branches[child](h.index_select(0, rows), sub_call)
            out = h.clone() if out is None else out
            out.index_copy_(0, rows, y.to(out.dtype))
        return h if out is None else out


def kernel_for(units: Sequence[Unit | None]) -> type[Unit] | None:
    """The unit class whose batched kernel serves these units, or None (generic path)."""
    kinds = {type(u) for u in units if u is not None}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if "batched" not in vars(kind):  # defined by the class itself: subclasses may compute differently
        return None
    can_batch = getattr(kind, "can_batch", None)
    return kind if can_batch is None or can_batch(list(units)) else None


def _build(
    expr: FixedRoute, branches: list[Branch], units: Mapping[str, Unit], layers: str | None, where: str
) -> RouteNode:
    per_child: list[Unit | None] = []
    single = True
    for branch in branches:
        if branch.empty:
            per_child.append(None)
        elif len(branch.items) == 1 and isinstance(branch.items[0], Unit):
            per_child.append(branch.items[0])
        else:
            single = False
    kernel = kernel_for(per_child) if single else None
    if kernel is None:
        whole = [i for b in branches for i in b.items if getattr(i, "whole_output", False)]
        if whole:
            raise CompositionError(
                f"{expr}: its {type(whole[0]).__name__} at {where or 'the model'} changes the whole pass "
                "(virtual tokens or keys); route() runs such modules only when every child acting there "
                "is one module of the same kind and size (e.g. prompts with the same num_virtual_tokens)"
            )
    return RouteNode(expr, branches, kernel, per_child, where)


_REGISTERED = False


def _register_node() -> None:
    """Register route's site evaluation on first use of the operator. Not at import: `compose.plan`
    imports the compose package, whose merging tools import `modfit.model`, which imports this package."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ..compose.plan import register_node

    # RouteNode is a Node by protocol (plan.py's Node class cannot be imported at module load, see above)
    register_node(FixedRoute, cast(Any, _build), whole_output_branches=True)
    _REGISTERED = True


# -- rows of a call and of a route ---------------------------------------------------------------------


def _select(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, tuple):
        return tuple(_select(v, rows, batch) for v in value)
    return value


def _select_call(call: SiteCall, rows: torch.Tensor, batch: int) -> SiteCall:
    """The call restricted to some batch rows: every tensor with `batch` rows is indexed."""
    return replace(
        call,
        inputs=_select(call.inputs, rows, batch),
        residual=_select(call.residual, rows, batch),
        kwargs={k: _select(v, rows, batch) for k, v in call.kwargs.items()},
        output=_select(call.output, rows, batch) if isinstance(call.output, torch.Tensor) else call.output,
        args=_select(call.args, rows, batch),
    )


def _select_route(route: Route | None, rows: torch.Tensor, batch: int) -> Route | None:
    """The route of some batch rows (a nested row-splitting composition reads its rows' entries)."""
    if route is None:
        return None
    picked = rows.tolist()
    out: Route = {}
    for key, value in route.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, (list, tuple)) and len(value) == batch:
            out[key] = [value[i] for i in picked]
        else:
            out[key] = value
    return out


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, tuple | list) else ()
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim >= 1:
            return item
    raise RouteError("route(): cannot tell the batch size of this call")


def _batch_of(output: Any) -> int:
    return int(_first_tensor(output).shape[0])


def _device_of(output: Any) -> torch.device:
    return _first_tensor(output).device
