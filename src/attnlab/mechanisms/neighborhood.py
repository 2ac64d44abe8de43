"""Neighborhood attention, 1-D, 2-D and 3-D: `neighborhood1d`, `neighborhood2d`, `neighborhood3d`.

Paper: Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light (2025), which generalises Neighborhood Attention Transformer (2022) and Dilated
Neighborhood Attention Transformer (2022) with a stride.
Implements: timm-style qkv -> `attnlab.ops.neighborhood.neighborhood_attention` -> proj. Each
token attends the kernel_size neighbours around it along every axis (shifted inward at the
borders, dilation groups, per-axis causal masking, GNA stride with tile leaders), exactly as
NATTEN defines them; see the ops module for the rules. No relative position bias.
Status: exact (the window mask of NATTEN's na1d/na2d/na3d); forward and backward on CPU via the
blocked kernel, FlexAttention on CUDA. `neighborhood1d` is a sequence mechanism: causal via
forward's is_causal, cached decoding (stride 1) exact; `neighborhood2d/3d` are channels-last
spatial modules with a per-axis `causal=` constructor option (spec.causal_axes; forward's
is_causal, i.e. spec.causal, is not supported: which axes are causal is part of the layer).
Deviations:
- an axis shorter than kernel_size * dilation (NATTEN raises): the window is clipped to the axis,
  kernel_size -> min(kernel_size, n), dilation -> max(1, min(dilation, n // kernel)), stride ->
  min(stride, kernel). A causal 1-D sequence with stride 1 instead keeps its window (the rule
  needs no length) and is padded at the end, which no earlier query can see; so cached
  decoding matches the full forward at every length.
- kernel_size 1 is accepted (NATTEN asks for >= 2): each token attends only itself.
- attention dropout and `attn_mask` are not supported (NotImplementedError): the blocked kernel
  has no dropout and no per-key bias input.
- in the blocked kernel a masked pair weighs e^-80 of its row's largest instead of exactly 0
  (far below float64 resolution; avoids the slow path of exp(-inf)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.ops.neighborhood import (NA_BACKENDS, neighborhood_attention, neighborhood_options, neighborhood_pairs,
                                      reference_neighborhood_mask)
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

PAPER = "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
URL = "https://arxiv.org/abs/2504.16922"
SOURCE = ("SHI-Labs/NATTEN src/natten/functional.py::na1d/na2d/na3d (kernel_size, dilation, GNA "
          "stride and is_causal window rules; NATTEN is the GNA authors' library); qkv/proj as timm "
          "timm/layers/attention.py::Attention; no relative position bias")


def _effective(spatial, ks, dil, st):
    """Per-axis options clipped to axes shorter than kernel_size * dilation (see Deviations)."""
    out_k, out_d, out_s = [], [], []
    for n, k, r, s in zip(spatial, ks, dil, st):
        k_eff = min(k, n)
        r_eff = max(1, min(r, n // k_eff))
        out_k.append(k_eff)
        out_d.append(r_eff)
        out_s.append(min(s, k_eff))
    return tuple(out_k), tuple(out_d), tuple(out_s)


class _Neighborhood(nn.Module):
    """Shared constructor: timm-style qkv/proj and the neighborhood options.

    Hooks (attnlab.hooks): scores and probs on the eager path only, `backend="reference"` (the
    op's own backends ignore `attnlab.use_backend`); cached decoding (1-D) runs through
    ops.attention and takes `use_backend("reference")` instead.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    ndim = 1
    name = "neighborhood"

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size=7, dilation=1, stride=1, causal=False,
                 scale: float | None = None, proj_bias: bool = True, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(self.name, dim, num_heads)
        check_dropout(self.name, attn_drop=attn_drop, proj_drop=proj_drop)
        if attn_drop > 0.0:
            raise NotImplementedError(f"mechanism {self.name!r} does not support attention dropout "
                                      f"(attn_drop={attn_drop}); the neighborhood kernels have none")
        if backend is not None and backend not in NA_BACKENDS:
            raise ValueError(f"{self.name}: backend must be None or one of {NA_BACKENDS}, got {backend!r}")
        if scale is not None:
            check_positive(self.name, "scale", scale)
        self.kernel_size, self.dilation, self.stride, self.causal = neighborhood_options(
            self.ndim, kernel_size, dilation, stride, causal, who=self.name)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.scale = scale
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()    # (B, h, *spatial, d)
        self.hook_k = HookPoint()    # (B, h, *spatial, d)
        self.hook_v = HookPoint()    # (B, h, *spatial, d)
        # Scores and probs over all N = prod(spatial) tokens, -inf outside the window: formed only
        # on the eager path (backend="reference"); the blocked and flex kernels never hold them.
        self.hook_scores = HookPoint()  # (B, h, N, N), the softmax input; decoding: (B, h, n, window keys)
        self.hook_probs = HookPoint()   # (B, h, N, N), the softmax output
        self.hook_out = HookPoint()  # (B, h, *spatial, d), per-head outputs before proj

    def extra_repr(self) -> str:
        causal = "" if self.ndim == 1 else f", causal={self.causal}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}{causal}")

    def _qkv(self, x: Tensor, spatial: tuple[int, ...]):
        B = x.shape[0]
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, *spatial, 3, h, d)                     # (B, *spatial, 3, h, d)
        qkv = qkv.permute(len(spatial) + 1, 0, len(spatial) + 2, *range(1, len(spatial) + 1), len(spatial) + 3)
        q, k, v = qkv.unbind(0)                                              # 3 x (B, h, *spatial, d)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def _project(self, out: Tensor) -> Tensor:
        out = self.hook_out(out)                                             # (B, h, *spatial, d)
        nd = out.dim() - 3
        out = out.permute(0, *range(2, nd + 2), 1, nd + 2).flatten(-2)       # (B, *spatial, C)
        return self.proj_drop(self.proj(out))

    def _attend(self, q, k, v, causal: tuple[bool, ...]) -> Tensor:
        spatial = tuple(q.shape[2:-1])
        ks, dil, st = _effective(spatial, self.kernel_size, self.dilation, self.stride)
        return self._neighborhood(q, k, v, ks, dil, st, causal)

    def _neighborhood(self, q, k, v, ks, dil, st, causal) -> Tensor:
        """neighborhood_attention on self.backend; its reference backend runs here, through the
        scores and probs hooks (the same mask and the same oracle call as the op's)."""
        if self.backend != "reference":
            return neighborhood_attention(q, k, v, ks, dil, st, causal, scale=self.scale, backend=self.backend)
        spatial = tuple(q.shape[2:-1])
        B, h = q.shape[:2]
        N = math.prod(spatial)
        mask = reference_neighborhood_mask(spatial, ks, dil, st, causal).to(q.device)[None, None]  # (1, 1, N, N)
        qf, kf, vf = (t.reshape(B, t.shape[1], N, t.shape[-1]) for t in (q, k, v))   # (B, h, N, d)
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else float(self.scale)
        out = attention(qf, kf, vf, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=mask, scale=scale, backend="reference")
        return out.view(B, h, *spatial, v.shape[-1])

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool) -> tuple[float, float]:
        """2 x the multiply-adds of the projections and of the (query, key) pairs kept.

        The convention of the bench's dense baseline: qkv 2*B*N*C*3C, proj 2*B*N*C*C, 4*C per kept
        pair (scores and weighted sum: N * prod(kernel_size) pairs without causal masking), and
        backward twice the forward. Tokens are seq_len on one axis (1-D) or, as `attnlab bench`
        lays them out, a square / cube of side seq_len^(1/ndim) (2-D / 3-D, own `causal`).
        """
        B, N, C = batch, seq_len, dim
        if N == 0 or B == 0:
            return 0.0, 0.0
        side = round(N ** (1.0 / self.ndim))
        spatial = (side,) * self.ndim if side ** self.ndim == N else (N,) + (1,) * (self.ndim - 1)
        ks, dil, st = _effective(spatial, self.kernel_size, self.dilation, self.stride)
        is_causal = (bool(causal),) if self.ndim == 1 else self.causal
        pairs = neighborhood_pairs(spatial, ks, dil, st, is_causal)
        fwd = 2 * B * N * C * 3 * C + 2 * B * N * C * C + 4 * B * C * pairs
        return float(fwd), float(2 * fwd)


