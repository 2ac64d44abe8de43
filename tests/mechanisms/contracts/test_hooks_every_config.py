"""Hook-point contract (attnlab.hooks) over every registered mechanism and test config.

Each name in `hook_names` is a HookPoint submodule that fires once per eval-mode forward on the
eager path; those not in `eager_hook_names` fire on the default path too; a recording hook
leaves the output unchanged; `optional_hook_names` exist as HookPoints.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.hooks import HookPoint

DIM, HEADS = 32, 4
INPUT_SHAPE = {"seq": (2, 8, DIM), "pool": (2, 8, DIM), "cross": (2, 8, DIM), "2d": (2, 8, 8, DIM),
               "3d": (2, 4, 4, 4, DIM)}
CONTEXT_SHAPE = (2, 5, DIM)   # the cross layout's second input

CASES, IDS = [], []
for _spec in attnlab.list_specs():
    for _i, _kw in enumerate((_spec.test_kwargs, *_spec.test_configs)):
        CASES.append(dataclasses.replace(_spec, test_kwargs=dict(_kw), test_configs=()))
        IDS.append(_spec.name if _i == 0 else f"{_spec.name}-cfg{_i}")


def build(spec):
    torch.manual_seed(0)
    m = attnlab.create(spec.name, DIM, HEADS, **spec.test_kwargs).double().eval()
    x = (torch.randn(*INPUT_SHAPE[spec.layout], dtype=torch.float64),)       # the positional inputs
    if spec.layout == "cross":
        x += (torch.randn(*CONTEXT_SHAPE, dtype=torch.float64),)
    return m, x


def eager(m):
    """The documented way to the eager path for every mechanism (attnlab.hooks)."""
    if hasattr(m, "backend"):
        m.backend = "reference"
    return m


def run_counting(m, x, names):
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        def record(mod, inp, out, name=name):
            counts[name] += 1
        handles.append(getattr(m, name).register_forward_hook(record))
    try:
        with torch.no_grad():
            y = m(*x)
    finally:
        for h in handles:
            h.remove()
    return y, counts


@pytest.mark.parametrize("spec", CASES, ids=IDS)
def test_hook_names_declared(spec):
    m, _ = build(spec)
    names = m.hook_names
    eager = m.eager_hook_names
    optional = getattr(m, "optional_hook_names", ())
    assert names and len(set(names)) == len(names)
    assert set(eager) <= set(names)
    assert not set(optional) & set(names)
    for name in (*names, *optional):
        assert name.startswith("hook_") and isinstance(getattr(m, name), HookPoint), name
    # every HookPoint directly on the module is declared (submodules declare their own)
    own = {n for n, c in m.named_children() if isinstance(c, HookPoint)}
    assert own == set(names) | set(optional)


@pytest.mark.parametrize("spec", CASES, ids=IDS)
def test_hooks_fire_on_the_eager_path_and_change_nothing(spec):
    m, x = build(spec)
    eager(m)
    names = m.hook_names
    with torch.no_grad():
        plain = m(*x)
    y, counts = run_counting(m, x, names)
    assert counts == dict.fromkeys(names, 1), counts
    assert torch.equal(y, plain)


@pytest.mark.parametrize("spec", CASES, ids=IDS)
def test_fast_path_hooks_fire_and_eager_equals_default(spec):
    m, x = build(spec)
    fast = [n for n in m.hook_names if n not in m.eager_hook_names]
    y, counts = run_counting(m, x, fast)
    assert counts == dict.fromkeys(fast, 1), counts
    with torch.no_grad():
        slow = eager(m)(*x)
    assert_close(slow, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["mhsa", "moh", "selective", "halo2d"])
def test_use_backend_reference_also_reaches_the_eager_hooks(name):
    m, x = build(attnlab.get_spec(name))
    seen = []
    m.hook_probs.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        m(*x)
        assert seen == []                      # the fused path never forms probs
        with attnlab.use_backend("reference"):
            m(*x)
    assert len(seen) == 1


def test_a_hook_can_edit_the_probs():
    m, x = build(attnlab.get_spec("mhsa"))
    eager(m)
    v_seen = {}
    m.hook_v.register_forward_hook(lambda mod, inp, out: v_seen.setdefault("v", out))
    m.hook_probs.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    m.hook_out.register_forward_hook(lambda mod, inp, out: v_seen.setdefault("out", out))
    with torch.no_grad():
        m(*x)
    assert torch.equal(v_seen["out"], torch.zeros_like(v_seen["out"]))
