"""`attnlab.ops.neighborhood.fused`: the fused C++ CPU kernel of neighborhood attention.

The oracle: the (N, N) mask of `reference_neighborhood_mask` (itself checked against NATTEN's
formulation in test_rules.py) and masked softmax attention in float64. The
kernel computes in float32, so tolerances are float32's.
"""
from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

from attnlab.ops.neighborhood import fused as na_fused
from attnlab.ops import BackendUnavailable
from attnlab.ops.neighborhood import BlockedConfig, neighborhood_attention

from _oracle import CASES, oracle


pytestmark = pytest.mark.skipif(na_fused.library_status()[0] is None,
                                reason=f"fused kernel unavailable: {na_fused.library_status()[1]}")


def fused(q, k, v, ks, dil=1, st=1, causal=False, threads=None, scale=None):
    return neighborhood_attention(q, k, v, ks, dil, st, causal, scale=scale, backend="blocked",
                                  config=BlockedConfig(method="fused", threads=threads))


def check(spatial, ks, dil=1, st=1, causal=False, *, B=2, h=3, d=16, dv=16, threads=None, seed=0, tol=2e-5):
    torch.manual_seed(seed)
    q, k = (torch.randn(B, h, *spatial, d, requires_grad=True) for _ in range(2))
    v = torch.randn(B, h, *spatial, dv, requires_grad=True)
    out = fused(q, k, v, ks, dil, st, causal, threads)
    want = oracle(q, k, v, ks, dil, st, causal)
    assert out.dtype == torch.float32
    assert_close(out.double(), want, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exp = torch.autograd.grad(want, (q, k, v), grad.double())
    for a, b, name in zip(got, exp, "qkv"):
        assert_close(a.double(), b.double(), rtol=10 * tol, atol=10 * tol, msg=lambda m: f"d{name}: {m}")


CASES = {**CASES,  # the shared geometries, and the ones that stress the fused kernel's windows
         "long_window": ((70,), 33, 1, 1, False),
         "2d_short_rows": ((10, 3), (5, 3), 1, 1, False),
         "3d_k7": ((3, 5, 19), (3, 3, 7), 1, 1, False),
         "3d_full": ((3, 4, 5), (3, 4, 5), 1, 1, False)}


@pytest.fixture(params=["recomputed", "saved"])
def probs(request, monkeypatch):
    """The backward pass either recomputes the probabilities or reads those the forward saved."""
    monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", "1" if request.param == "saved" else "0")
    return request.param


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_oracle_outputs_and_gradients(case, probs):
    spatial, ks, dil, st, causal = CASES[case]
    check(spatial, ks, dil, st, causal, seed=len(case))


# every compiled variant (groups of 4 or 2 queries along the last axis, scores 4 or 2 at a time, or
# 2 x 2 queries over two query rows) on shapes with partial groups at the row ends, odd numbers
# of rows, borders, and long and short windows
@pytest.mark.parametrize("variant", ["4", "4,2", "2", "4x2"])
@pytest.mark.parametrize("case", ["odd", "long_window", "2d", "2d_combined", "2d_short_rows", "3d", "3d_k7",
                                  "3d_combined", "all_1d", "causal_stride"])
def test_every_tile_variant(variant, case, probs, monkeypatch):
    monkeypatch.setenv("ATTNLAB_NA_GROUP", variant)
    na_fused._geometry.cache_clear()
    try:
        spatial, ks, dil, st, causal = CASES[case]
        check(spatial, ks, dil, st, causal)
    finally:
        monkeypatch.delenv("ATTNLAB_NA_GROUP")
        na_fused._geometry.cache_clear()


def _probs_stride(spatial, ks):
    geo = na_fused._geometry(spatial, ks, (1,) * len(spatial), (1,) * len(spatial), (False,) * len(spatial))
    dims = torch.tensor([*geo.dims, 64, 64], dtype=torch.int32)
    lib, _ = na_fused.library_status()
    return int(lib.attnlab_na_probs_stride(na_fused._ptr(dims), na_fused._ptr(geo.windows), geo.group,
                                           geo.group_rows, geo.sub_group))


def test_saved_probabilities_per_query_and_when_they_are_kept(monkeypatch):
    """Each query keeps its key rows x the columns its score tiles computed; they are kept for
    the backward pass when that is at most 4x the memory of q, and only when a gradient is due."""
    assert _probs_stride((16, 32, 32), (3, 7, 7)) == 24 * 8        # 2 x 2 groups: 3 x 8 rows, one vector each
    assert _probs_stride((128, 128), (13, 13)) == 13 * 16
    assert _probs_stride((16384,), (127,)) == 136
    assert _probs_stride((128, 128), (31, 31)) == 32 * 32          # 2 x 2 groups: 32 rows, 4 vectors
    monkeypatch.delenv("ATTNLAB_NA_SAVE_PROBS", raising=False)
    assert na_fused._save_probs(13 * 16, 64, True)
    assert not na_fused._save_probs(31 * 40, 64, True)
    assert not na_fused._save_probs(13 * 16, 32, True)              # 208 > 4 * 32
    assert not na_fused._save_probs(13 * 16, 64, False)             # inference: nothing to save for
    monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", "1")
    assert na_fused._save_probs(31 * 40, 64, True) and not na_fused._save_probs(31 * 40, 64, False)
    monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", "0")
    assert not na_fused._save_probs(8, 64, True)
    monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", "yes")
    with pytest.raises(ValueError, match="ATTNLAB_NA_SAVE_PROBS must be 0 or 1, got 'yes'"):
        na_fused._save_probs(8, 64, True)


@pytest.mark.parametrize("requested", [None, True, False])
def test_config_save_probs_overrides_environment_and_budget(requested, monkeypatch):
    """BlockedConfig(save_probs=...) decides over ATTNLAB_NA_SAVE_PROBS and the 4x-q budget (here
    a 2-D k = 9 with d = 8: 9 rows x 16 columns > 32 floats per query, over budget)."""
    decisions = []
    real = na_fused._save_probs

    def recording(*args):
        decisions.append(real(*args))
        return decisions[-1]

    monkeypatch.setattr(na_fused, "_save_probs", recording)
    monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", "0")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 20, 8, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 9, backend="blocked",
                                 config=BlockedConfig(method="fused", save_probs=requested))
    assert decisions == [bool(requested)]
    assert_close(out.double(), oracle(q, k, v, 9), rtol=2e-5, atol=2e-5)
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want = torch.autograd.grad(oracle(q, k, v, 9), (q, k, v), torch.ones_like(out).double())
    for a, b in zip(got, want):
        assert_close(a.double(), b.double(), rtol=2e-4, atol=2e-4)


