"""Reading and writing other libraries' checkpoint formats (HuggingFace PEFT; more can register).

    import modfit.interop as interop
    name = interop.load_external(mm, "peft_adapter/")      # or simply mm.load("peft_adapter/")
    interop.save_external(mm, name, "out/", "peft")         # or mm.save(name, "out/", format="peft")

A format is an `ExternalFormat` registered with `register_format` (see `registry.py`); `peft.py` is
the first.
"""

from .convert import default_name, find_format, load_external, save_external
from .registry import (
    ExternalFormat,
    Imported,
    InteropError,
    detect_format,
    format_named,
    formats,
    register_format,
)

__all__ = [
    "ExternalFormat",
    "Imported",
    "InteropError",
    "default_name",
    "detect_format",
    "find_format",
    "format_named",
    "formats",
    "load_external",
    "register_format",
    "save_external",
]
