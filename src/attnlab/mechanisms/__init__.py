"""Every built-in mechanism, one paper per file; importing this package registers them all.

The layout (seq, 2d, 3d, cross, pool) lives on each class's spec, not in folder names. Every module
here is imported, so adding a mechanism is adding one file and removing it is deleting one.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