def test_saved_and_recomputed_probabilities_give_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 7, 19, 32, requires_grad=True) for _ in range(3))
    grads = {}
    for choice in ("0", "1"):
        monkeypatch.setenv("ATTNLAB_NA_SAVE_PROBS", choice)
        out = fused(q, k, v, (3, 5, 7))
        grads[choice] = (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(grads["0"], grads["1"]):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_forward_matches_oracle():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 21, 16) for _ in range(3))
    with torch.no_grad():
        out = fused(q, k, v, (3, 7))
    assert_close(out.double(), oracle(q, k, v, (3, 7)), rtol=2e-5, atol=2e-5)


def test_layout_follows_the_windows(monkeypatch):
    """Short windows along the last axis (3-D, k = 7) take groups of 2 x 2 queries over two query
    rows (one vector of 8 keys for all four); 2-D k = 13 keeps 4 queries along the last axis; a
    1-D sequence has no second row; a one-row 2-D input cannot pair rows."""
    def layout(spatial, ks):
        n = len(spatial)
        geo = na_fused._geometry(spatial, ks, (1,) * n, (1,) * n, (False,) * n)
        return geo.group, geo.group_rows, geo.sub_group
    monkeypatch.delenv("ATTNLAB_NA_GROUP", raising=False)
    na_fused._geometry.cache_clear()
    assert layout((16, 32, 32), (3, 7, 7)) == (4, 2, 4)
    assert layout((128, 128), (13, 13)) == (4, 1, 4)
    assert layout((16384,), (127,)) == (4, 1, 4)
    assert layout((1, 64), (1, 7)) == (4, 1, 2)
    monkeypatch.setenv("ATTNLAB_NA_GROUP", "3")
    na_fused._geometry.cache_clear()
    with pytest.raises(ValueError, match="ATTNLAB_NA_GROUP must be one of 4, 4,2, 2, 4x2, got '3'"):
        layout((8, 8), (3, 3))
    na_fused._geometry.cache_clear()


@pytest.mark.parametrize("d,dv", [(8, 8), (24, 40), (64, 64), (128, 32)])
def test_head_dims(d, dv):
    check((3, 21), (3, 9), d=d, dv=dv, B=1, h=2, tol=3e-5)


@pytest.mark.parametrize("B,h,threads", [(1, 1, 2), (1, 1, 3), (1, 3, 2), (2, 3, 1), (3, 1, 4)])
def test_work_split_between_threads(B, h, threads):
    """Fewer heads than threads splits each head's queries between calls, with one dk/dv each."""
    check((5, 22), (3, 7), 1, (1, 2), False, B=B, h=h, threads=threads)


