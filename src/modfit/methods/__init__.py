"""Built-in methods, one file each. Importing this package registers every module in it.

Adding a method means adding its file here: the loop below imports it, and its
`@register_method` decorator puts it in the registry. Nothing else names a method.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
