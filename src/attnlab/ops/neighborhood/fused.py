"""The fused CPU kernel of neighborhood attention: `csrc/na_cpu.cpp`, built on first use.

`neighborhood_attention`'s blocked backend uses it on CPU (method "fused", the default where it
can run): float32 compute, head dims multiples of 8, forward and backward in one C++ pass each,
no (N, N) or per-tile mask and no Python work per tile. See the C++ file's header for the
algorithm. Where it cannot run (no C++ compiler, another device, float64, odd head dims, or
ATTNLAB_NA_FUSED=0) the blocked backend falls back to its chunked PyTorch kernel, and
`fused_reasons` says why.

Build: `g++ -O3 -march=native` (or $CXX) into $ATTNLAB_CACHE/kernels (default
~/.cache/attnlab/kernels), keyed by the source, the flags, the compiler and the CPU, written to
a temporary name and renamed, so concurrent first calls are safe; a new build removes the
others (a loaded library stays valid after its file is removed). It is loaded with ctypes:
plain C functions on raw pointers, no torch headers (a build takes a few seconds), and ctypes
releases the GIL, so the calls run on Python threads in parallel, one per intra-op thread
(whole heads per thread; with fewer heads than threads, query ranges, each with its own dk, dv).

Outputs of 1M+ elements (out, dq, dk, dv, saved probabilities) come from the library's pool
through DLPack: blocks torch frees are kept (up to 512 MiB) and reused already paged in;
`clear_pool()` frees them.

Saved probabilities: when a gradient is due and they take at most 4x the memory of q, the forward
pass keeps each query's probabilities (its group's key rows x the columns its score tiles
computed: 136, 208 and 192 floats per query for 1-D k = 127, 2-D k = 13 and 3-D k = (3, 7, 7)) and
the backward pass reads them instead of recomputing q.k and exp. `BlockedConfig(save_probs=False/True)` decides per call;
else ATTNLAB_NA_SAVE_PROBS=0 never keeps them (least memory), =1 always does.

Per call (q, k (BH, N, d), v (BH, N, dv), tokens (n0, n1, n2) row-major after padding to three
axes): a dilated axis is first reordered into group order (all positions = g mod r, for each
g), which turns every window into a contiguous range; the kernel gets, per axis and position,
the first and last key it may see (`_Geometry`).

Environment: ATTNLAB_NA_FUSED=0 (never use the kernel), ATTNLAB_NA_POOL=0 (plain torch outputs),
ATTNLAB_NA_SAVE_PROBS=0/1 (see above), CXX (the compiler), ATTNLAB_CACHE (where builds go); for
tuning only, ATTNLAB_NA_GROUP ("4", "4,2", "2": queries per group and per score tile; "4x2":
groups of 2 x 2 queries over two query rows) and ATTNLAB_NA_CFLAGS (extra flags).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlab.ops.neighborhood.rules import axis_windows

__all__ = ["fused_reasons", "fused_neighborhood", "library_status", "clear_pool"]

_SOURCE = Path(__file__).with_name("csrc") / "na_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
_ABI = 6
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("ATTNLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "attnlab")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = (*_FLAGS, *os.environ.get("ATTNLAB_NA_CFLAGS", "").split())      # extra flags: for tuning
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256("\n".join([_SOURCE.read_text(), " ".join(flags), version, _cpu_signature()])
                         .encode()).hexdigest()[:16]
    target = _cache_dir() / f"na_cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
            for old in target.parent.glob("na_cpu-*.so"):      # builds of other sources or flags
                if old != target:
                    old.unlink(missing_ok=True)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if lib.attnlab_na_abi_version() != _ABI:
        raise RuntimeError(f"{target} has ABI {lib.attnlab_na_abi_version()}, expected {_ABI}")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.attnlab_na_forward.argtypes = [p] * 6 + [i64] * 5 + [p, p, f32, i32, i32, i32]
    lib.attnlab_na_backward.argtypes = [p] * 7 + [i64, i32] + [p] * 3 + [i64] * 4 + [p, p, f32, i32, i32, i32]
    lib.attnlab_na_forward.restype = lib.attnlab_na_backward.restype = i32
    lib.attnlab_na_probs_stride.argtypes = [p, p, i32, i32, i32]
    lib.attnlab_na_probs_stride.restype = i64
    lib.attnlab_na_tensor.argtypes = [i32, p]
    lib.attnlab_na_tensor.restype = p
    lib.attnlab_na_pool_clear.argtypes = []
    lib.attnlab_na_pool_clear.restype = i64

    return lib


def library_status() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library or None, why not). Builds it on the first call."""
    if os.environ.get("ATTNLAB_NA_FUSED", "1") == "0":
        return None, "disabled by ATTNLAB_NA_FUSED=0"
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"], _state["why"] = _build(), ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"], _state["why"] = None, f"the fused CPU kernel could not be built: {exc}"
    return _state["lib"], _state["why"]


