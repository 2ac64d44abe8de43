"""What the bench times: every module takes tokens x (B, N, C) and returns (B, N, C).

The default baseline `sdpa` is `SDPABaseline`: the dense attention a user writes by hand,
Linear -> F.scaled_dot_product_attention -> Linear. `dwconv` (`DepthwiseConvBaseline`, one k x k
depthwise convolution over the square image of the tokens) is the plain baseline of the 2-D
convolutional mechanisms (`attnlab bench --spatial`). Neither is a registry mechanism (`PLAIN`
lists them); `--baseline` may also name a registry mechanism. Registry mechanisms are built from their spec; those whose
layout is not a sequence are wrapped so that they take the same tokens:

- seq: as built;
- 2d, 3d: `SpatialAsSequence`, N a perfect square or cube reshaped to the image or volume;
- pool: `PoolAsSequence`, the pooled vector broadcast back to the tokens;
- cross: `CrossAsSequence`, the tokens are both the queries and the context (M = N).
"""
from __future__ import annotations

import inspect
import json
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.bench.flops import dense_module_flops
from attnlab.registry import create, get_spec

BASELINE = "sdpa"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SPATIAL_AXES = {"2d": 2, "3d": 3}
BENCH_LAYOUTS = ("seq", "pool", "cross", *SPATIAL_AXES)


class SDPABaseline(nn.Module):
    """The obvious dense attention a user writes by hand: x (B, N, C) -> (B, N, C).

    Same parameters and defaults as `mhsa` (no qkv bias, a proj bias); no checks, no hooks.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"sdpa: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, h, d)                     # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                # 3 x (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                    # (B, N, C)
        return self.proj(out)

    @classmethod
    def useful_flops(cls, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds of the projections and of the (query, key) pairs that matter
        (N^2, or N(N+1)/2 causal); see `flops.dense_module_flops`."""
        return dense_module_flops(batch, seq_len, dim, causal)


class DepthwiseConvBaseline(nn.Module):
    """One k x k depthwise convolution (biased, "same" padding) on the tokens as a square image:
    x (B, N, C) -> (B, N, C), N = s * s. The receptive field LKA decomposes (k = 21 in VAN), as a
    user would write it: permute to NCHW, `nn.Conv2d(C, C, k, groups=C)`, permute back.
    `num_heads` is accepted for the bench's call signature and unused."""

    def __init__(self, dim: int, num_heads: int = 1, *, kernel_size: int = 21):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"dwconv: kernel_size must be a positive odd int, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError("dwconv is a convolution over an image and has no causal mode")
        B, N, C = x.shape
        s = round(N ** 0.5)
        if s * s != N:
            raise ValueError(f"dwconv needs N to be a perfect square, got N={N}")
        img = x.reshape(B, s, s, C).permute(0, 3, 1, 2)                 # (B, C, s, s)
        return self.conv(img).permute(0, 2, 3, 1).reshape(B, N, C)     # (B, N, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool) -> tuple[int, int]:
        """2 k^2 multiply-adds per pixel and channel; backward (input and weight) twice that."""
        fwd = 2 * batch * seq_len * dim * self.kernel_size ** 2
        return fwd, 2 * fwd


# The plain baselines, by the names the bench accepts beside the registry's.
PLAIN = {BASELINE: SDPABaseline, "dwconv": DepthwiseConvBaseline}


class SpatialAsSequence(nn.Module):
    """Times a channels-last spatial mechanism on the bench's (B, N, C) tokens.

    N must be a perfect square (2d: an s x s image) or cube (3d: s x s x s volume); the tokens
    are reshaped to (B, *spatial, C), attended, and flattened back. `is_causal` is refused:
    spatial mechanisms take no causal flag.
    """

    def __init__(self, inner: nn.Module, axes: int):
        super().__init__()
        self.inner, self.axes = inner, axes
        if hasattr(inner, "useful_flops"):  # N = prod(spatial) tokens, as the bench counts them
            self.useful_flops = inner.useful_flops

    def side(self, seq_len: int) -> int:
        side = round(seq_len ** (1.0 / self.axes))
        if side ** self.axes != seq_len:
            kind = "square" if self.axes == 2 else "cube"
            raise ValueError(f"a {self.axes}-D mechanism needs N to be a perfect {kind}, got N={seq_len}")
        return side

    def forward(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError(f"{type(self.inner).spec.name} is spatial and has no causal mode")
        B, N, C = x.shape
        spatial = (self.side(N),) * self.axes
        return self.inner(x.reshape(B, *spatial, C)).reshape(B, N, C)   # (B, *spatial, C) inside


class PoolAsSequence(nn.Module):
    """Times an attention-pooling mechanism (B, N, C) -> (B, C_out) on the bench's tokens.

    The pooled vector is reduced to one number per sample and broadcast back to (B, N, C), so the
    bench's backward (a (B, N, C) gradient) runs through the whole pooling at negligible extra cost.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        if hasattr(inner, "useful_flops"):
            self.useful_flops = inner.useful_flops

    def forward(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError(f"{type(self.inner).spec.name} pools the sequence and has no causal mode")
        pooled = self.inner(x)                                           # (B, C_out)
        return pooled.mean(-1)[:, None, None].expand_as(x)               # (B, N, C)


class CrossAsSequence(nn.Module):
    """Times a cross-attention mechanism (x (B, N, C), context (B, M, C)) on the bench's tokens:
    the tokens are both x and the context, so M = N and the work is that of self-attention with
    the context's projection done separately. Its `useful_flops` counts M = N context tokens.
    `is_causal` is refused: a context has no causal order.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        if hasattr(inner, "useful_flops"):
            self.useful_flops = inner.useful_flops

    def forward(self, x: Tensor, *, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError(f"{type(self.inner).spec.name} is cross-attention and has no causal mode")
        return self.inner(x, x)                                          # context = the tokens


def module_class(name: str) -> type:
    """The class `name` builds: a plain baseline (`PLAIN`) or a registry mechanism."""
    return PLAIN[name] if name in PLAIN else get_spec(name).cls


def build_module(name: str, dim: int, num_heads: int, options: dict[str, Any]) -> nn.Module:
    """`name` with `options`, taking and returning (B, N, C) tokens whatever its layout."""
    if name in PLAIN:
        return PLAIN[name](dim, num_heads, **options)
    module = create(name, dim, num_heads, **options)
    layout = get_spec(name).layout
    if layout == "pool":
        return PoolAsSequence(module)
    if layout == "cross":
        return CrossAsSequence(module)
    axes = SPATIAL_AXES.get(layout)
    return SpatialAsSequence(module, axes) if axes else module


def parse_options(text: str | None, names: list[str]) -> dict[str, dict[str, Any]]:
    """`--options` JSON: {mechanism: {option: value}}; names and keys are checked against the
    constructors of what `build_module` builds. ValueError with the reason otherwise."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e}): {text!r}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError('--options must be a JSON object of objects, e.g. \'{"moh": {"top_k": 2}}\'')
    for name, opts in options.items():
        if name not in names:
            raise ValueError(f"--options names {name!r}, which is not benchmarked (benchmarked: {', '.join(names)})")
        params = inspect.signature(module_class(name).__init__).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        accepted = [n for n, p in params.items()
                    if n not in ("self", "dim", "num_heads") and p.kind is not p.VAR_POSITIONAL]
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise ValueError(f"--options: {name!r} has no option(s) {unknown} "
                             f"(accepted: {', '.join(accepted) or 'none'})")
    return options
