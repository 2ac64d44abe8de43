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


def cross_mhsa_oracle(m, num_heads: int = NUM_HEADS):
    """`cross_mhsa` carrying `m`'s weights, the oracle of the cross suite, or None with the reason
    where m's parameters are not cross_mhsa's (timm names: q (C, C), kv (2 h_kv d, C_ctx), proj).

    A cross mechanism that claims `exact=True` and keeps these names must equal it; one that
    computes something else (or names its weights otherwise) is not compared.
    """
    import attnlab  # the suites import attnlab anyway; here only the oracle needs it

    state = m.state_dict()
    need = ("q.weight", "kv.weight", "proj.weight")
    if not all(k in state for k in need):
        return None, f"no {'/'.join(need)} parameters"
    dim, context_dim = state["q.weight"].shape[1], state["kv.weight"].shape[1]
    head_dim = dim // num_heads
    if state["q.weight"].shape[0] != dim or state["kv.weight"].shape[0] % (2 * head_dim):
        return None, f"q {tuple(state['q.weight'].shape)} / kv {tuple(state['kv.weight'].shape)} are not (C, C) / (2 h_kv d, C_ctx)"
    num_kv_heads = state["kv.weight"].shape[0] // (2 * head_dim)
    scale = getattr(m, "scale", None)
    try:
        oracle = attnlab.create("cross_mhsa", dim, num_heads, context_dim=context_dim, num_kv_heads=num_kv_heads,
                                qkv_bias="q.bias" in state, proj_bias="proj.bias" in state,
                                scale=scale if isinstance(scale, float) else None)
        oracle.load_state_dict({k: state[k] for k in oracle.state_dict()}, strict=True)
    except (KeyError, RuntimeError, ValueError) as err:
        return None, f"its weights do not load into cross_mhsa ({type(err).__name__}: {err})"
    return oracle.to(state["q.weight"].dtype).eval(), ""