@register(MechanismSpec(
    name="neighborhood1d", paper=PAPER, year=2025, family="local", layout="seq",
    time="O(N k d)", memory="O(N d) (CPU kernel: + one head's k, v per thread; training: + O(N k) saved probabilities where <= 4x q)", exact=False,
    causal=True, attn_mask=False, kv_cache=True, backends=("blocked", "flex", "reference"), url=URL,
    provenance="official-code", source=SOURCE,
    test_kwargs=dict(kernel_size=3),
    test_configs=(dict(kernel_size=4, dilation=2),)))
class NeighborhoodAttention1d(_Neighborhood):
    """x (B, N, C) -> (B, N, C): each token attends kernel_size tokens around it (GNA rules).

    Causal masking is forward's is_causal (the token and the kernel_size - 1 before it, spaced by
    dilation). A KVCache gives exact cached decoding when stride == 1.
    """

    ndim = 1
    name = "neighborhood1d"

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size: int = 7, dilation: int = 1, stride: int = 1,
                 scale: float | None = None, proj_bias: bool = True, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         kernel_size=kernel_size, dilation=dilation, stride=stride, causal=False,
                         scale=scale, proj_bias=proj_bias, backend=backend, device=device, dtype=dtype)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens(self.name, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        if cache is not None:
            return self._decode(x, cache, is_causal)
        if N == 0:
            return self.proj_drop(self.proj(x))
        q, k, v = self._qkv(x, (N,))                                         # 3 x (B, h, N, d)
        (kernel,), (dil,), (stride,) = self.kernel_size, self.dilation, self.stride
        if is_causal and stride == 1 and N < kernel * dil:
            # the causal window needs no length: pad at the end (no earlier query sees it)
            pad = kernel * dil - N
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            out = self._neighborhood(q, k, v, (kernel,), (dil,), (1,), (True,))[:, :, :N]
        else:
            out = self._attend(q, k, v, (bool(is_causal),))                  # (B, h, N, d)
        return self._project(out)

    def _decode(self, x: Tensor, cache: KVCache, is_causal: bool) -> Tensor:
        """New tokens at positions past..past+n-1 against the cached keys: the causal window directly."""
        (kernel,), (dil,), (stride,) = self.kernel_size, self.dilation, self.stride
        if not is_causal:
            raise NotImplementedError(f"mechanism {self.name!r} supports kv_cache only with is_causal=True "
                                      "(a non-causal neighborhood reaches tokens not seen yet)")
        if stride != 1:
            raise NotImplementedError(f"mechanism {self.name!r} supports kv_cache only with stride=1, got "
                                      f"stride={stride} (a strided tile's window depends on the sequence length)")
        B, n, C = x.shape
        past = len(cache)
        q, k, v = self._qkv(x, (n,))                                         # 3 x (B, h, n, d)
        k, v = cache.update(k, v)                                            # (B, h, M, d), M = past + n
        first = max(0, past - (kernel - 1) * dil)                            # oldest key any new query sees
        k, v = k[:, :, first:], v[:, :, first:]
        query = torch.arange(past, past + n, device=x.device)[:, None]
        key = torch.arange(first, past + n, device=x.device)[None, :]
        back = query - key
        allowed = (back >= 0) & (back % dil == 0) & (back // dil < kernel)  # (n, M - first)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=allowed[None, None], scale=self.scale)
        return self._project(out)


class _SpatialNeighborhood(_Neighborhood):
    """x (B, *spatial, C) channels-last -> same shape.

    Causal masking is the constructor's per-axis `causal=` (spec.causal_axes); forward takes the
    shared keywords so that every mechanism is called alike, and refuses is_causal, attn_mask
    and cache (NotImplementedError, spec.causal / attn_mask / kv_cache are False).
    """

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        want = "(B, " + ", ".join("DHW"[3 - self.ndim:]) + f", C={self.dim})"
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: expected x as a torch.Tensor {want}, got {type(x).__name__}")
        if x.dim() != self.ndim + 2:
            raise ValueError(f"{self.name}: expected x of shape {want}, got {tuple(x.shape)} ({x.dim()}-D)")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected x of width C={self.dim}, got {x.shape[-1]} "
                             f"(shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected floating point x, got {x.dtype}")
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        spatial = tuple(x.shape[1:-1])
        if math.prod(spatial) == 0:
            return self.proj_drop(self.proj(x))
        q, k, v = self._qkv(x, spatial)                                      # 3 x (B, h, *spatial, d)
        return self._project(self._attend(q, k, v, self.causal))


@register(MechanismSpec(
    name="neighborhood2d", paper=PAPER, year=2025, family="local", layout="2d",
    time="O(H W k^2 d)", memory="O(H W d) (CPU kernel: + one head's k, v per thread; training: + O(H W k^2) saved probabilities where <= 4x q)", exact=False,
    causal=False, causal_axes=True, attn_mask=False, kv_cache=False, backends=("blocked", "flex", "reference"), url=URL,
    provenance="official-code", source=SOURCE,
    test_kwargs=dict(kernel_size=3)))
class NeighborhoodAttention2d(_SpatialNeighborhood):
    """x (B, H, W, C) -> (B, H, W, C): a kernel_size window per axis (GNA rules).

    kernel_size, dilation, stride: int or (H, W) pairs; causal: bool or (H, W) pair of bools.
    """

    ndim = 2
    name = "neighborhood2d"
    # __init__ is _Neighborhood's: the same signature, nothing 2-D specific to add


@register(MechanismSpec(
    name="neighborhood3d", paper=PAPER, year=2025, family="local", layout="3d",
    time="O(D H W k^3 d)", memory="O(D H W d) (CPU kernel: + one head's k, v per thread; training: + O(D H W k^3) saved probabilities where <= 4x q)", exact=False,
    causal=False, causal_axes=True, attn_mask=False, kv_cache=False, backends=("blocked", "flex", "reference"), url=URL,
    provenance="official-code", source=SOURCE,
    test_kwargs=dict(kernel_size=3)))
class NeighborhoodAttention3d(_SpatialNeighborhood):
    """x (B, D, H, W, C) -> (B, D, H, W, C): a kernel_size window per axis (GNA rules).

    kernel_size, dilation, stride: int or (D, H, W) triples; causal: bool or a triple of bools
    (e.g. (True, False, False) for video: causal in time only).
    """

    ndim = 3
    name = "neighborhood3d"
    # __init__ is _Neighborhood's, as for NeighborhoodAttention2d
