"""Combining modules. Merging (offline, in parameter space): `merge_modules`, `merge_into_model`,
the formulas in `merging`, the Fisher in `fisher`, LoRA re-ranking in `svd`."""

from __future__ import annotations

from .fisher import Fisher, FisherFileError, compute_fisher, read_fisher, save_fisher
from .merge_modules import MergeResult, merge_into_model, merge_modules, module_deltas
from .merging import MergeError, MergeSpec, merge_methods

__all__ = [
    "Fisher",
    "FisherFileError",
    "MergeError",
    "MergeResult",
    "MergeSpec",
    "compute_fisher",
    "merge_into_model",
    "merge_methods",
    "merge_modules",
    "module_deltas",
    "read_fisher",
    "save_fisher",
]
