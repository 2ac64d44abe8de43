"""What the contract suites share: one input per layout, the skip helper, spec parameters.

Imported by the suites as `_layouts` (conftest.py puts this folder on sys.path: under
`--import-mode=importlib` test modules cannot import each other).

Each suite in this folder is parametrised by `attnlab.list_specs(layout=...)`, so a mechanism
joins the suite of its layout by registering; there is no list of names to keep in step.
Inputs are channels-last and tiny: the spatial extents below are multiples of 4 (halo2d's
test block size) and not square, so a swapped axis shows.
"""
from __future__ import annotations

import pytest
import torch

DIM, NUM_HEADS = 32, 4          # what make_mechanism (tests/conftest.py) builds by default
SEQ_LEN = 7
SPATIAL = {"2d": (4, 8), "3d": (4, 4, 8)}
CONTEXT_LEN = 5                 # key/value tokens of the cross layout


def input_shape(layout: str, B: int, C: int = DIM) -> tuple[int, ...]:
    """The query input of a layout: (B, N, C) for seq/pool/cross, (B, *spatial, C) spatial."""
    if layout in SPATIAL:
        return (B, *SPATIAL[layout], C)
    return (B, SEQ_LEN, C)


def layout_inputs(layout: str, B: int = 2, dtype=torch.float64, C: int = DIM, scale: float = 1.0):
    """Positional inputs of one forward call: (x,) or, for cross, (x, context)."""
    x = scale * torch.randn(input_shape(layout, B, C), dtype=dtype)
    if layout == "cross":
        return x, scale * torch.randn(B, CONTEXT_LEN, C, dtype=dtype)
    return (x,)


def require(spec, *features):
    """Skip, naming the spec flag, where the spec marks a feature unsupported."""
    for feature in features:
        if not spec.supports(feature):
            pytest.skip(f"{spec.name} does not support {feature} (spec.{feature}=False)")


def spec_param_list(specs, *, empty_reason: str):
    """`pytest.param(spec, id=spec.name)` for each spec, or one skipped entry saying why."""
    if not specs:
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=empty_reason))]
    return [pytest.param(s, id=s.name) for s in specs]
