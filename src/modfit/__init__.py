"""modfit: modular, parameter-efficient fine-tuning of pretrained transformers.

Keep one frozen base model; train, combine, save and share small modules on it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .composition import Composition, CompositionError, Single, Stack, parse
from .config import ConfigError, ModuleConfig
from .heads import HeadConfig, head
from .model import ModularModel, ModularOutput, wrap
from .persistence import BaseMismatchError, ModuleFileError, read_card
from .registry import config, methods, register_method
from .sites import SiteCall, Unit
from .targets import TargetError

__all__ = [
    "DEFAULT_BASE",
    "BaseMismatchError",
    "Composition",
    "CompositionError",
    "ConfigError",
    "HeadConfig",
    "ModularModel",
    "ModularOutput",
    "ModuleConfig",
    "ModuleFileError",
    "Single",
    "SiteCall",
    "Stack",
    "TargetError",
    "Unit",
    "__version__",
    "config",
    "head",
    "methods",
    "parse",
    "read_card",
    "register_method",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # DEFAULT_BASE is resolved on first use: it is a path inside an installed package.
    if name == "DEFAULT_BASE":
        from .base import default_base_path

        return default_base_path()
    raise AttributeError(f"module 'modfit' has no attribute '{name}'")
