"""Built-in methods, one file each. Importing this package registers them."""

from . import bottleneck, lora

__all__ = ["bottleneck", "lora"]