def test_repeatable_bit_for_bit_when_heads_are_not_split():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(2):
        out = fused(q, k, v, 9, threads=2)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_large_scores_stay_finite():
    """Row maxima are subtracted before exp: scores of +-1e3 neither overflow nor lose the row."""
    torch.manual_seed(0)
    q = (torch.randn(1, 2, 30, 16) * 40).requires_grad_()
    k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(2))
    out = fused(q, k, v, 7)
    assert torch.isfinite(out).all()
    assert_close(out.double(), oracle(q, k, v, 7), rtol=1e-4, atol=1e-4)
    dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all()


def test_grouped_query_heads_custom_scale_and_layout():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 7, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 7, 16, requires_grad=True) for _ in range(2))
    out = fused(q, k, v, (3, 5), scale=0.3)
    assert_close(out.double(), oracle(q, k, v, (3, 5), scale=0.3), rtol=2e-5, atol=2e-5)
    # non-contiguous inputs (a transposed view) give the same result as contiguous ones
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert_close(fused(qt, k.detach(), v.detach(), (3, 5), scale=0.3), out.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 9, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fused(q, k, v, 3)
    assert out.dtype == dtype
    assert_close(out.double(), oracle(q, k, v, 3), rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_default_method_is_fused_for_float32_and_chunks_for_float64(monkeypatch):
    calls = []
    real = na_fused.fused_neighborhood
    monkeypatch.setattr(na_fused, "fused_neighborhood", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x32 = torch.randn(1, 1, 12, 8)
    neighborhood_attention(x32, x32, x32, 3)
    assert calls == [1]
    x64 = x32.double()
    assert_close(neighborhood_attention(x64, x64, x64, 3), oracle(x64, x64, x64, 3))
    assert calls == [1]


@pytest.mark.parametrize("dtype,d,match", [(torch.float64, 8, "float32"), (torch.float32, 12, "multiples of 8")])
def test_explicit_fused_refuses_with_reason(dtype, d, match):
    x = torch.randn(1, 1, 10, d, dtype=dtype)
    with pytest.raises(BackendUnavailable, match=match):
        neighborhood_attention(x, x, x, 3, backend="blocked", config=BlockedConfig(method="fused"))
    # without an explicit method the call still runs (chunked kernel)
    assert_close(neighborhood_attention(x, x, x, 3).double(), oracle(x, x, x, 3), rtol=1e-5, atol=1e-5)


def test_disabled_by_environment_falls_back(monkeypatch):
    monkeypatch.setenv("ATTNLAB_NA_FUSED", "0")
    lib, why = na_fused.library_status()
    assert lib is None and "ATTNLAB_NA_FUSED=0" in why
    x = torch.randn(1, 2, 11, 8)
    assert_close(neighborhood_attention(x, x, x, 5).double(), oracle(x, x, x, 5), rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendUnavailable, match="ATTNLAB_NA_FUSED"):
        neighborhood_attention(x, x, x, 5, backend="blocked", config=BlockedConfig(method="fused"))


def test_build_failure_is_reported_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")                 # a "compiler" that always fails
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(na_fused, "_state", {})
    lib, why = na_fused.library_status()
    assert lib is None and "could not be built" in why and "false" in why
    x = torch.randn(1, 1, 9, 8)
    assert_close(neighborhood_attention(x, x, x, 3).double(), oracle(x, x, x, 3), rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.rglob("*.so"))            # nothing half-written left behind


def test_build_goes_to_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(na_fused, "_state", {})
    lib, why = na_fused.library_status()
    assert lib is not None, why
    built = list(tmp_path.rglob("na_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(na_fused, "_state", {})
    assert na_fused.library_status()[0] is not None
    assert built[0].stat().st_mtime_ns == stamp         # loaded, not rebuilt
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [built[0].name]


def test_large_outputs_come_from_the_reusing_pool():
    """Outputs of 1M+ elements come from the library's pool: a freed output's block is handed
    out again (already paged in), and the tensors behave like any other."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 64, 64, requires_grad=True) for _ in range(3))    # 4 * 4096 * 64 = 1M
    na_fused.clear_pool()
    out = fused(q, k, v, (3, 5))
    first = out.data_ptr()
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape == (1, 4, 64, 64, 64)
    out.backward(torch.ones_like(out))
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()
    out.mul_(2)                                         # writable like any tensor
    del out
    q.grad = k.grad = v.grad = None                     # dq, dk, dv go back to the pool too
    again = fused(q.detach(), k.detach(), v.detach(), (3, 5))
    assert again.data_ptr() == first                    # the same block, reused
    del again
    assert na_fused.clear_pool() >= 4 * 4096 * 64 * 4   # out, dq, dk, dv blocks were kept
    assert na_fused.clear_pool() == 0


def test_pool_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ATTNLAB_NA_POOL", "0")
    na_fused.clear_pool()
    x = torch.randn(1, 4, 64, 64, 64)
    out = fused(x, x, x, (3, 3))
    del out
    assert na_fused.clear_pool() == 0
