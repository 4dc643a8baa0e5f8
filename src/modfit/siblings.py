"""Sibling units: units of one class that run alone at sites of one parent module.

A transformer calls sibling projections on the same input: BERT's `attention.self.query`, `.key`
and `.value` all read `hidden_states`, LLaMA's `mlp.gate_proj` and `mlp.up_proj` both read the MLP's
input. Units of one method at such sites may share work that depends on the input alone (LoRA: one
down-projection onto all their A matrices instead of one per site, `methods/lora.py`).

At every activation the model calls `group_siblings` over its sites: each unit that runs alone at
its site (no stack, no composition node) is grouped with the units of its class running alone at
the other children of the same parent module, and gets the group as `unit.siblings`; every other
unit gets None. Sharing a parent is a hint, not a guarantee of one input (a cross-attention's query
reads other states than its key and value), so a unit using its group must check that its input is
the very tensor the shared work was done on.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .sites import Site, Unit


class _Scratch(threading.local):
    """A group's per-thread scratch space (attributes its unit class sets); a deep copy or a pickle
    of the model starts with none."""

    def __reduce__(self) -> tuple[type[_Scratch], tuple[()]]:
        return (_Scratch, ())


class SiblingGroup:
    """The units of one class running alone at sites of one parent module, in site order, and a
    per-thread `scratch` namespace for what their class shares between them within a forward."""

    def __init__(self, units: Iterable[Unit]) -> None:
        self.units = tuple(units)
        self.scratch = _Scratch()

    def __repr__(self) -> str:
        return f"SiblingGroup({', '.join(type(u).__name__ for u in self.units)})"


def group_siblings(sites: Iterable[Site]) -> None:
    """Set `unit.siblings` for every unit at `sites`: a shared `SiblingGroup` for units of one class
    that run alone at sites whose watched modules have the same parent (two or more of them), None
    for every other unit (including inactive ones, so no group outlives the activation that made it)."""
    groups: dict[tuple[str, type], list[Unit]] = defaultdict(list)
    for site in sites:
        for unit in site.units.values():
            for part in cast("Unit", unit).parts():
                part.siblings = None
        lone = site.lone_unit()
        if lone is not None:
            parent = site.path.rpartition(".")[0]
            groups[(parent, type(lone))].append(lone)
    for units in groups.values():
        if len(units) > 1:
            group = SiblingGroup(units)
            for unit in units:
                unit.siblings = group
