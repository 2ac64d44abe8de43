"""`attnlab.ops.neighborhood`: the mask rules, the blocked kernel against them, flex, bad input.

The oracle here is written from NATTEN's documented rules (its FlexAttention mask: leader,
centre clamped inward, |centre - key| within the left/right half-windows, same dilation group)
in a different form from `reference_neighborhood_mask` (which walks the rules query by query),
and the attention itself is a float64 einsum in this file.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from torch.testing import assert_close

from attnlab.ops.sdpa import BackendUnavailable
from attnlab.ops.neighborhood import (BlockedConfig, neighborhood_attention, neighborhood_mask_mod,
                                      neighborhood_pairs, reference_neighborhood_mask)


# --- an independent oracle -------------------------------------------------------------------------

def natten_axis_mask(n, k, r, s, causal):
    """(n, n) bool from NATTEN's formulation, vectorised: coordinates inside the dilation group,
    the group's length, the stride-tile leader, then either the causal band or the clamped centre."""
    q = torch.arange(n)[:, None]
    kv = torch.arange(n)[None, :]
    qg, kg = q // r, kv // r                       # coordinates within the dilation group
    same_group = (q % r) == (kv % r)
    length = (n - q % r + r - 1) // r              # length of the query's group
    if causal:
        leader = torch.minimum(qg // s * s + s - 1, length - 1)
        ok = (qg - kg >= 0) & (leader - kg < k)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = torch.minimum(qg // s * s + s // 2, length - 1)
        centre = torch.maximum(torch.minimum(leader, length - 1 - right), torch.full_like(leader, left))
        ok = ((centre - kg >= 0) & (centre - kg <= left)) | ((kg - centre >= 0) & (kg - centre <= right))
    return ok & same_group


def natten_mask(spatial, ks, dil, st, causal):
    mask = torch.ones(1, 1, dtype=torch.bool)
    for n, k, r, s, c in zip(spatial, ks, dil, st, causal):
        a = natten_axis_mask(n, k, r, s, c)
        mask = (mask[:, None, :, None] & a[None, :, None, :]).reshape(mask.shape[0] * n, -1)
    return mask


def per_axis(x, nd):
    return tuple(x) if isinstance(x, tuple) else (x,) * nd


def oracle(q, k, v, ks, dil=1, st=1, causal=False, scale=None):
    """softmax(q k^T * scale, masked) v in float64 over the flattened tokens."""
    spatial = q.shape[2:-1]
    nd = len(spatial)
    mask = natten_mask(spatial, per_axis(ks, nd), per_axis(dil, nd), per_axis(st, nd), per_axis(causal, nd))
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    B, h, N = q.shape[0], q.shape[1], math.prod(spatial)
    qf, kf, vf = (t.reshape(B, h, N, t.shape[-1]).double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", qf, kf) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhnm,bhmd->bhnd", probs, vf).reshape(*q.shape[:-1], v.shape[-1])


def window(mask, query):
    return set(torch.nonzero(mask[query]).flatten().tolist())


# --- the mask itself -------------------------------------------------------------------------------

def test_hand_written_windows():
    m = reference_neighborhood_mask((7,), 3)
    assert window(m, 0) == {0, 1, 2} and window(m, 3) == {2, 3, 4} and window(m, 6) == {4, 5, 6}
    m = reference_neighborhood_mask((7,), 4)                       # even: 2 left, 1 right
    assert window(m, 3) == {1, 2, 3, 4} and window(m, 0) == {0, 1, 2, 3} and window(m, 6) == {3, 4, 5, 6}
    m = reference_neighborhood_mask((8,), 3, dilation=2)           # groups {0,2,4,6} and {1,3,5,7}
    assert window(m, 0) == {0, 2, 4} and window(m, 4) == {2, 4, 6} and window(m, 7) == {3, 5, 7}
    m = reference_neighborhood_mask((7,), 3, dilation=2)           # uneven groups: lengths 4 and 3
    assert window(m, 5) == {1, 3, 5} and window(m, 6) == {2, 4, 6}
    m = reference_neighborhood_mask((6,), 3, is_causal=True)
    assert window(m, 0) == {0} and window(m, 1) == {0, 1} and window(m, 4) == {2, 3, 4}
    m = reference_neighborhood_mask((8,), 4, stride=2)             # leaders 1, 3, 5, 7 (right-hand centre)
    assert window(m, 2) == window(m, 3) == {1, 2, 3, 4} and window(m, 7) == {4, 5, 6, 7}
    m = reference_neighborhood_mask((8,), 4, stride=2, is_causal=True)   # leaders 1, 3, 5, 7 (last)
    assert window(m, 2) == {0, 1, 2} and window(m, 3) == {0, 1, 2, 3} and window(m, 4) == {2, 3, 4}
    m = reference_neighborhood_mask((7,), 3, stride=3)             # blocks, the partial one shifted in
    assert window(m, 0) == window(m, 2) == {0, 1, 2} and window(m, 5) == {3, 4, 5} and window(m, 6) == {4, 5, 6}
    m = reference_neighborhood_mask((3, 4), (3, 2), is_causal=(False, True))
    assert window(m, 1 * 4 + 2) == {r * 4 + c for r in range(3) for c in (1, 2)}


@pytest.mark.parametrize("n,k,r", [(n, k, r) for n in (5, 8, 9, 13) for k in (1, 2, 3, 4, 5) for r in (1, 2, 3)
                                   if k * r <= n])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_mask_matches_natten_formulation(n, k, r, causal):
    for s in range(1, k + 1):
        assert torch.equal(reference_neighborhood_mask((n,), k, r, s, causal), natten_axis_mask(n, k, r, s, causal))
        assert neighborhood_pairs((n,), k, r, s, causal) == int(natten_axis_mask(n, k, r, s, causal).sum())


def test_every_query_sees_exactly_kernel_size_keys_without_causal():
    m = reference_neighborhood_mask((11, 9), (4, 3), dilation=(2, 3), stride=(3, 2))
    assert (m.sum(-1) == 12).all()


def test_mask_mod_matches_reference():
    spatial, ks, dil, st, c = (5, 6, 4), (3, 2, 2), (1, 3, 2), (2, 1, 2), (True, False, False)
    mod = neighborhood_mask_mod(spatial, ks, dil, st, c)
    N = math.prod(spatial)
    idx = torch.arange(N)
    got = mod(torch.zeros(()), torch.zeros(()), idx[:, None], idx[None, :])
    assert torch.equal(got, reference_neighborhood_mask(spatial, ks, dil, st, c))


# --- blocked against the oracle ----------------------------------------------------------------------

CASES = {  # spatial, kernel_size, dilation, stride, is_causal
    "odd": ((13,), 5, 1, 1, False),
    "even": ((13,), 4, 1, 1, False),
    "full_length": ((9,), 9, 1, 1, False),
    "kernel_1": ((6,), 1, 1, 1, False),
    "dilation_even_groups": ((12,), 3, 2, 1, False),
    "dilation_uneven_groups": ((13,), 3, 3, 1, False),
    "stride_odd": ((14,), 5, 1, 3, False),
    "stride_even": ((14,), 4, 1, 2, False),
    "stride_is_kernel": ((12,), 4, 1, 4, False),
    "causal": ((13,), 4, 1, 1, True),
    "causal_stride": ((13,), 4, 1, 3, True),
    "causal_dilation_stride": ((17,), 3, 2, 2, True),
    "all_1d": ((23,), 6, 3, 4, False),
    "2d": ((7, 9), (3, 4), 1, 1, False),
    "2d_combined": ((9, 10), (3, 4), (2, 2), (2, 3), (True, False)),
    "3d": ((4, 5, 6), (2, 3, 3), 1, 1, False),
    "3d_combined": ((5, 6, 7), (2, 3, 2), (2, 1, 3), (2, 3, 1), (False, True, False)),
}
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


def test_reference_backend_matches_oracle():
    torch.manual_seed(0)
    spatial, ks, dil, st, causal = CASES["3d_combined"]
    q, k, v = (torch.randn(1, 2, *spatial, 4, dtype=torch.float64) for _ in range(3))
    assert_close(neighborhood_attention(q, k, v, ks, dil, st, causal, backend="reference"),
                 oracle(q, k, v, ks, dil, st, causal))


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


# --- other backends, dtypes, shapes --------------------------------------------------------------------

def test_flex_on_cpu_without_grad_matches_reference():
    torch.manual_seed(0)
    spatial, ks, dil, st, causal = CASES["2d_combined"]
    q, k, v = (torch.randn(1, 2, *spatial, 8) for _ in range(3))
    out = neighborhood_attention(q, k, v, ks, dil, st, causal, backend="flex")
    assert_close(out, oracle(q, k, v, ks, dil, st, causal).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, oracle(q, k, v, spatial).float())   # the mask did something


def test_explicit_flex_with_grad_on_cpu_refuses_with_reason():
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        neighborhood_attention(q, k, v, 3, backend="flex")


def test_default_backend_on_cpu_has_gradients():
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    neighborhood_attention(q, k, v, 3).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_grouped_query_heads_and_value_width():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 6, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 6, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 3, dtype=torch.float64)
    out = neighborhood_attention(q, k, v, 4, 2, backend="blocked")
    assert out.shape == (2, 4, 9, 3)
    assert_close(out, oracle(q, k, v, 4, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_float32_out_in_dtype(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8).to(dtype) for _ in range(3))
    out = neighborhood_attention(q, k, v, 5)
    assert out.dtype == dtype
    assert_close(out.float(), oracle(q.float(), k.float(), v.float(), 5).float(), rtol=2e-2, atol=2e-2)


def test_empty_batch():
    q, k, v = (torch.randn(0, 2, 7, 4, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3)
    assert out.shape == (0, 2, 7, 4)
    out.sum().backward()


def test_custom_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    assert_close(neighborhood_attention(q, k, v, 3, scale=0.3), oracle(q, k, v, 3, scale=0.3))


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


# --- bad input ---------------------------------------------------------------------------------------

def qkv(*shape):
    return tuple(torch.randn(*shape) for _ in range(3))


def test_kernel_times_dilation_longer_than_axis():
    with pytest.raises(ValueError, match=r"axis 1 has length 6.*kernel_size 4 \* dilation 2 = 8"):
        neighborhood_attention(*qkv(1, 1, 9, 6, 4), (3, 4), dilation=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=0), "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1, got 0"),
    (dict(kernel_size=3, stride=0), "stride must be >= 1, got 0"),
    (dict(kernel_size=3, stride=4), r"stride \(4\) must be <= kernel_size \(3\)"),
    (dict(kernel_size=(3, 3)), r"kernel_size has 2 entries \(3, 3\), expected one per spatial axis \(1\)"),
    (dict(kernel_size=3, backend="cuda"), "unknown backend 'cuda'"),
    (dict(kernel_size=3, config=BlockedConfig(method="fast")), "method must be 'fused', 'sdpa' or 'chunks', got 'fast'"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(*qkv(1, 2, 8, 4), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3.0), dict(kernel_size=True), dict(kernel_size=3, is_causal=1)])
def test_bad_option_types_raise_type_error(kwargs):
    with pytest.raises(TypeError, match="kernel_size|is_causal"):
        neighborhood_attention(*qkv(1, 2, 8, 4), **kwargs)


@pytest.mark.parametrize("shape", [(2, 8, 4), (1, 1, 2, 2, 2, 2, 4)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"\(B, h, \*spatial, d\) with 1 to 3 spatial axes"):
        neighborhood_attention(*qkv(*shape), 1)


def test_mismatched_tensors():
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="share batch and spatial shape"):
        neighborhood_attention(q, k[:, :, :7], v, 3)
    with pytest.raises(ValueError, match="head dim"):
        neighborhood_attention(q, k[..., :3], v, 3)
    with pytest.raises(TypeError, match="floating point"):
        neighborhood_attention(q.long(), k, v, 3)
    with pytest.raises(TypeError, match="one dtype"):
        neighborhood_attention(q, k.double(), v, 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        neighborhood_attention(torch.randn(1, 3, 8, 4), k, v, 3)
