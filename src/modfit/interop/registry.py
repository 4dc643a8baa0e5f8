"""The registry of external checkpoint formats (PEFT, later AdapterHub `adapters`, ...).

A format is one object with four parts::

    name                        "peft"
    detect(folder) -> bool      does this folder hold a checkpoint of the format?
    read(folder, view)          -> Imported: a modfit config and its tensors under modfit's file keys
    files(mm, name, **options)  -> [(file name, writer)]: what `write` puts in the folder

`write` (here, not per format) produces every file first and renames them into place together
(`atomic.atomic_write_group`), so a failed export leaves an earlier one intact. Loading and saving
through a ModularModel live in `convert.py`; nothing here names a method.
"""

from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_write_group
from ..config import ModuleConfig
from ..heads import HeadConfig
from ..targets import ModelView

if TYPE_CHECKING:
    from ..model import ModularModel

Writer = Callable[[str], None]


class InteropError(ValueError):
    """A checkpoint of another library cannot be read or written; the message names the file and key."""


H = TypeVar("H")


class Handlers(dict[str, H]):
    """A format's handlers by key (PEFT's `peft_type`, a modfit method, ...), filled by decorating each
    handler with `@table.register(key, ...)`."""

    def register(self, *keys: str) -> Callable[[H], H]:
        def decorate(fn: H) -> H:
            self.update(dict.fromkeys(keys, fn))
            return fn

        return decorate


def read_json(path: Path) -> Any:
    """A JSON file's value.

    Raises:
        InteropError: naming `path` and the line, for invalid JSON.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def read_tensors(
    folder: Path, safetensors: str, pickled: str, what: str
) -> tuple[dict[str, torch.Tensor], Path]:
    """(tensors, the file read): `folder/safetensors`, else the pickled `folder/pickled` (weights only).

    Raises:
        InteropError: neither file is there (`what` says whose weights they are), or one is unreadable.
    """
    safe = folder / safetensors
    if safe.is_file():
        try:
            return load_file(str(safe)), safe
        except (SafetensorError, OSError) as e:
            raise InteropError(f"{safe}: cannot read safetensors: {e}") from None
    if (folder / pickled).is_file():
        return read_weights_only(folder / pickled), folder / pickled
    raise InteropError(f"{folder}: neither {safetensors} nor {pickled} ({what})")


def read_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, unpickled with `weights_only=True`: tensors and plain containers only.

    Raises:
        InteropError: naming `path`, when it is no such file or holds anything but names and tensors.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise InteropError(f"{path}: cannot read as a weights-only torch file: {first}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InteropError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


@dataclass
class Imported:
    """A module read from another library's checkpoint.

    Attributes:
        config: the modfit config that builds the same units.
        tensors: the units' tensors under modfit's file keys (`units.<site path>.<param>`).
        card: what the checkpoint says about itself, kept on the module's card (task, base name, ...).
        name: a suggested module name (None: the folder's name).
        head: the module's task head, when the checkpoint has one (its tensors under `head.<param>`).
    """

    config: ModuleConfig
    tensors: dict[str, torch.Tensor]
    card: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    head: HeadConfig | None = None


class ExternalFormat(ABC):
    """One external checkpoint format; subclasses register an instance with `register_format`."""

    name: str = ""

    @abstractmethod
    def detect(self, folder: Path) -> bool:
        """Whether `folder` holds a checkpoint of this format (cheap: file names and a JSON key)."""

    @abstractmethod
    def read(self, folder: Path, view: ModelView) -> Imported:
        """The module stored in `folder`, for the base model seen through `view`.

        Raises:
            InteropError: a missing or malformed file, or a setting modfit cannot express (named).
        """

    @abstractmethod
    def files(self, mm: ModularModel, name: str, **options: Any) -> list[tuple[str, Writer]]:
        """The files that hold module `name` of `mm` in this format: (file name, writer) pairs.

        Raises:
            InteropError: the module's method or settings have no equivalent in this format (named).
        """

    def write(self, mm: ModularModel, name: str, folder: str | Path, **options: Any) -> Path:
        """Write module `name` of `mm` to `folder` in this format, all files or none; returns the folder."""
        folder = Path(folder)
        atomic_write_group([(folder / file, writer) for file, writer in self.files(mm, name, **options)])
        return folder


_FORMATS: dict[str, ExternalFormat] = {}


def register_format(fmt: ExternalFormat) -> ExternalFormat:
    """Add a format to the registry under `fmt.name` (a later registration of the same name replaces it)."""
    _FORMATS[fmt.name] = fmt
    return fmt


def _ensure_builtin() -> None:
    from . import adapters, peft  # noqa: F401  (register themselves)


def formats() -> list[str]:
    """The names of the registered formats."""
    _ensure_builtin()
    return sorted(_FORMATS)


def format_named(name: str) -> ExternalFormat:
    """The format registered as `name`.

    Raises:
        InteropError: no such format (the message lists the known ones).
    """
    _ensure_builtin()
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise InteropError(f"unknown checkpoint format '{name}'; known: {known}") from None


def detect_format(folder: str | Path) -> ExternalFormat | None:
    """The registered format whose `detect` recognises `folder`, or None."""
    _ensure_builtin()
    path = Path(folder)
    if not path.is_dir():
        return None
    return next((fmt for fmt in _FORMATS.values() if fmt.detect(path)), None)
