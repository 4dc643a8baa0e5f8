"""`moe(a, b, c, ...)`: a learned mixture of modules, weighted per token or per example by a router.

At every site where one of the branches acts, the router module's unit there (`routing/router.py`)
reads the site's output h and gives weights w over the n branches; each branch i returns its output
o_i from the same h, and the node returns the representation-level mixture::

    out = h + sum_i w_i (o_i - h)       h, o_i: (batch, seq, width); w: (batch, seq, n) per token,
                                        (batch, 1, n) per example

which is sum_i w_i o_i whenever the weights sum to 1 (dense, top-k, Gumbel-softmax), and keeps h where
no Gumbel-sigmoid gate is on. A branch with a zero weight for every row of the batch is not run when
that cannot change a gradient (top-k, or any mode outside training), so example-level top-1 routing
costs about one module per example at inference.

The router is a module of method `router` made for exactly these children
(`mm.add("r", modfit.config("router", children=["a", "b", "c"]))`), or named: `moe(a, b, c, router=r)`.
Per-example pooling skips padding using the batch's attention mask, which `ModularModel.forward` puts
in the routing context (`current_route()["attention_mask"]`); a direct `mm.model(...)` call pools
over every position unless the caller passes it (`with routed({"attention_mask": mask}): ...`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..compose.plan import Branch, Node, layers_unit, register_node
from ..composition import Composition, CompositionError, _as_children, register_operator
from ..sites import SiteCall, Unit
from .context import current_route
from .router import RouterUnit

MASK_KEY = "attention_mask"


@dataclass(frozen=True, init=False)
class Mixture(Composition):
    """A router-weighted mixture of the children's outputs at every site (mixture of modules).

    Attributes:
        router: the name of the router module holding the routing layers; None: the one router module
            on the model made for exactly these children.
    """

    op: ClassVar[str] = "moe"
    layers_method: ClassVar[str | None] = "router"
    layers_option: ClassVar[str] = "router"
    items: tuple[Composition, ...]
    router: str | None = None

    def __init__(self, *children: Composition | str, router: str | None = None) -> None:
        object.__setattr__(self, "items", _as_children("moe", children, 2))
        object.__setattr__(self, "router", router)

    @property
    def children(self) -> tuple[Composition, ...]:
        return self.items

    def options(self) -> dict[str, Any]:
        return {} if self.router is None else {"router": self.router}


def token_mask(h: torch.Tensor) -> torch.Tensor | None:
    """The (batch, seq) attention mask of the current pass when it fits h's first two dimensions."""
    route = current_route()
    mask = route.get(MASK_KEY) if route is not None else None
    if isinstance(mask, torch.Tensor) and h.ndim >= 3 and tuple(mask.shape) == tuple(h.shape[:2]):
        return mask
    return None  # e.g. a decoder site, or a sequence block of split(): no mask that fits


class MixtureNode(Node):
    """The site evaluation of `moe(...)`: branches mixed by the router's weights."""

    def __init__(self, branches: list[Branch], router: RouterUnit) -> None:
        super().__init__(branches)
        self.router = router

    def forward(self, h: torch.Tensor, call: SiteCall) -> torch.Tensor:
        weights = self.router.route(h, token_mask(h))  # (..., n), broadcastable against h[..., :1]
        skip_zeros = self.router.zeros_are_inert
        out = h
        for i, branch in enumerate(self.branches):
            if branch.empty:
                continue  # o_i = h here: no contribution (its weight still dilutes the others)
            w = weights[..., i : i + 1]
            if skip_zeros and not bool(w.any()):
                continue  # no row of the batch uses it at this site
            out = out + w * (branch(h, call) - h)
        return out


def _build(
    expr: Mixture, branches: list[Branch], units: Mapping[str, Unit], layers: str | None, where: str
) -> Node:
    router = layers_unit(expr, units, layers, where)
    if not isinstance(router, RouterUnit):
        raise CompositionError(f"{expr}: module '{layers}' holds no router layer at {where}")
    return MixtureNode(branches, router)


register_operator(Mixture, {"router": "name"})
register_node(Mixture, _build)