def fused_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    """Why the fused kernel cannot run these inputs ([] when it can)."""
    reasons = []
    if q.device.type != "cpu":
        reasons.append(f"the fused kernel runs on CPU only, got {q.device}")
    if q.dtype == torch.float64:
        reasons.append("the fused kernel computes in float32; float64 inputs use the chunked kernel")
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        reasons.append(f"the fused kernel needs head dims that are multiples of 8, got d={q.shape[-1]}, "
                       f"dv={v.shape[-1]}")
    if not reasons:
        lib, why = library_status()
        if lib is None:
            reasons.append(why)
    return reasons


# --- geometry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    dims: tuple[int, int, int]          # (n0, n1, n2), spatial padded with leading 1s
    windows: Tensor                     # int32: lo0, hi0 (n0 each), lo1, hi1, lo2, hi2
    perms: tuple                        # per padded axis: LongTensor (group order) or None
    inverse: tuple                      # per padded axis: the inverse permutation or None
    group: int                          # queries per group (2 or 4)
    group_rows: int                     # query rows (axis 1) per group: 1, or 2 (then 2 x 2 queries)
    sub_group: int                      # queries per score tile (2, or group)

    @property
    def groups(self) -> int:
        """Groups in one head (the kernel's flat group range)."""
        n0, n1, n2 = self.dims
        return n0 * -(-n1 // self.group_rows) * -(-n2 // (self.group // self.group_rows))


def _axis(n: int, k: int, r: int, s: int, causal: bool):
    """Per position of the group-ordered axis: first and last key (group-ordered), and the order."""
    g, _, _, first, last = axis_windows(n, k, r, s, causal)
    if r == 1:
        return first, last, None
    sizes = torch.tensor([len(range(j, n, r)) for j in range(r)])
    offset = torch.cumsum(sizes, 0) - sizes                  # where each group starts
    perm = torch.cat([torch.arange(j, n, r) for j in range(r)])
    return (offset[g] + first)[perm], (offset[g] + last)[perm], perm


def _score_tiles(lo: Tensor, hi: Tensor, G: int, SG: int) -> int:
    """Query-rows x 8-key vectors the score tiles compute along the last axis: groups of G
    queries, scored SG at a time over the union of their windows."""
    n = lo.numel()
    first = torch.arange(0, n, SG)
    last = (first + SG).clamp(max=n) - 1
    return int((((hi[last] - lo[first] + 1 + 7) // 8) * SG).sum())


# A four-query score tile does ~1.4x the FLOPs per second of a two-query tile (measured in L1 on
# this kernel's tiles, 83 vs 55 GFLOP/s on one Zen 3 core), so two-query tiles pay off only where
# they skip more than that: short windows (k = 7: 8 keys for two queries, 16 for four). Groups of
# 2 x 2 queries (two query rows) go further there: the two queries along the last axis share one
# vector of 8 keys, and all four one score tile, over the union of the two rows' key rows (8 of
# which each query uses 7 at k = 7): at 16 x 32 x 32, k = (3, 7, 7), about 4% faster forward +
# backward than two-query tiles (the forward about 10%), alternating in one process.
_TWO_QUERY_TILE_COST = 1.4
_LAYOUTS = {"4": (4, 1, 4), "4,2": (4, 1, 2), "2": (2, 1, 2), "4x2": (4, 2, 4)}


def _layout(lo1: Tensor, hi1: Tensor, lo2: Tensor, hi2: Tensor) -> tuple[int, int, int]:
    """(queries per group, query rows per group, queries per score tile) with the least score
    work for these windows (axis 1: lo1/hi1, last axis: lo2/hi2), in key vectors x key rows
    x queries, two-query tiles counted at their lower speed."""
    rows = float((hi1 - lo1 + 1).float().mean())
    costs = {(4, 1, 4): rows * _score_tiles(lo2, hi2, 4, 4),
             (4, 1, 2): rows * _score_tiles(lo2, hi2, 4, 2) * _TWO_QUERY_TILE_COST}
    if lo1.numel() >= 2:
        pair_rows = float((hi1[1::2] - lo1[0:-1:2] + 1).float().mean())    # rows of two query rows
        costs[(4, 2, 4)] = pair_rows * _score_tiles(lo2, hi2, 2, 2)     # per query row: 2 queries a pair
    return min(costs, key=costs.get)


@functools.lru_cache(maxsize=64)
def _geometry(spatial: tuple, ks: tuple, dil: tuple, st: tuple, causal: tuple) -> _Geometry:
    pad = 3 - len(spatial)
    axes = [(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), None)] * pad
    axes += [_axis(*args) for args in zip(spatial, ks, dil, st, causal)]
    windows = torch.cat([torch.cat([lo, hi]) for lo, hi, _ in axes]).to(torch.int32).contiguous()
    perms = tuple(p for _, _, p in axes)
    inverse = tuple(None if p is None else torch.argsort(p) for p in perms)
    layout = _layout(axes[1][0], axes[1][1], axes[2][0], axes[2][1])
    choice = os.environ.get("ATTNLAB_NA_GROUP")        # tuning: one of _LAYOUTS
    if choice:
        if choice not in _LAYOUTS:
            raise ValueError(f"ATTNLAB_NA_GROUP must be one of {', '.join(_LAYOUTS)}, got {choice!r}")
        layout = _LAYOUTS[choice]
    return _Geometry((1,) * pad + tuple(spatial), windows, perms, inverse, *layout)


# --- running -------------------------------------------------------------------------------------

_POOL: dict = {}      # {"pid": ..., "size": ..., "executor": ...}


def _pool(n: int) -> ThreadPoolExecutor:
    """An executor with at least n threads, one per process (a forked child inherits no
    threads); grown, never rebuilt per call, as calls with different numbers of items come."""
    if _POOL.get("pid") != os.getpid() or _POOL["size"] < n:
        if _POOL.get("pid") == os.getpid():
            _POOL["executor"].shutdown(wait=False)
        _POOL.update(pid=os.getpid(), size=n, executor=ThreadPoolExecutor(n, thread_name_prefix="attnlab-na"))
    return _POOL["executor"]


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _work(BH: int, groups: int, threads: int) -> list[tuple[int, int, int, int]]:
    """(bh0, bh1, group0, group1) items for `threads` workers: whole heads where there are enough."""
    if BH >= threads:
        return [(a, b, 0, groups) for a, b in _split(BH, threads)]
    per_head = -(-threads // BH)
    return [(b, b + 1, g0, g1) for b in range(BH) for g0, g1 in _split(groups, per_head)]


def _call(fn, items, args_of) -> None:
    if len(items) == 1:
        codes = [fn(*args_of(0, items[0]))]
    else:
        codes = list(_pool(len(items)).map(lambda j: fn(*args_of(j, items[j])), range(len(items))))
    bad = [c for c in codes if c]
    if bad:
        raise RuntimeError("neighborhood_attention: the fused CPU kernel failed "
                           f"({'out of memory' if 2 in bad else 'bad geometry'}, code {bad[0]})")


_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _pooled(lib, *shape: int) -> Tensor:
    """An uninitialised float32 tensor whose memory comes from the kernel library's pool (see
    `attnlab_na_tensor`): reused blocks are already paged in. Plain torch.empty when tiny."""
    if math.prod(shape) < (1 << 20) or os.environ.get("ATTNLAB_NA_POOL", "1") == "0":
        return torch.empty(*shape)
    managed = lib.attnlab_na_tensor(len(shape), (ctypes.c_int64 * len(shape))(*shape))
    if not managed:
        raise MemoryError(f"neighborhood_attention: could not allocate a {tuple(shape)} float32 output")
    return torch.from_dlpack(_capsule(managed, b"dltensor", None))


def clear_pool() -> int:
    """Frees the output blocks the fused kernel keeps for reuse; returns the bytes released."""
    lib, _ = library_status()
    return 0 if lib is None else int(lib.attnlab_na_pool_clear())


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


# The forward pass saves the probabilities for the backward pass (which then skips recomputing
# q.k and exp: measured 5-15% of a forward+backward at 16 x 32 x 32, k = (3, 7, 7)) when they
# take at most this many times the memory of q: each query keeps its group's key rows x the
# columns its score tiles computed (3-D k = (3, 7, 7): 192 floats, 2-D k = 13: 208, 1-D k = 127:
# 136), so d = 64 qualifies for these and a 2-D k = 31 (1,024 floats) does not.
_SAVE_PROBS_BUDGET = 4


def _save_probs(stride: int, d: int, needs_grad: bool, requested: bool | None = None) -> bool:
    """Whether the forward pass saves the probabilities: `requested` (BlockedConfig.save_probs)
    if given, else ATTNLAB_NA_SAVE_PROBS=0/1 if set, else the memory budget; never without a
    gradient to compute."""
    choice = os.environ.get("ATTNLAB_NA_SAVE_PROBS", "")
    if choice not in ("", "0", "1"):
        raise ValueError(f"ATTNLAB_NA_SAVE_PROBS must be 0 or 1, got {choice!r}")
    if not needs_grad or stride <= 0:
        return False
    if requested is not None:
        return bool(requested)
    return choice == "1" if choice else stride <= _SAVE_PROBS_BUDGET * d


class _FusedNeighborhood(torch.autograd.Function):
    """q, k (BH, N, d), v (BH, N, dv) float32 contiguous, tokens in kernel order -> (BH, N, dv)."""

    @staticmethod
    def forward(ctx, q, k, v, geo: _Geometry, scale: float, threads: int, save_probs: bool | None):
        lib, _ = library_status()
        BH, N, _ = q.shape
        out = _pooled(lib, BH, N, v.shape[-1])
        lse = q.new_empty(BH, N)
        dims = torch.tensor([*geo.dims, q.shape[-1], v.shape[-1]], dtype=torch.int32)
        stride = int(lib.attnlab_na_probs_stride(_ptr(dims), _ptr(geo.windows), geo.group, geo.group_rows,
                                                 geo.sub_group))
        probs = None
        if _save_probs(stride, q.shape[-1], any(ctx.needs_input_grad[:3]), save_probs):
            probs = _pooled(lib, BH, N, stride)
        items = _work(BH, geo.groups, threads)
        _call(lib.attnlab_na_forward, items, lambda j, it: (
            _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(probs), stride if probs is not None else 0,
            *it, _ptr(dims), _ptr(geo.windows), scale, geo.group, geo.group_rows, geo.sub_group))
        ctx.save_for_backward(q, k, v, out, lse, probs)
        ctx.geo, ctx.scale, ctx.threads, ctx.stride = geo, scale, threads, stride
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        lib, _ = library_status()
        q, k, v, out, lse, probs = ctx.saved_tensors
        geo = ctx.geo
        grad_out = grad_out.to(torch.float32).contiguous()
        BH, N, _ = q.shape
        dims = torch.tensor([*geo.dims, q.shape[-1], v.shape[-1]], dtype=torch.int32)
        items = _work(BH, geo.groups, ctx.threads)
        dq = _pooled(lib, *q.shape)
        if BH >= len(items):      # whole heads per item: one dk, dv, zeroed by the kernel head by head
            dk, dv = _pooled(lib, *k.shape), _pooled(lib, *v.shape)
            targets = [(dk, dv)] * len(items)
        else:                     # heads split between items: one zeroed dk, dv per item, summed after
            targets = [(torch.zeros_like(k), torch.zeros_like(v)) for _ in items]
        zero = int(BH >= len(items))
        stride = ctx.stride if probs is not None else 0
        _call(lib.attnlab_na_backward, items, lambda j, it: (
            _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(grad_out), _ptr(lse), _ptr(probs), stride, zero, _ptr(dq),
            _ptr(targets[j][0]), _ptr(targets[j][1]), *it, _ptr(dims), _ptr(geo.windows), ctx.scale, geo.group,
            geo.group_rows, geo.sub_group))
        if not zero:
            dk, dv = (torch.stack(parts).sum(0) for parts in zip(*targets))
        return dq, dk, dv, None, None, None, None


def _reorder(x: Tensor, perms: tuple) -> Tensor:
    """x (BH, n0, n1, n2, c): each axis with a permutation reordered by it."""
    for axis, perm in enumerate(perms):
        if perm is not None:
            x = x.index_select(axis + 1, perm)
    return x


def fused_neighborhood(q: Tensor, k: Tensor, v: Tensor, spatial: tuple, ks: tuple, dil: tuple, st: tuple,
                       causal: tuple, scale: float, threads: int | None = None,
                       save_probs: bool | None = None) -> Tensor:
    """q, k (BH, N, d), v (BH, N, dv), tokens row-major over `spatial` -> (BH, N, dv) float32, with
    backward; options as per-axis tuples (`neighborhood_args`). threads: Python threads calling
    the kernel (None: torch's intra-op thread count). save_probs: keep the probabilities for the
    backward pass (None: see `_save_probs`).

    Equivalent PyTorch:
        allowed = reference_neighborhood_mask(spatial, ks, dil, st, causal)      # (N, N)
        scores = q.float() @ k.float().transpose(-2, -1) * scale                # (BH, N, N)
        out = scores.masked_fill(~allowed, -inf).softmax(-1) @ v.float()        # (BH, N, dv)
    """
    geo = _geometry(tuple(spatial), tuple(ks), tuple(dil), tuple(st), tuple(causal))
    BH, N = q.shape[:2]
    threads = threads or torch.get_num_threads()
    xs = [_reorder(t.to(torch.float32).reshape(BH, *geo.dims, t.shape[-1]), geo.perms).reshape(BH, N, -1)
          .contiguous() for t in (q, k, v)]
    out = _FusedNeighborhood.apply(*xs, geo, float(scale), max(1, threads), save_probs)
    return _reorder(out.view(BH, *geo.dims, -1), geo.inverse).reshape(BH, N, -1)
