"""Routing: which modules act on which inputs. Per-example routing information travels with the
batch (`mm(**batch, route=...)` or `with modfit.routing.routed(...)`), never through global state."""

from __future__ import annotations

from .context import Route, RouteError, current_route, route_ids, routed

__all__ = ["Route", "RouteError", "current_route", "route_ids", "routed"]
from .fixed import FixedRoute  # (route(...): fixed per-example routing)

__all__ += ["FixedRoute"]
from . import moe as _moe  # noqa: E402, F401  (moe(...): learned routing over modules)
