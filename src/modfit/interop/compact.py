"""Short modfit `targets` (and `layers`) that select exactly a given set of projections.

A checkpoint of another library names every module it changed; a modfit card reads better with
`targets=("query", "value")` than with every path. `modfit_targets` tries the modules' last name
components (then the last two, three), with and without a layer list, and keeps the first candidate
that `ModelView.projections` resolves to exactly the wanted set; failing that, the exact paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..targets import ModelView, TargetError

Layers = tuple[int, ...] | None


def layer_indices(view: ModelView, sites: Sequence[str]) -> Layers:
    """The layer indices holding `sites`, or None when that is every layer (or the family is unknown)."""
    if view.arch is None:
        return None
    try:
        refs = view.layers()
    except TargetError:
        return None
    used = sorted({ref.index for ref in refs for s in sites if s.startswith(ref.path + ".")})
    every = sorted({ref.index for ref in refs})
    return None if not used or used == every else tuple(used)


def resolves_to(view: ModelView, targets: Sequence[str], layers: Layers, wanted: set[str]) -> bool:
    """Whether `targets` (with `layers`) select exactly the projections `wanted` on this model."""
    try:
        return set(view.projections(targets, layers)) == wanted
    except TargetError:
        return False


def modfit_targets(
    view: ModelView, sites: Sequence[str], layers: Layers | str = "any"
) -> tuple[tuple[str, ...], Layers]:
    """(targets, layers) that select exactly `sites` (projection paths relative to base_model).

    Args:
        layers: "any" lets this function choose; a tuple or None fixes it (IA3's feedforward subset
            must use the targets' layers).
    """
    wanted = set(sites)
    options: list[Layers] = [None, layer_indices(view, sites)] if layers == "any" else [layers]  # type: ignore[list-item]
    for depth in (1, 2, 3):
        suffixes = tuple(dict.fromkeys(".".join(s.split(".")[-depth:]) for s in sites))
        for option in dict.fromkeys(options):
            if resolves_to(view, suffixes, option, wanted):
                return suffixes, option
    return tuple(sites), options[0] if layers != "any" else None
