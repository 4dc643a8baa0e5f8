"""Atomic file writes: write a temporary file beside the target, then rename over it.

A reader (or a crash) never sees half a file: the target holds either the old or the new content.
`atomic_write_group` extends this to files that belong together (a module's weights and card): all
are produced before any is renamed, so a failure while writing any of them changes none of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then rename it to `path`.

    The temporary file sits in the target's folder (same file system, so the rename is atomic)
    and is removed if `write` fails.
    """
    atomic_write_group([(path, write)])


def atomic_write_group(files: Sequence[tuple[str | Path, Callable[[str], None]]]) -> None:
    """Produce every file as a temporary file first, then rename them over their targets in order.

    If any `write` fails, every temporary file is removed and no target has changed. (Only a crash
    between two of the final renames can leave a mix of old and new files.)
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def json_writer(data: Any) -> Callable[[str], None]:
    """A writer (for `atomic_write`) of `data` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    return write


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, json_writer(data))


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def safetensors_writer(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Callable[[str], None]:
    """A writer (for `atomic_write`) of tensors (made contiguous, detached, on CPU) as safetensors."""
    # clone: safetensors refuses tensors that share storage (tied or sliced views)
    clean = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(clean, tmp, metadata=metadata)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write tensors (made contiguous, detached, on CPU) as safetensors."""
    atomic_write(path, safetensors_writer(tensors, metadata))
