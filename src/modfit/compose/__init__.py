"""Combining modules. Merging (offline, in parameter space): `merge_modules`, `merge_into_model`
(`module_merge`), the formulas in `merging`, the Fisher in `fisher`, LoRA re-ranking in `svd`.
Runtime composition: `plan` evaluates composition expressions at the sites.

The names below load on first use: the merging tools import the model, which imports `plan`, so
importing them eagerly here would be circular.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Fisher": "fisher",
    "FisherFileError": "fisher",
    "compute_fisher": "fisher",
    "read_fisher": "fisher",
    "save_fisher": "fisher",
    "MergeResult": "module_merge",
    "merge_into_model": "module_merge",
    "merge_modules": "module_merge",
    "module_deltas": "module_merge",
    "MergeError": "merging",
    "MergeSpec": "merging",
    "merge_methods": "merging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
