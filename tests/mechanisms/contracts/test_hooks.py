"""Hook points (attnlab.hooks convention): every mechanism declares `hook_names`, each a
submodule that fires in an eval forward, and hooking changes nothing.

The guaranteed core: `hook_q`, `hook_k`, `hook_v`, `hook_out` on every mechanism, and
`hook_scores` or `hook_probs` where an eager path exists (a "reference" backend, or no backend
option at all: always eager). The eager path is taken with `m.backend = "reference"`. A core
tensor the formula never holds whole (linear_infsa projects q, k, v chunk by chunk and has no
N x N matrix) is listed in the class's `absent_hooks` with the reason.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import attnlab
from _layouts import layout_inputs

SPECS = [pytest.param(s, id=s.name) for s in attnlab.list_specs()]
CORE = ("hook_q", "hook_k", "hook_v", "hook_out")


def _declared(m):
    names = getattr(m, "hook_names", None)
    assert names is not None, f"{type(m).__name__} declares no hook_names"
    return tuple(names), tuple(getattr(m, "optional_hook_names", ())), tuple(getattr(m, "eager_hook_names", ()))


def _eager(m):
    if hasattr(m, "backend"):
        m.backend = "reference"
    return m


@pytest.mark.parametrize("spec", SPECS)
def test_core_hooks_declared(spec, make_mechanism):
    """Every core hook exists, or the class says in `absent_hooks` why its formula never holds
    that tensor whole; scores/probs split by head kind (hook_scores_local, ...) count."""
    m = make_mechanism(spec)
    names, optional, _ = _declared(m)
    have = set(names) | set(optional)
    absent = dict(getattr(m, "absent_hooks", {}))
    bad_reasons = [n for n, why in absent.items() if not (isinstance(why, str) and why.strip())]
    assert not bad_reasons, f"{spec.name}: absent_hooks without a reason: {bad_reasons}"
    both = sorted(set(absent) & have)
    assert not both, f"{spec.name}: hooks both declared and listed as absent: {both}"
    missing = [n for n in CORE if n not in have and n not in absent]
    if not spec.backends or "reference" in spec.backends:
        kinds = {n for n in have | set(absent) if n.startswith(("hook_scores", "hook_probs"))}
        if not kinds:
            missing.append("hook_scores or hook_probs")
    assert not missing, f"{spec.name} lacks core hook points {missing} (declares {sorted(have)})"


@pytest.mark.parametrize("spec", SPECS)
def test_declared_hooks_are_submodules_and_fire(spec, make_mechanism):
    m = _eager(make_mechanism(spec))
    names, optional, eager = _declared(m)
    assert set(eager) <= set(names), f"eager_hook_names {eager} not within hook_names {names}"
    modules = dict(m.named_modules())
    not_modules = [n for n in (*names, *optional) if modules.get(n) is not getattr(m, n, None)
                   or not isinstance(getattr(m, n, None), torch.nn.Module)]
    assert not not_modules, f"{spec.name}: hook points that are not direct submodules: {not_modules}"
    fired = {n: 0 for n in names}
    handles = [getattr(m, n).register_forward_hook(lambda mod, args, out, n=n: fired.__setitem__(n, fired[n] + 1))
               for n in names]
    with torch.no_grad():
        m(*layout_inputs(spec.layout))
    for h in handles:
        h.remove()
    silent = [n for n, c in fired.items() if c == 0]
    assert not silent, f"{spec.name}: declared hooks that did not fire on the eager path: {silent}"


@pytest.mark.parametrize("path", ["eager", "default"])
@pytest.mark.parametrize("spec", SPECS)
def test_hooks_leave_the_output_unchanged(spec, path, make_mechanism):
    m = make_mechanism(spec)
    if path == "eager":
        _eager(m)
    names, _, eager = _declared(m)
    x = layout_inputs(spec.layout)
    with torch.no_grad():
        y = m(*x)
        seen = []
        handles = [getattr(m, n).register_forward_hook(lambda mod, args, out: seen.append(out.shape))
                   for n in names]
        y_hooked = m(*x)
        for h in handles:
            h.remove()
    assert seen, f"{spec.name}: no hook fired on the {path} path"
    if path == "default":
        assert len(seen) >= len(set(names) - set(eager))
    assert_close(y_hooked, y, rtol=0, atol=0)
