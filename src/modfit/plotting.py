"""The figures modfit draws (fusion weights, routing allocations, learning curves): matplotlib's Agg
canvas used directly, so drawing never changes a user's pyplot backend, and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_write


def new_figure(what: str, **options: Any) -> Any:
    """A matplotlib `Figure` on an Agg canvas (`options` go to `Figure`).

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message says what needed it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            f"drawing {what} needs matplotlib: pip install 'modfit[plot]'", name="matplotlib"
        ) from None
    fig = Figure(**options)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Write `fig` as a PNG (120 dpi) to `path`, atomically; returns the path."""
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return target
