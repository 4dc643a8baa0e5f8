"""A composition expression evaluated at one site: the items a `Site` runs on the output.

`compile_site` turns the active expression into a list of items for one site. A module's units
are items as they are; `stack` flattens into the list (its units sorted by stage, as the site does
for a plain stack); every other operator becomes one combining node that gives each child branch
the site's output `h` and combines what the branches return::

    fuse:        sum_i softmax_i(q(h) . k(o_i) / T) v(o_i)       per token; q, k, v: the fusion unit's
    average:     sum_i w_i o_i
    split:       cat(branch_1(h[:, :at]), branch_2(h[:, at:]))   along the sequence
    batchsplit:  cat(branch_i(h[rows of block i]))               along the batch
    parallel:    batchsplit with equal blocks (the model replicated the batch once per branch)

where o_i is branch i's output (h itself when none of its modules acts at this site). A branch whose
units edit the module's input (e.g. (IA)³ scaling an FFN projection's input) runs the module again on
its own edited input (`SiteCall.rerun`). Units that change the whole pass (prompt and prefix tuning's
virtual tokens) cannot be one branch among others: compiling refuses them with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch

from ..composition import (
    Average,
    BatchSplit,
    Composition,
    CompositionError,
    Fuse,
    Parallel,
    Single,
    Split,
    Stack,
)
from ..routing.context import current_route, narrowed, routed
from ..sites import SiteCall, Unit

Item = Any  # a Unit or a Node: callables (h, call) -> h


class Node:
    """A combining node: a plain callable (h, call) -> h with the class attributes a site reads of
    its items. It holds no parameters; the units it runs and the fusion unit stay at their site."""

    stage: ClassVar[int] = 1
    whole_output: ClassVar[bool] = False
    edits_input: ClassVar[bool] = False

    def __init__(self, branches: list[Branch]) -> None:
        self.branches = branches

    def __call__(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return self.forward(h, call)

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Branch:
    """One child of a combining node at one site: its items, run on h (or on a re-run of the module
    with the branch's own edited input)."""

    def __init__(self, items: list[Item], editors: list[Unit]) -> None:
        self.items = items
        self.editors = editors

    @property
    def empty(self) -> bool:
        return not self.items and not self.editors

    def __call__(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        if self.editors:
            if call.rerun is None:
                raise RuntimeError("a branch that edits the module's input needs SiteCall.rerun")
            args, kwargs = call.args, dict(call.kwargs)
            for unit in self.editors:
                args, kwargs = unit.before(args, kwargs)
            out = call.rerun(args, kwargs)
            h = out[0] if isinstance(out, tuple) else out
            call = replace(
                call, inputs=args if args else tuple(kwargs.values()), kwargs=kwargs, args=args, output=out
            )
        for item in self.items:
            h = item(h, call)
        return h


class FuseNode(Node):
    def __init__(self, branches: list[Branch], fusion: Unit) -> None:
        super().__init__(branches)
        self.fusion = fusion

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        outputs = torch.stack([b(h, call) for b in self.branches])  # (n, ..., hidden)
        fuse = cast(Callable[[torch.Tensor, torch.Tensor], torch.Tensor], getattr(self.fusion, "fuse"))  # noqa: B009
        return fuse(h, outputs)


class AverageNode(Node):
    def __init__(self, branches: list[Branch], weights: tuple[float, ...]) -> None:
        super().__init__(branches)
        self.weights = weights

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        out = None
        for weight, branch in zip(self.weights, self.branches, strict=True):
            term = branch(h, call) * weight
            out = term if out is None else out + term
        assert out is not None
        return out


class SplitNode(Node):
    """Blocks along `dim` (0: batch rows, 1: sequence positions) through the branches."""

    def __init__(
        self, branches: list[Branch], dim: int, sizes: tuple[int, ...] | None, at: int | None
    ) -> None:
        super().__init__(branches)
        self.dim, self.sizes, self.at = dim, sizes, at

    def _blocks(self, length: int) -> list[int]:
        if self.at is not None:  # split(a, b, at=K): K positions, then the rest
            return [min(self.at, length), max(length - self.at, 0)]
        if self.sizes is not None:
            if sum(self.sizes) != length:
                raise ValueError(
                    f"batchsplit: sizes {list(self.sizes)} add up to {sum(self.sizes)}, "
                    f"the batch has {length} rows"
                )
            return list(self.sizes)
        n = len(self.branches)  # parallel: equal blocks
        if length % n:
            raise ValueError(f"parallel: {length} rows are not {n} equal copies of the batch")
        return [length // n] * n

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        length = h.shape[self.dim]
        pieces, start = [], 0
        for size, branch in zip(self._blocks(length), self.branches, strict=True):
            if size == 0:
                continue
            part = h.narrow(self.dim, start, size)
            sub_call = _narrow_call(call, self.dim, start, size, length)
            if self.dim == 0:  # the branch's rows also carry their own routing information
                with routed(narrowed(current_route(), start, size, length)):
                    pieces.append(branch(part, sub_call))
            else:
                pieces.append(branch(part, sub_call))
            start += size
        return torch.cat(pieces, dim=self.dim)


def _narrow(value: Any, dim: int, start: int, size: int, length: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > dim and value.shape[dim] == length:
        return value.narrow(dim, start, size)
    if isinstance(value, tuple):
        return tuple(_narrow(v, dim, start, size, length) for v in value)
    return value


def _narrow_call(call: SiteCall, dim: int, start: int, size: int, length: int) -> SiteCall:
    """The call restricted to one block: every tensor with that extent along `dim` is cut."""
    cut: Callable[[Any], Any] = lambda v: _narrow(v, dim, start, size, length)  # noqa: E731
    return replace(
        call,
        inputs=cut(call.inputs),
        residual=cut(call.residual),
        kwargs={k: cut(v) for k, v in call.kwargs.items()},
        output=cut(call.output) if isinstance(call.output, torch.Tensor) else call.output,
        args=cut(call.args),
    )


def is_flat(expr: Composition) -> bool:
    """Whether `expr` is a module or stacks of modules only (the site's plain, fast path)."""
    return all(isinstance(e, (Single, Stack)) for e in expr.walk())


NodeBuilder = Callable[[Any, list[Branch], Mapping[str, Unit], str | None, str], "Node | None"]
_BUILDERS: dict[type[Composition], NodeBuilder] = {}


_WHOLE_OUTPUT_BRANCHES: set[type[Composition]] = set()


def register_node(
    cls: type[Composition], builder: NodeBuilder, *, whole_output_branches: bool = False
) -> None:
    """How operator `cls` runs at a site: `builder(expr, branches, units, layers, where) -> Node`.

    `branches` are the compiled children (`Branch.empty` when none of a child's modules acts here),
    `units` the units at this site by module name, `layers` the name of the module holding the
    operator's own layers (see `Composition.layers_method`) or None, `where` the site's path.
    `whole_output_branches`: the operator's node handles branches whose units change the whole pass
    (prompt/prefix virtual tokens; e.g. `route`, which gives every row its own), so compiling does not
    refuse them; its node then sets `whole_output` / `edits_input` itself and is run as an input editor.
    """
    _BUILDERS[cls] = builder
    if whole_output_branches:
        _WHOLE_OUTPUT_BRANCHES.add(cls)


def compile_site(
    expr: Composition,
    units: Mapping[str, Unit],
    layers: Mapping[Composition, str],
    where: str,
) -> tuple[list[Item], list[Unit]]:
    """The items and the top-level input editors of `expr` at one site.

    Args:
        expr: the active composition (merged modules already checked by the caller).
        units: module name -> its unit at this site (modules absent here are left out).
        layers: each operator with layers of its own (fuse) -> the module holding them.
        where: the site's path, for messages.

    Raises:
        CompositionError: a nesting that cannot be meaningful here (the message says why).
    """
    items = _sequence(expr, units, layers, where)
    # a node may edit the input too (route's per-row input scaling): getattr, not isinstance(Unit)
    editors = [i for i in items if getattr(i, "edits_input", False)]
    return items, editors


def _sequence(
    expr: Composition, units: Mapping[str, Unit], layers: Mapping[Composition, str], where: str
) -> list[Item]:
    """Flatten stacks into items; units in stage order (stable), combining nodes as function items."""
    if isinstance(expr, Single):
        unit = units.get(expr.name)
        return sorted(unit.parts(), key=lambda u: u.stage) if unit is not None else []
    if isinstance(expr, Stack):
        items = [i for child in expr.children for i in _sequence(child, units, layers, where)]
        return sorted(items, key=lambda i: i.stage)
    builder = _BUILDERS.get(type(expr))
    if builder is None:
        raise CompositionError(f"no site evaluation registered for {expr.op}()")
    whole = type(expr) in _WHOLE_OUTPUT_BRANCHES
    branches = [_branch(c, units, layers, where, expr.op, whole) for c in expr.children]
    if all(b.empty for b in branches):
        return []  # none of its modules acts at this site
    node = builder(expr, branches, units, layers.get(expr), where)
    return [node] if node is not None else []


def _branch(
    expr: Composition,
    units: Mapping[str, Unit],
    layers: Mapping[Composition, str],
    where: str,
    op: str,
    whole_output_ok: bool = False,
) -> Branch:
    items = _sequence(expr, units, layers, where)
    for item in items:
        if getattr(item, "whole_output", False) and not whole_output_ok:
            raise CompositionError(
                f"'{expr}' cannot be one branch of {op}(): its {type(item).__name__} at "
                f"{where or 'the model'} "
                "changes the whole pass (virtual tokens or keys), which every branch would share; "
                f"stack it outside instead, e.g. stack({expr}, {op}(...))"
            )
    editors = [i for i in items if getattr(i, "edits_input", False)]
    return Branch(items, editors)


def layers_unit(expr: Composition, units: Mapping[str, Unit], layers: str | None, where: str) -> Unit:
    """The unit of the module holding `expr`'s own layers (its fusion, its router) at this site.

    Raises:
        CompositionError: that module has no unit here (it was added before a module it serves).
    """
    assert layers is not None  # the model resolves every such operator to its module
    unit = units.get(layers)
    if unit is None:
        raise CompositionError(
            f"{expr.layers_method} module '{layers}' has no layer at {where}, where modules of {expr} act; "
            f"add the {expr.layers_method} again after adding all the modules of {expr}"
        )
    return unit


def _fuse(
    expr: Fuse, branches: list[Branch], units: Mapping[str, Unit], layers: str | None, where: str
) -> Node:
    return FuseNode(branches, layers_unit(expr, units, layers, where))


register_node(Fuse, _fuse)
register_node(Average, lambda expr, branches, *_: AverageNode(branches, expr.resolved_weights()))
register_node(Split, lambda expr, branches, *_: SplitNode(branches, dim=1, sizes=None, at=expr.at))
register_node(BatchSplit, lambda expr, branches, *_: SplitNode(branches, dim=0, sizes=expr.sizes, at=None))
register_node(Parallel, lambda expr, branches, *_: SplitNode(branches, dim=0, sizes=None, at=None))
