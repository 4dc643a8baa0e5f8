"""Loading a module from another library's checkpoint into a ModularModel, and saving one in it.

    name = load_external(mm, "peft_lora/")           # the format is detected; `mm.load` does this too
    save_external(mm, name, "out/", "peft")          # `mm.save(name, "out/", format="peft")`

The format's `read` gives a modfit config and tensors under modfit's own file keys; the module is
added like any other and its units filled from those tensors, so what loads from PEFT is an ordinary
modfit module (saved as one with `mm.save`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..persistence import fill_module
from .registry import ExternalFormat, InteropError, detect_format, format_named

if TYPE_CHECKING:
    from ..model import ModularModel


def find_format(folder: str | Path, format: str | None = None) -> ExternalFormat:
    """The format `format` names, or the one that recognises `folder`.

    Raises:
        InteropError: `format` is unknown, or no registered format recognises the folder.
    """
    if format is not None:
        return format_named(format)
    found = detect_format(folder)
    if found is None:
        raise InteropError(f"{folder}: not a checkpoint of any known format")
    return found


def default_name(folder: str | Path) -> str:
    """A module name from a folder's name: characters outside [A-Za-z0-9_-] become `_`."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(folder).resolve().name).lstrip("_-")
    return name or "imported"


def load_external(
    mm: ModularModel, folder: str | Path, name: str | None = None, *, format: str | None = None
) -> str:
    """Add the module stored in `folder` (another library's format) to `mm`; returns its name.

    Args:
        name: the module's name on `mm` (default: the checkpoint's own, else the folder's name).
        format: a registered format name (default: detected from the folder).

    Raises:
        InteropError: the folder is not in a known format, or holds something modfit cannot express.
        TargetError: the checkpoint's modules do not exist on this model.
    """
    folder = Path(folder)
    fmt = find_format(folder, format)
    imported = fmt.read(folder, mm.view)
    new_name = name or imported.name or default_name(folder)
    mm.add(new_name, imported.config, imported.head, task=imported.card.get("task"))
    try:
        fill_module(
            mm,
            new_name,
            imported.tensors,
            folder,
            mismatch="the checkpoint's tensors do not fit the module they describe",
            error=InteropError,
        )
    except BaseException:
        mm.remove(new_name)
        raise
    mm.records[new_name].card.update({k: v for k, v in imported.card.items() if k != "task"})
    return new_name


def save_external(mm: ModularModel, name: str, folder: str | Path, format: str, **options: Any) -> Path:
    """Write module `name` of `mm` to `folder` in the registered format `format`; returns the folder.

    Raises:
        InteropError: the format cannot hold this module (the message names the setting).
    """
    return format_named(format).write(mm, name, folder, **options)
