"""Import a script of this repository (bench/, scripts/) by its path, for the tests that call its
functions: the script folders are not packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str, name: str) -> ModuleType:
    """The module at ROOT / `relative`, imported as `name` (registered in sys.modules: dataclasses
    look their module up by name while the class is built). The script's folder goes on sys.path, as
    when it runs as a script, so its imports of its neighbours (bench/_timing.py, ...) resolve."""
    path = ROOT / relative
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
