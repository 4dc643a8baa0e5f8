"""Module configurations: frozen, typed dataclasses that round-trip through JSON.

Every method's config derives from `ModuleConfig`. Values given as strings (from the CLI's
`--param KEY=VALUE` or a JSON card) are converted by the field's annotation, so `r="8"` becomes 8
and `targets="query,value"` becomes ("query", "value"). Validation lives in each config's
`__post_init__` and raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

if TYPE_CHECKING:
    from .model import ModularModel
    from .train import TrainResult


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


C = TypeVar("C", bound="ModuleConfig")


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """Base of all method configs. Subclasses are frozen dataclasses registered under a method name."""

    method: ClassVar[str] = ""
    # Whether a freshly added module leaves the model's outputs exactly unchanged. True for
    # methods initialised as an identity (LoRA's B = 0, adapters' zero up-projection); False for
    # those that cannot be (virtual tokens of prompt and prefix tuning change attention at once).
    identity_at_init: ClassVar[bool] = True
    # The learning rate `modfit train` uses when `--lr` is not given; None: the task's default.
    # Methods whose parameters sit at the input (prompt and prefix tuning) need far larger ones.
    default_lr: ClassVar[float | None] = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, source: str = "config") -> C:
        """Build a config from field values, converting strings and lists by the field types.

        Args:
            values: field name -> value; strings are parsed by the field's annotation.
            source: where the values came from, for error messages (a file name, "--param").

        Raises:
            ConfigError: an unknown field (the message lists the known ones) or a value that does
                not fit its field's type.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown parameter(s) {', '.join(unknown)} for method '{cls.method}'; "
                f"known: {', '.join(sorted(fields))}"
            )
        kwargs = {k: coerce(v, hints[k], f"{source}: {cls.method}.{k}") for k, v in values.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a required field missing
            raise ConfigError(f"{source}: {e}") from e

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def fit(self, mm: ModularModel, name: str, run: Callable[..., TrainResult]) -> None:
        """Train module `name` of `mm`, which this config built; `modfit.train.train()` calls it.

        `run(phase=None, **overrides)` is one pass of the training loop: a fresh optimizer over the
        module's parameters as they are when it starts, `overrides` replacing `TrainSettings`
        fields (e.g. `steps=100, epochs=None`), checkpoints in the subfolder `phase` of the
        checkpoint directory when a phase is named. It returns that pass's `TrainResult`; `train()`
        returns all passes joined. The default is one plain run. A method whose training has
        several phases overrides this: LT-SFT runs a dense phase, selects its entries (which
        replaces the units' parameters), then runs a sparse phase.
        """
        run()


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert `value` (often a string) to the type `annotation` describes.

    Supports int, float, bool, str, None unions, Literal[...], tuple[X, ...] (from a list or a
    comma-separated string) and dict (left as is).

    Raises:
        ConfigError: naming `where` when the value cannot be converted.
    """
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        described = _describe_union(options)
        if described is not None:
            raise ConfigError(f"{where}: expected {described}, got {value!r}")
        raise ConfigError(f"{where}: cannot interpret {value!r} as {_type_name(annotation)}")
    if origin is Literal:
        allowed = get_args(annotation)
        for option in allowed:
            if value == option or (isinstance(value, str) and str(option) == value):
                return option
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    if origin is tuple:
        (item_type, *_) = get_args(annotation)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(
            coerce(v.strip() if isinstance(v, str) else v, item_type, where) for v in items if v != ""
        )
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


_SCALAR_NAMES: dict[Any, str] = {float: "a number", int: "an integer", bool: "true/false", str: "a string"}


def _describe_union(options: tuple[Any, ...]) -> str | None:
    """Words for a union of scalars and Literals that has a Literal, e.g. `float | Literal["learned"]`
    -> "a number or one of 'learned'"; None for other unions (their message names the type)."""
    if not any(get_origin(o) is Literal for o in options):
        return None
    words = []
    for option in options:
        if option is type(None):
            words.append("none")
        elif get_origin(option) is Literal:
            words.append("one of " + ", ".join(map(repr, get_args(option))))
        elif option in _SCALAR_NAMES:
            words.append(_SCALAR_NAMES[option])
        else:
            return None
    return " or ".join(words)


def check(condition: bool, method: str, field: str, message: str) -> None:
    """Raise ConfigError("<method>.<field>: <message>") unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{method}.{field}: {message}")
