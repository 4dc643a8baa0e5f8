"""The method registry: method name -> (config class, unit class).

A method registers itself with the `register_method` decorator on its config class; nothing else
in the library names a method. `config("lora", r=4)` builds a config from a name, `methods()`
lists what is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import ConfigError, ModuleConfig


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, config class, unit class and one-line summary.

    `standalone` is False for a method whose modules only make sense over other modules on the same
    model (fusion layers): it has no default config that attaches to a bare model.
    """

    name: str
    config_class: type[ModuleConfig]
    unit_class: type
    summary: str
    standalone: bool = True


_REGISTRY: dict[str, MethodEntry] = {}

C = TypeVar("C", bound=type[ModuleConfig])


def register_method(
    name: str, unit_class: type, summary: str, *, standalone: bool = True
) -> Callable[[C], C]:
    """Class decorator registering a config class under `name`.

    Raises:
        ValueError: `name` is already registered to another config class.
    """

    def decorate(config_class: C) -> C:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.config_class is not config_class:
            raise ValueError(f"method '{name}' is already registered by {existing.config_class.__name__}")
        config_class.method = name
        _REGISTRY[name] = MethodEntry(name, config_class, unit_class, summary, standalone)
        return config_class

    return decorate


def _ensure_builtin_methods() -> None:
    # Importing the package of built-in methods runs their decorators. (Not `from . import methods`:
    # the package attribute `modfit.methods` is the public function below, not the subpackage.)
    importlib.import_module(f"{__package__}.methods")


def method_entry(name: str) -> MethodEntry:
    """The registry entry for `name`.

    Raises:
        ConfigError: no method has that name (the message lists those that exist).
    """
    _ensure_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}") from None


def methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_builtin_methods()
    return sorted(_REGISTRY)


def method_summaries() -> dict[str, str]:
    """Method name -> one-line summary, sorted by name."""
    _ensure_builtin_methods()
    return {name: _REGISTRY[name].summary for name in sorted(_REGISTRY)}


def config(method: str, **params: Any) -> ModuleConfig:
    """Build the config of a registered method; string values are parsed by field type.

    Args:
        method: a registered method name (see `methods()`).
        **params: config fields, e.g. `r=8, targets=("query", "value")` or `targets="query,value"`.

    Returns:
        The frozen, validated config.

    Raises:
        ConfigError: unknown method, unknown field or invalid value.
    """
    return method_entry(method).config_class.from_dict(params, source="config()")
