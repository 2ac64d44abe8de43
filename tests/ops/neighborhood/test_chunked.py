"""`attnlab.ops.neighborhood.chunked`: the blocked backend's PyTorch kernels (methods chunks
and sdpa) against a float64 einsum, gradients, limiting cases, the worker threads.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from torch.testing import assert_close

from attnlab.ops.neighborhood import BlockedConfig, neighborhood_attention

from _oracle import CASES, oracle


# --- blocked against the oracle ----------------------------------------------------------------------

TILES = {"default": None, "small": 2, "odd": 3}

METHODS = ("sdpa", "chunks")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tile", list(TILES), ids=list(TILES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_blocked_matches_oracle_outputs_and_gradients(case, tile, method):
    spatial, ks, dil, st, causal = CASES[case]
    torch.manual_seed(len(case))
    nd = len(spatial)
    config = BlockedConfig(tile=None if TILES[tile] is None else (TILES[tile],) * nd, chunk_scores=300,
                           threads=2 if tile == "odd" else 1, method=method)
    q, k, v = (torch.randn(2, 3, *spatial, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, ks, dil, st, causal, backend="blocked", config=config)
    want = oracle(q, k, v, ks, dil, st, causal)
    assert_close(out, want)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exp = torch.autograd.grad(want, (q, k, v), grad)
    for a, b, name in zip(got, exp, "qkv"):
        assert_close(a, b, msg=lambda m: f"d{name}: {m}")

@pytest.mark.parametrize("method", METHODS)
def test_blocked_long_1d_runs_and_float32(method):
    """Long enough for multi-tile strided-view chunks, several workers, float32 tolerance."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 16, requires_grad=True) for _ in range(3))
    for ks, dil, st, causal in [(31, 1, 1, False), (16, 2, 1, True), (9, 3, 3, False)]:
        out = neighborhood_attention(q, k, v, ks, dil, st, causal, backend="blocked",
                                     config=BlockedConfig(tile=(16,), chunk_scores=20000, threads=2, method=method))
        want = oracle(q, k, v, ks, dil, st, causal).float()
        assert_close(out, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            assert_close(a, b, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_blocked(method):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return neighborhood_attention(q, k, v, (2, 3), 1, (1, 2), (True, False), backend="blocked",
                                      config=BlockedConfig(tile=(2, 2), chunk_scores=50, threads=1, method=method))
    assert torch.autograd.gradcheck(f, (q, k, v))

# --- limiting cases ----------------------------------------------------------------------------------

def test_kernel_equal_to_length_is_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 6, 8, dtype=torch.float64) for _ in range(3))
    out = neighborhood_attention(q, k, v, (5, 6), backend="blocked")
    full = torch.nn.functional.scaled_dot_product_attention(*(t.flatten(2, 3) for t in (q, k, v)))
    assert_close(out, full.view_as(out))

def test_stride_equal_to_kernel_is_blocked_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float64) for _ in range(3))
    out = neighborhood_attention(q, k, v, 4, stride=4, backend="blocked")
    blocks = torch.nn.functional.scaled_dot_product_attention(*(t.reshape(2, 3, 3, 4, 8) for t in (q, k, v)))
    assert_close(out, blocks.reshape_as(out))

# --- worker threads -------------------------------------------------------------------------------

def test_workers_leave_thread_settings_alone():
    before = torch.get_num_threads()
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    neighborhood_attention(q, k, v, 9, config=BlockedConfig(chunk_scores=2000, threads=2, method="chunks"))
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before]

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_workers():
    """A child forked after the pool started inherits no threads: it must not wait on them."""
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    config = BlockedConfig(chunk_scores=2000, threads=2, method="chunks")
    want = neighborhood_attention(q, k, v, 9, config=config)
    pid = os.fork()
    if pid == 0:                                   # child: exit code 0 only if the result is right
        try:
            os._exit(0 if torch.equal(neighborhood_attention(q, k, v, 9, config=config), want) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in neighborhood_attention")
