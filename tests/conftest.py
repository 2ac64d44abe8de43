"""Shared fixtures for the attnlab test suite.

- Every test starts from `torch.manual_seed(0)` (autouse), so failures reproduce.
- `make_mechanism(spec, ...)` builds a registered mechanism from its spec with the spec's own
  `test_kwargs`, in eval mode and in the requested dtype (float64 by default); the shared
  property suite builds every module through it, so a new mechanism needs no test plumbing.
- `registry_snapshot` restores the registry after a test registers throwaway mechanisms;
  `backend_spy` records which attention backend ran and can make one refuse.
- Hypothesis runs a small, deterministic profile by default (`HYPOTHESIS_PROFILE=thorough`
  for a longer search).
- Tests marked `gpu` are skipped when CUDA is absent.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings

import attnlab

# Under pytest-xdist each worker gets one intra-op thread: `make test` runs as many workers as
# cores, and two processes with two OpenMP/MKL threads each on two cores made a LAPACK-heavy
# test spin for two minutes instead of one second.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Typical sizes for the shared suite: 4 heads of width 8.
DIM = 32
NUM_HEADS = 4

settings.register_profile(
    "default", max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


def build_mechanism(spec, dim: int = DIM, num_heads: int = NUM_HEADS, *, dtype=torch.float64,
                    train: bool = False, **overrides) -> torch.nn.Module:
    """`attnlab.create(spec.name, dim, num_heads, **spec.test_kwargs, **overrides)` in `dtype`.

    The module is in eval mode unless `train=True`; `overrides` replace test_kwargs entries.
    """
    name = spec if isinstance(spec, str) else spec.name
    spec = attnlab.get_spec(name)
    kwargs = {**spec.test_kwargs, **overrides}
    module = attnlab.create(name, dim, num_heads, **kwargs)
    module = module.to(dtype)
    module.train(train)
    return module


@pytest.fixture
def make_mechanism():
    """Factory fixture: `make_mechanism(spec_or_name, dim=32, num_heads=4, dtype=float64, **kw)`."""
    return build_mechanism


@pytest.fixture
def registry_snapshot():
    """Restore attnlab's registry after a test that registers throwaway mechanisms."""
    from attnlab import registry
    attnlab.list_specs()  # load the built-in mechanisms before the snapshot
    saved = dict(registry._REGISTRY)
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def backend_spy(monkeypatch):
    """Record which backend `attnlab.ops.attention` runs for each call.

    Returns `spy` with `spy.ran` (backend names in call order) and `spy.refuse(name, reason)`,
    which makes that backend report that it cannot run. ATTNLAB_BACKEND is cleared so the
    default is the automatic pick.
    """
    table = importlib.import_module("attnlab.ops.sdpa").IMPLEMENTATIONS
    monkeypatch.delenv("ATTNLAB_BACKEND", raising=False)
    ran: list[str] = []
    for name, (reasons, run) in list(table.items()):
        def spy_run(*args, _name=name, _run=run, **kwargs):
            ran.append(_name)
            return _run(*args, **kwargs)
        monkeypatch.setitem(table, name, (reasons, spy_run))

    def refuse(name: str, reason: str) -> None:
        _, run = table[name]
        monkeypatch.setitem(table, name, (lambda *args: [reason], run))

    return SimpleNamespace(ran=ran, refuse=refuse)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _tinyshakespeare_fallback() -> None:
    """Tests that train on tiny-shakespeare use the 200k-character slice in tests/data when the
    full corpus (../shared/data) is not beside this checkout, e.g. in a clone elsewhere."""
    import os

    from attnlab.tasks import tinyshakespeare as ts
    if os.environ.get(ts.ENV_VAR):
        return
    try:
        ts.find_corpus()
    except FileNotFoundError:
        os.environ[ts.ENV_VAR] = str(Path(__file__).parent / "data" / "tinyshakespeare_head.txt")


_tinyshakespeare_fallback()
