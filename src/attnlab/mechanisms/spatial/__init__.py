"""Spatial mechanisms, channels-last: x (B, *spatial, C) -> (B, *spatial, C). Importing this package registers them.

Every module in this folder is imported, so adding a mechanism is adding one file and
removing it is deleting that file.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
