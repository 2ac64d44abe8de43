"""The chunked PyTorch kernels of the blocked backend: tiles, a thread pool, an autograd Function.

Queries are tiled per axis; the keys a tile can see form one box per tile (a contiguous range
per axis, thanks to the shift-inward rule of `rules`). `chunked_neighborhood` gathers the boxes
per chunk of same-class tiles and attends with batched matmuls and a small in-tile mask
(`_BlockedNeighborhood`, forward and backward by hand); `sdpa_tiles_neighborhood` sends every
tile's box through SDPA's fused kernel at once. Both take q, k (BH, N, d), v (BH, N, dv) in
float32 or float64, tokens row-major, and are the blocked backend's fallback where the fused
C++ kernel (`fused`) cannot run.

The chunked kernel runs its chunks inline by default; `BlockedConfig(threads=n)` or
ATTNLAB_NA_THREADS=n (opt-in) runs them on a pool of n worker threads with one intra-op thread
each. That is faster on a loaded machine, but it changes torch's thread settings, which can make
LAPACK calls elsewhere in the same process spin. With more than one worker the order in which
overlapping key gradients are summed varies and dk, dv can differ in the last bits from run to
run (forward outputs and dq do not). Masked pairs weigh e^-80 relative to the row maximum
instead of exactly 0 (see `_EXP_FLOOR`). Memory: q, k, v, out, a per-query log-sum-exp and one
workspace per worker.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlab.ops.neighborhood.rules import axis_windows

__all__ = ["BlockedConfig", "blocked_tile", "chunked_neighborhood", "sdpa_tiles_neighborhood"]


@dataclass(frozen=True)
class BlockedConfig:
    """Tuning knobs of the blocked backend; None picks a default per call.

    tile: queries per tile along each spatial axis. chunk_scores: score elements one worker
    holds at a time (its working set). threads: worker threads (default: 1, i.e. inline,
    or the ATTNLAB_NA_THREADS environment variable). Each worker runs its chunks with one
    intra-op thread: a chunk is a dozen small ops, and small ops each run on an OpenMP team
    stall whenever one thread of the team is descheduled, which on a shared CPU costs about
    a time slice per op (5-10x slower forward+backward at 2 threads under load).
    save_probs (fused method): keep the probabilities from the forward pass for the backward
    pass, which then skips recomputing them (True), or recompute them and keep memory at O(N d)
    (False); default: keep them when they take at most 4x the memory of q
    (`attnlab.ops.neighborhood.fused`; the ATTNLAB_NA_SAVE_PROBS environment variable sets the default).
    """

    tile: tuple[int, ...] | None = None
    chunk_scores: int | None = None
    threads: int | None = None
    method: str | None = None       # "fused" (default where it runs, else "chunks"), "chunks" or "sdpa"
    save_probs: bool | None = None  # fused: keep the probabilities for backward (None: if <= 4x q's memory)


@dataclass
class _AxisPlan:
    tile: int                 # query slots per tile along this axis
    span: int                 # key slots per tile along this axis
    q_pos: Tensor             # (tiles, tile) query positions, -1 = padding slot
    k_pos: Tensor             # (tiles, span) key positions, -1 = no key
    allowed: Tensor           # (tiles, tile, span) bool, False on padding rows and empty key slots
    group: Tensor             # (tiles,) dilation group
    q_start: Tensor           # (tiles,) first query slot, in group coordinates
    k_start: Tensor           # (tiles,) first key slot, in group coordinates


def _plan_axis(n: int, k: int, r: int, s: int, causal: bool, tile: int) -> _AxisPlan:
    """Tiles of `tile` queries inside each dilation group and the key range each tile can see.

    The windows' first and last keys are non-decreasing in the query (leaders and the inward
    shift are monotone), so the keys of a tile are the contiguous group range from its first
    query's first key to its last query's last key. Every tile gets `span` key slots (the
    longest such range), starting at the tile's first key, or earlier where that would overrun
    the group; slots past the group's end hold no key.
    """
    _, _, _, first, last = axis_windows(n, k, r, s, causal)
    groups = []
    for g in range(r):
        members = torch.arange(g, n, r)                                    # positions, in group order
        L = members.numel()
        n_tiles = -(-L // tile)
        slot = torch.arange(n_tiles * tile).view(n_tiles, tile)            # query index in the group
        valid = slot < L
        idx = slot.clamp(max=L - 1)
        lo, hi = first[members[idx[:, 0]]], last[members[idx[:, -1]]]     # (tiles,) group coords
        groups.append((g, L, members, slot, valid, idx, lo, hi))
    span = max(int((hi - lo + 1).max()) for *_, lo, hi in groups)
    parts = []
    for g, L, members, slot, valid, idx, lo, hi in groups:
        start = lo.clamp(max=max(L - span, 0))                             # (tiles,)
        key = start[:, None] + torch.arange(span)                          # (tiles, span) group coords
        key_valid = key < L
        q_first, q_last = first[members[idx]], last[members[idx]]          # (tiles, tile)
        ok = (key[:, None, :] >= q_first[:, :, None]) & (key[:, None, :] <= q_last[:, :, None])
        ok &= key_valid[:, None, :] & valid[:, :, None]
        parts.append((torch.where(valid, members[idx], -1), torch.where(key_valid, g + key * r, -1), ok,
                      torch.full_like(lo, g), slot[:, 0], start))
    return _AxisPlan(tile, span, *(torch.cat(p) for p in zip(*parts)))


def _default_tile(spatial, ks, st) -> tuple[int, ...]:
    ndim = len(spatial)
    # fewer query slots per tile waste fewer scores on masked pairs, more make larger GEMMs and
    # fewer gathered key rows per query (timed: 3-D (1, 4, 8) beats (1, 8, 8) and (2, 4, 4);
    # 2-D (8, 8) and (4, 8) tie)
    if ndim == 1:
        tile = (64,)
    elif ndim == 2:
        tile = (8, 8)
    else:
        tile = (1, 4, 8) if ks[0] <= 4 else (2, 4, 8)
    # no longer than the axis; a multiple of the stride keeps the in-tile masks alike
    return tuple(min(max(s, t - t % s), n) for t, s, n in zip(tile, st, spatial))


class _Plan:
    """The N-d tiling: the product of the per-axis plans, tiles numbered row-major.

    Tiles whose in-tile mask is the same (all interior tiles, and each kind of border tile)
    share a class: a chunk of same-class tiles uses one broadcast (M, S) mask.
    """

    def __init__(self, spatial, ks, dil, st, causal, tile):
        self.spatial, self.tile, self.dilation = spatial, tile, dil
        axes = [_plan_axis(n, k, r, s, c, t) for n, k, r, s, c, t in zip(spatial, ks, dil, st, causal, tile)]
        self.axes = axes
        self.M = math.prod(a.tile for a in axes)            # query slots per tile
        self.S = math.prod(a.span for a in axes)            # key slots per tile
        inner = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
        q = qv = kk = cls = None
        self._patterns = []                                  # per axis: (classes, tile, span) bool
        for axis, stride_a in zip(axes, inner):
            key = torch.cat([axis.allowed.flatten(1), axis.q_pos >= 0, axis.k_pos >= 0], 1)
            uniq, inv = torch.unique(key, dim=0, return_inverse=True)
            first_of = [int((inv == u).nonzero()[0]) for u in range(uniq.shape[0])]
            self._patterns.append(axis.allowed[first_of])
            qpos, qval = axis.q_pos.clamp(min=0) * stride_a, axis.q_pos >= 0
            kpos = axis.k_pos.clamp(min=0) * stride_a
            if q is None:
                q, qv, kk, cls = qpos, qval, kpos, inv
            else:   # tiles (A, B) -> A * B row-major; slots (a, b) -> a * b row-major
                q = (q[:, None, :, None] + qpos[None, :, None, :]).flatten(0, 1).flatten(1)
                qv = (qv[:, None, :, None] & qval[None, :, None, :]).flatten(0, 1).flatten(1)
                kk = (kk[:, None, :, None] + kpos[None, :, None, :]).flatten(0, 1).flatten(1)
                cls = (cls[:, None] * uniq.shape[0] + inv[None, :]).flatten()
        self.q_index, self.q_valid, self.k_index = q, qv, kk  # (tiles, M), (tiles, M), (tiles, S)
        self.n_tiles = q.shape[0]
        self.tile_class = cls
        self._masks: dict = {}
        self._on: dict = {}
        self._chunks: dict = {}

    def class_mask(self, cls: int, dtype, device) -> tuple[Tensor, Tensor | None]:
        """Class `cls`: additive mask (1, S, M), keys x queries (0 or -inf), and valid query slots
        (1, 1, M) (None when all are)."""
        key = (cls, dtype, str(device))
        if key not in self._masks:
            ok = torch.ones(1, 1, dtype=torch.bool)
            rest = cls
            for pats in reversed(self._patterns):
                rest, j = divmod(rest, pats.shape[0])
                p = pats[j]                                            # (tile, span) this axis
                ok = (p[:, None, :, None] & ok[None, :, None, :]).reshape(p.shape[0] * ok.shape[0], -1)
            rows = ok.any(-1)                                          # valid query slots
            ok = ok | ~rows[:, None]                                   # padding rows: any finite row
            bias_t = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf")).t().contiguous()
            valid = None if bool(rows.all()) else rows.to(dtype).view(1, 1, -1).to(device)
            self._masks[key] = (bias_t[None].to(device), valid)
        return self._masks[key]

    def sdpa_layout(self, dtype, device) -> tuple[Tensor, Tensor]:
        """Additive mask (1, tiles, M, S) per tile (padding rows finite) and, per query, its
        flat slot in (tiles * M) (N,)."""
        key = ("sdpa", dtype, str(device))
        if key not in self._masks:
            classes = sorted(set(self.tile_class.tolist()))
            per_class = torch.stack([self.class_mask(c, dtype, "cpu")[0][0].t() for c in classes])  # (C, M, S)
            lookup = torch.full((max(classes) + 1,), -1, dtype=torch.long)
            lookup[torch.tensor(classes)] = torch.arange(len(classes))
            mask = per_class[lookup[self.tile_class]]                          # (tiles, M, S)
            valid = self.q_valid.flatten().nonzero().flatten()
            slot = torch.empty(math.prod(self.spatial), dtype=torch.long)
            slot[self.q_index.flatten()[valid]] = valid
            self._masks[key] = (mask[None].to(device), slot.to(device))
        return self._masks[key]

    def index(self, device):
        """q_index, q_valid, k_index on `device`."""
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in (self.q_index, self.q_valid, self.k_index))
        return self._on[key]

    def chunks(self, BH: int, chunk_scores: int) -> list[tuple]:
        key = (BH, chunk_scores)
        if key not in self._chunks:
            self._chunks[key] = self._make_chunks(BH, chunk_scores)
        return self._chunks[key]

    def _make_chunks(self, BH: int, chunk_scores: int) -> list[tuple]:
        """Work items (bh0, bh1, tiles, cls, run) of about chunk_scores score elements.

        Same-class tiles only. In 1-D, full tiles (no padding slot, every key slot a key) that
        follow each other with evenly spaced queries and keys (all interior tiles) form a `_Run`
        of one (batch, head), whose queries and key windows are strided views of q and k: no
        copy. Other tiles, and every tile in 2-D/3-D, are gathered (run None), all heads at once.
        In 2-D/3-D one strided key slab per run of tiles along the first axis would copy ~4x
        less than the gathers but is no faster: runs are then per head, and the Python work
        per chunk grows as much as the copying shrinks.
        """
        pairs = max(1, chunk_scores // (self.M * self.S))             # (bh, tile) pairs per chunk
        out = []
        axis = self.axes[0]
        for cls in sorted(set(self.tile_class.tolist())):
            tiles = (self.tile_class == cls).nonzero().flatten()
            gathered = tiles
            if len(self.axes) == 1:
                full = (axis.q_pos[tiles] >= 0).all(1) & (axis.k_pos[tiles] >= 0).all(1)
                for run in _runs(axis, tiles, full):
                    if run is None:
                        continue
                    t_first, n = run
                    for i in range(0, n, pairs):
                        m = min(pairs, n - i)
                        part = torch.arange(t_first + i, t_first + i + m)
                        r = _Run(int(axis.q_pos[t_first + i, 0]), int(axis.k_pos[t_first + i, 0]), m)
                        out.extend((b, b + 1, part, cls, r) for b in range(BH))
                gathered = tiles[~full]
            if gathered.numel() == 0:
                continue
            if pairs >= BH:
                step = pairs // BH
                for i in range(0, gathered.numel(), step):
                    out.append((0, BH, gathered[i:i + step], cls, None))
            else:
                for t in gathered:
                    for b in range(0, BH, pairs):
                        out.append((b, min(b + pairs, BH), t[None], cls, None))
        return out


@dataclass(frozen=True)
class _Run:
    q0: int          # first query position of the run
    k0: int          # first key position of the run
    n: int           # tiles in the run


def _runs(axis: _AxisPlan, idx: Tensor, full: Tensor):
    """Maximal runs (first tile, count) of full tiles along the first axis, evenly spaced."""
    out, start = [], 0
    n = idx.numel()
    for i in range(1, n + 1):
        if i < n:
            a, b = int(idx[i - 1]), int(idx[i])
            if (bool(full[i - 1]) and bool(full[i]) and b == a + 1 and int(axis.group[a]) == int(axis.group[b])
                    and int(axis.q_start[b] - axis.q_start[a]) == axis.tile
                    and int(axis.k_start[b] - axis.k_start[a]) == axis.tile):
                continue
        out.append((int(idx[start]), i - start) if bool(full[start]) else None)
        start = i
    return out


@functools.lru_cache(maxsize=32)
def _cached_plan(spatial, ks, dil, st, causal, tile) -> _Plan:
    return _Plan(spatial, ks, dil, st, causal, tile)


# --- blocked kernel: workers ---------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_KEY: tuple[int, int] = (0, 0)     # (size, pid): a forked child inherits no threads
_POOL_LOCK = threading.Lock()


def _one_intra_op_thread(barrier: threading.Barrier) -> None:
    torch.set_num_threads(1)   # this worker's OpenMP and MKL teams: one thread (thread-local settings)
    barrier.wait()


def _worker_pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != (n, os.getpid()):
            if _POOL is not None and _POOL_KEY[1] == os.getpid():
                _POOL.shutdown(wait=True)
            before = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="attnlab-na")
            barrier = threading.Barrier(n + 1)
            for _ in range(n):          # start every worker now and let each set its thread count
                pool.submit(_one_intra_op_thread, barrier)
            barrier.wait()
            # torch.set_num_threads also sets the count that new threads start with: restore it
            torch.set_num_threads(before)
            _POOL, _POOL_KEY = pool, (n, os.getpid())
        return _POOL


def _threads(config: BlockedConfig) -> int:
    if config.threads is not None:
        return config.threads
    # Default 1 (inline, torch's own intra-op threads): the worker pool changes torch's thread
    # settings, which can make LAPACK calls elsewhere in the same process spin.
    env = os.environ.get("ATTNLAB_NA_THREADS")
    return int(env) if env else 1


def _run_chunks(chunks: list, work: Callable, threads: int, device) -> None:
    """work(chunk, workspace) for every chunk: inline, or pulled by `threads` pool workers (CPU)."""
    if threads <= 1 or len(chunks) <= 1 or device.type != "cpu":
        space: dict = {}
        for chunk in chunks:
            work(chunk, space)
        return
    pool = _worker_pool(threads)
    it = iter(chunks)
    take = threading.Lock()

    def worker():
        space: dict = {}
        with torch.no_grad():   # grad mode is per thread; pool threads start with it on
            while True:
                with take:
                    chunk = next(it, None)
                if chunk is None:
                    return
                work(chunk, space)
    for f in [pool.submit(worker) for _ in range(min(threads, len(chunks)))]:
        f.result()


def _buffer(space: dict, name: str, shape, like: Tensor) -> Tensor:
    """A workspace tensor of `shape`, reused by the chunks one worker runs."""
    numel = math.prod(shape)
    buf = space.get(name)
    if buf is None or buf.numel() < numel:
        buf = like.new_empty(numel)
        space[name] = buf
    return buf[:numel].view(shape)


def _strided(t: Tensor, c: int, rows: int, first_row: int, step: int, dilation: int) -> Tensor:
    """(c, rows, width) view of a contiguous (N, width) t: block i starts at row first_row + i * step."""
    w = t.shape[-1]
    return t.as_strided((c, rows, w), (step * dilation * w, dilation * w, 1), t.storage_offset() + first_row * w)


# exp() of -inf (a masked pair) or of anything that underflows to a denormal takes a slow path
# in the vectorised exp (measured 5-150x slower), so exponents are floored here first: a masked
# pair then weighs e^-80 ~ 1.8e-35 of the row's largest, far below float64 resolution.
_EXP_FLOOR = -80.0


class _BlockedNeighborhood(torch.autograd.Function):
    """Tiled neighborhood attention on q, k (BH, N, d), v (BH, N, dv), tokens row-major.

    Per chunk of n same-class tiles (M query slots, S key slots each), on one worker thread:
        qc (n, M, d), kc (n, S, d), vc (n, S, dv)   gathered, or strided views for 1-D runs
        sT = maskT + kc @ qc^T * scale              (n, S, M): keys x queries, maskT (1, S, M) shared
        pT = exp(sT - max), l = sum over keys       unnormalised probabilities
        out[tile queries] = (pT^T @ vc) / l,  lse = max + log(l)
    Scores are kept keys x queries so that every product but two is a plain (non-transposed)
    GEMM: here MKL runs `a @ b^T` with both operands d-contiguous ~40% slower than `a @ b`.
    Backward recomputes pT = exp(sT - lse) per chunk (nothing of size N x S is stored):
        dPT = vc @ (scale dO)^T, dST = pT * (dPT - scale rowsum(dO * out))
        dq = dST^T @ kc, dk += dST @ qc, dv += pT @ dO
    dk and dv are accumulated under a lock, since neighbouring tiles' key boxes overlap.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float, config: BlockedConfig, chunk_scores: int):
        BH, N, d = q.shape
        dv_ = v.shape[-1]
        M, S = plan.M, plan.S
        out = q.new_empty(BH, N, dv_)
        lse = q.new_empty(BH, N, 1)
        q_index, q_valid, k_index = plan.index(q.device)
        r0 = plan.dilation[0]

        def work(chunk, space):
            b0, b1, tiles, cls, view = chunk
            n = (b1 - b0) * tiles.numel()
            bias_t, rows = plan.class_mask(cls, q.dtype, q.device)
            run = view
            if run is not None:                                             # 1-D run: strided views
                q0, k0 = run.q0, run.k0
                qc = _strided(q[b0], n, M, q0, M, r0)
                kc = _strided(k[b0], n, S, k0, M, r0)
                vc = _strided(v[b0], n, S, k0, M, r0)
            else:
                qi, ki = q_index[tiles].view(-1), k_index[tiles].view(-1)
                qc = torch.index_select(q[b0:b1], 1, qi, out=_buffer(space, "q", (b1 - b0, qi.numel(), d), q))
                kc = torch.index_select(k[b0:b1], 1, ki, out=_buffer(space, "k", (b1 - b0, ki.numel(), d), q))
                vc = torch.index_select(v[b0:b1], 1, ki, out=_buffer(space, "v", (b1 - b0, ki.numel(), dv_), q))
                qc, kc, vc = qc.view(n, M, d), kc.view(n, S, d), vc.view(n, S, dv_)
            q_t = _buffer(space, "qT", (n, d, M), q).copy_(qc.transpose(1, 2))
            s_t = torch.baddbmm(bias_t, kc, q_t, alpha=scale, out=_buffer(space, "s", (n, S, M), q))
            m = torch.amax(s_t, 1, keepdim=True, out=_buffer(space, "m", (n, 1, M), q))
            p_t = s_t.sub_(m).clamp_(min=_EXP_FLOOR).exp_()
            l = torch.sum(p_t, 1, keepdim=True, out=_buffer(space, "l", (n, 1, M), q))
            lse_c = m.add_(l.log())                                         # (n, 1, M)
            l_rows = l.view(n, M, 1)
            if run is not None:
                target = _strided(out[b0], n, M, q0, M, r0)
                if r0 == 1:
                    torch.bmm(p_t.transpose(1, 2), vc, out=target).div_(l_rows)
                else:
                    oc = torch.bmm(p_t.transpose(1, 2), vc, out=_buffer(space, "o", (n, M, dv_), q))
                    target.copy_(oc.div_(l_rows))
                _strided(lse[b0], n, M, q0, M, r0).copy_(lse_c.view(n, M, 1))
                return
            oc = torch.bmm(p_t.transpose(1, 2), vc, out=_buffer(space, "o", (n, M, dv_), q)).div_(l_rows)
            oc, lse_c = oc.view(b1 - b0, -1, dv_), lse_c.view(b1 - b0, -1, 1)
            if rows is not None:
                keep = q_valid[tiles].view(-1)
                qi, oc, lse_c = qi[keep], oc[:, keep], lse_c[:, keep]
            out[b0:b1].index_copy_(1, qi, oc)
            lse[b0:b1].index_copy_(1, qi, lse_c)

        _run_chunks(plan.chunks(BH, chunk_scores), work, _threads(config), q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.config, ctx.chunk_scores = plan, scale, config, chunk_scores
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        BH, N, d = q.shape
        dv_ = v.shape[-1]
        M, S = plan.M, plan.S
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        q_index, q_valid, k_index = plan.index(q.device)
        r0 = plan.dilation[0]
        lock = threading.Lock()

        def work(chunk, space):
            b0, b1, tiles, cls, view = chunk
            nb = b1 - b0
            n = nb * tiles.numel()
            bias_t, rows = plan.class_mask(cls, q.dtype, q.device)
            run = view
            if run is not None:                                             # 1-D run: strided views
                q0, k0 = run.q0, run.k0
                qc = _strided(q[b0], n, M, q0, M, r0)
                gc = _strided(grad_out[b0], n, M, q0, M, r0)
                oc = _strided(out[b0], n, M, q0, M, r0)
                lc = _strided(lse[b0], n, M, q0, M, r0)
                kc = _strided(k[b0], n, S, k0, M, r0)
                vc = _strided(v[b0], n, S, k0, M, r0)
            else:
                qi, ki = q_index[tiles].view(-1), k_index[tiles].view(-1)
                qc = torch.index_select(q[b0:b1], 1, qi, out=_buffer(space, "q", (nb, qi.numel(), d), q))
                gc = torch.index_select(grad_out[b0:b1], 1, qi, out=_buffer(space, "g", (nb, qi.numel(), dv_), q))
                oc = torch.index_select(out[b0:b1], 1, qi, out=_buffer(space, "o", (nb, qi.numel(), dv_), q))
                lc = torch.index_select(lse[b0:b1], 1, qi, out=_buffer(space, "lse", (nb, qi.numel(), 1), q))
                kc = torch.index_select(k[b0:b1], 1, ki, out=_buffer(space, "k", (nb, ki.numel(), d), q))
                vc = torch.index_select(v[b0:b1], 1, ki, out=_buffer(space, "v", (nb, ki.numel(), dv_), q))
                qc, gc, oc, lc = qc.view(n, M, d), gc.view(n, M, dv_), oc.view(n, M, dv_), lc.view(n, M, 1)
                kc, vc = kc.view(n, S, d), vc.view(n, S, dv_)
            q_t = _buffer(space, "qT", (n, d, M), q).copy_(qc.transpose(1, 2))
            g_t = torch.mul(gc.transpose(1, 2), scale, out=_buffer(space, "gT", (n, dv_, M), q))   # scale dO^T
            # the softmax-gradient term scale * rowsum(dO * out), one per query: (n, 1, M)
            delta = torch.sum(torch.mul(gc, oc, out=_buffer(space, "go", (n, M, dv_), q)), -1, keepdim=True,
                              out=_buffer(space, "delta", (n, M, 1), q)).mul_(scale).view(n, 1, M)
            s_t = torch.sub(bias_t, lc.view(n, 1, M), out=_buffer(space, "s", (n, S, M), q))
            p_t = s_t.baddbmm_(kc, q_t, alpha=scale).clamp_(min=_EXP_FLOOR).exp_()   # (n, S, M) probabilities
            if rows is not None:                                             # padding query slots: no gradient
                p_t.mul_(rows)
            dp_t = torch.bmm(vc, g_t, out=_buffer(space, "dp", (n, S, M), q))
            ds_t = dp_t.sub_(delta).mul_(p_t)                                # scale * dS^T
            dkc = torch.bmm(ds_t, qc, out=_buffer(space, "dk", (n, S, d), q))
            dvc = torch.bmm(p_t, gc, out=_buffer(space, "dv", (n, S, dv_), q))
            if run is not None:
                if r0 == 1:
                    torch.bmm(ds_t.transpose(1, 2), kc, out=_strided(dq[b0], n, M, q0, M, r0))
                else:
                    _strided(dq[b0], n, M, q0, M, r0).copy_(
                        torch.bmm(ds_t.transpose(1, 2), kc, out=_buffer(space, "dq", (n, M, d), q)))
                with lock:     # key windows of consecutive tiles overlap: add them M rows at a time
                    for part in range(0, S, M):
                        width = min(M, S - part)
                        _strided(dk[b0], n, width, k0 + part * r0, M, r0).add_(dkc[:, part:part + width])
                        _strided(dv[b0], n, width, k0 + part * r0, M, r0).add_(dvc[:, part:part + width])
                return
            dqc = torch.bmm(ds_t.transpose(1, 2), kc, out=_buffer(space, "dq", (n, M, d), q)).view(nb, -1, d)
            if rows is None:
                dq[b0:b1].index_copy_(1, qi, dqc)
            else:
                keep = q_valid[tiles].view(-1)
                dq[b0:b1].index_copy_(1, qi[keep], dqc[:, keep])
            with lock:
                dk[b0:b1].index_add_(1, ki, dkc.view(nb, -1, d))
                dv[b0:b1].index_add_(1, ki, dvc.view(nb, -1, dv_))

        _run_chunks(plan.chunks(BH, ctx.chunk_scores), work, _threads(ctx.config), q.device)
        return dq, dk, dv, None, None, None, None


def _sdpa_tiles(q: Tensor, k: Tensor, v: Tensor, plan: _Plan, scale: float) -> Tensor:
    """All tiles at once through SDPA's fused kernel, autograd included. q, k (BH, N, d), v (BH, N, dv).

        qt (BH, tiles, M, d), kt/vt (BH, tiles, S, d)   gathered tile queries and key boxes
        out_t = SDPA(qt, kt, vt, mask (1, tiles, M, S))  the fused (flash) CPU kernel
        out = out_t[slot of each query]                  (BH, N, dv)
    The key boxes are copies (S / M ~ 3 keys per query in 1-D, 6-9 in 2-D/3-D). On a quiet CPU
    the chunked kernel is faster (about 2.5x in 1-D); under heavy load this path is (1.6-16x at
    a load of 4-8 on 2 cores), because the chunked kernel's many small ops stall when a core is
    taken away.
    """
    q_index, _, k_index = plan.index(q.device)
    mask, slot = plan.sdpa_layout(q.dtype, q.device)
    qt = q[:, q_index]                                                   # (BH, tiles, M, d)
    kt, vt = k[:, k_index], v[:, k_index]                                # (BH, tiles, S, d)
    out_t = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out_t.flatten(1, 2)[:, slot]                                  # (BH, N, dv)


# --- entry points --------------------------------------------------------------------------------

def blocked_tile(spatial: tuple, ks: tuple, st: tuple, tile: tuple | None = None) -> tuple[int, ...]:
    """`tile` (BlockedConfig.tile) checked, or the default for this geometry; clipped to the axes."""
    tile = tile or _default_tile(spatial, ks, st)
    if len(tile) != len(spatial) or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
        raise ValueError(f"neighborhood_attention: BlockedConfig.tile must be {len(spatial)} positive ints, got {tile}")
    return tuple(min(t, n) for t, n in zip(tile, spatial))


def chunked_neighborhood(q: Tensor, k: Tensor, v: Tensor, spatial: tuple, ks: tuple, dil: tuple, st: tuple,
                         causal: tuple, scale: float, config: BlockedConfig | None = None) -> Tensor:
    """q, k (BH, N, d), v (BH, N, dv) float32/float64, tokens row-major over `spatial` -> (BH, N, dv),
    with backward; options as per-axis tuples (`neighborhood_args`).

    Equivalent PyTorch:
        allowed = reference_neighborhood_mask(spatial, ks, dil, st, causal)      # (N, N)
        scores = q @ k.transpose(-2, -1) * scale                                # (BH, N, N)
        out = scores.masked_fill(~allowed, -inf).softmax(-1) @ v                # (BH, N, dv)
    """
    config = config or BlockedConfig()
    plan = _cached_plan(spatial, ks, dil, st, causal, blocked_tile(spatial, ks, st, config.tile))
    # 1-D chunks are strided views of one head (small, cache-resident); gathered chunks hold
    # every head, so they are larger to keep the Python work per score element small
    chunk_scores = config.chunk_scores or (1 << 18 if len(spatial) == 1 else 1 << 20)
    return _BlockedNeighborhood.apply(q, k, v, plan, scale, config, chunk_scores)


def sdpa_tiles_neighborhood(q: Tensor, k: Tensor, v: Tensor, spatial: tuple, ks: tuple, dil: tuple, st: tuple,
                            causal: tuple, scale: float, config: BlockedConfig | None = None) -> Tensor:
    """As `chunked_neighborhood`, every tile at once through SDPA (`_sdpa_tiles`); autograd by torch.

    Equivalent PyTorch: that of `chunked_neighborhood`.
    """
    config = config or BlockedConfig()
    plan = _cached_plan(spatial, ks, dil, st, causal, blocked_tile(spatial, ks, st, config.tile))
    return _sdpa_tiles(q, k, v, plan, scale)
