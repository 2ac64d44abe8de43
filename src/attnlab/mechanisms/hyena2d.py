"""Two-dimensional Hyena (`hyena2d`): gated implicit 2-D long convolutions over an image.

Paper: Multi-Dimensional Hyena for Spatial Inductive Bias (Zimerman, Wolf; AISTATS 2024,
arXiv 2309.13600), "Hyena N-D", built on Hyena Hierarchy (Poli et al., ICML 2023; see hyena.py).
Code followed: Itamarzimm/HyenaND `pytorch-image-models/timm/models/layers/hyena2d.py::
HyenaOperator2d` (with HyenaFilter2d, ExponentialModulation and fftconv2d).

For x (B, H, W, C), D = C, order N (default 2):

    x_0, ..., x_{N-1}, v = split(short_filter(in_proj(x)))      each (B, D, H, W)
    for o = 0 .. N-2:
        v = x_{N-1-o} * v                                         gate (dropout = attn_drop)
        v[i, j] = sum_{a, b} h^o[a, b] v[i - a, j - b] + bias^o * v[i, j]
    y = out_proj(x_0 * v)

`short_filter` is a depthwise 3 x 3 Conv2d (padding 1, centred). The filters h^o come from an
implicit MLP over positional features (the 1-D Hyena features z, t per axis, see hyena.py):
`filter_mode="separable"` (official default, hyena2d_filter=False): two 1-D implicit filters,
h[a, b] = hx[a] hy[b], each with its own decay window (a indexes the H axis, b the W axis);
`filter_mode="joint"` (official hyena2d_filter=True): one MLP over the concatenated features
[z_a, z_b], times the window exp(-t_a |dx|) exp(-t_b |dy|) + shift. The convolution runs as a
2-D FFT over 2H x 2W points, O(HW log HW) per channel.

`direction` says which offsets (a, b) the filter covers:
- "full" (default): every offset, -(H-1)..(H-1) x -(W-1)..(W-1), with the filter mirrored,
  h[a, b] = h[|a|, |b|] (the four quadrant filters the official "4dir" mode sums with learned
  weights, here with equal weights and the axes counted once). The exact, non-causal 2-D convolution.
- "quadrant": 0 <= a <= i, 0 <= b <= j: the official default (directional_mode "standard"),
  the convolution it computes, cropped to the top-left H x W of the 2H x 2W product.
- "seq": the official directional_mode "seq": as "quadrant", but the first long convolution
  (o = 0) reads the opposite quadrant (a, b <= 0; the official flips v before and after it).

Status: the official operator for directional modes standard and seq, both filter modes and
window modes standard / learn / no, plus the "full" direction. Not supported: directional modes
"parallel", "4dir", "4dirp", `direct_paramtrization`, window_mode "symettric" (a decay in raw
pixel indices on .cuda()), causal calls, attn_mask, KV cache (check_features refuses them:
the short filter and the "full" filter see every direction; "quadrant" is causal along both
axes but the centred short filter is not).

Layout "2d": x (B, H, W, C) channels-last -> (B, H, W, C), H <= l_max and W <= l_max (ValueError
beyond); the convolutions permute to (B, D, H, W) inside.

Parameters and options. `num_heads` is accepted for the shared constructor signature and must be
a positive int; it changes nothing. `l_max` is the official one: the side of the largest grid
(z is a learned table of l_max rows, t = linspace(0, 1, l_max)); the official code asserts
H = W = l_max, so to reproduce a trained model use the grid it was trained on. `attn_drop` is the
official `dropout`; `proj_drop` a dropout after out_proj (none in the official code).
`official_scale=True` divides the long convolution (not the bias term) by 2 l_max, as the
official fftconv2d does (below). Filter keywords as hyena.py's; `window_mode` as the official.

Deviations:
- The official fftconv2d returns the convolution divided by 2L (L = H = W = l_max): it divides
  the filter's spectrum by the FFT size 2L, as the 1-D code does, but then calls irfft2 with its
  default normalisation, which divides by (2L)^2 again. Here the convolution is exact by default;
  `official_scale=True` restores the factor (as 1 / (2 l_max), which equals the official 1 / (2L)
  at the only size the official code runs).
- "full" is not in the official code (its non-causal variants are "4dir"/"4dirp").
- Any H, W <= l_max, rectangles included; the official code needs H = W = l_max (and a filter
  for a smaller grid is here the top-left corner of the l_max filter).
- The FFTs run in the input's precision (float64 for float64, float32 otherwise); the official
  casts to float32 always.
- No per-parameter optimizer hints (`_optim`), as in hyena.py; filter_dropout is not offered
  (never applied in the official code).

Checkpoint key map (official HyenaOperator2d state_dict -> this module: identical keys): in_proj.
{weight, bias}, out_proj.{weight, bias}, short_filter.{weight ((N+1) C, 1, 3, 3), bias},
filter_fn.bias ((N-1) C), filter_fn.pos_emb.{z (1, l_max, emb_dim), t}; separable:
filter_fn.Ximplicit_filter.* (the H-axis filter, official 'l1'), filter_fn.Yimplicit_filter.*
(W axis), filter_fn.{X,Y}modulation.deltas (+ .shift with window_mode="learn"; nothing with
"no"); joint: filter_fn.implicit_filter.* (first Linear takes 2 emb_dim inputs, the H-offset
features first), filter_fn.modulation.{Xdeltas, Ydeltas} (+ .shift with "learn"). The one Sin
module of the official filter is shared by every hidden layer of both X and Y MLPs: `.1.freq`,
`.3.freq`, ... are one tensor. Filter channels are '(o d)' (c = o C + d). In the official ViT
the layer sits in `blocks.<i>.attn.`; strip that prefix. The official model feeds (B, N, C)
tokens reshaped to a square; here the caller passes (B, H, W, C).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_image
from attnlab.hooks import HookPoint
from attnlab.mechanisms._hyena_filter import (ExponentialModulation, PositionalEmbedding, Sin, compute_dtype,
                                              implicit_mlp, run_mlp)
from attnlab.registry import MechanismSpec, register

NAME = "hyena2d"
DIRECTIONS = ("full", "quadrant", "seq")
FILTER_MODES = ("separable", "joint")
WINDOW_MODES = ("standard", "learn", "no")


def _int_at_least(arg: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{NAME}: {arg} must be an int >= {low}, got {value!r}")
    return value


def _finite(arg: str, value, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{NAME}: {arg} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def _choice(arg: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{NAME}: {arg} must be one of {allowed}, got {value!r}")
    return value


def long_conv2d(u: Tensor, h: Tensor, bias: Tensor, *, full: bool, scale: float = 1.0) -> Tensor:
    """u (B, D, H, W), taps h (D, H, W) for offsets a, b >= 0, bias (D,) -> (B, D, H, W).

    full=False: y[i, j] = scale sum_{a<=i, b<=j} h[a, b] u[i-a, j-b] + bias u[i, j]
    full=True:  the same sum over all (a, b) with h[|a|, |b|]. One FFT over 2H x 2W points.

    Equivalent PyTorch: F.conv2d(u, flip(h_full)[:, None], padding=(H-1, W-1), groups=D) with
    h_full (D, 2H-1, 2W-1) the filter over offsets -(H-1)..(H-1) x -(W-1)..(W-1).
    """
    H, W = u.shape[-2:]
    s = (2 * H, 2 * W)
    if full:
        # Circular layout of the offsets along each axis: offset j >= 0 at j, -j at 2n - j.
        D = h.shape[0]
        h = torch.cat([h, h.new_zeros(D, 1, W), h[:, 1:].flip(-2)], dim=-2)           # (D, 2H, W)
        h = torch.cat([h, h.new_zeros(D, 2 * H, 1), h[..., 1:].flip(-1)], dim=-1)     # (D, 2H, 2W)
    if u.shape[0] == 0:                      # the CPU FFT refuses an empty batch
        return u * bias[:, None, None]
    y = torch.fft.irfft2(torch.fft.rfft2(u, s=s) * torch.fft.rfft2(h, s=s), s=s)[..., :H, :W]
    if scale != 1.0:
        y = y * scale
    return y + u * bias[:, None, None]


class ExponentialModulation2d(nn.Module):
    """The joint filter's window exp(-t_a |Xdeltas|) exp(-t_b |Ydeltas|) + shift (official
    ExponentialModulation with hyena2d_filter=True): Xdeltas, Ydeltas (1, 1, D), optional shift."""

    def __init__(self, d_model: int, *, fast_decay_pct: float, slow_decay_pct: float, target: float,
                 shift: float, window_mode: str, device=None, dtype=None):
        super().__init__()
        self.modulate = window_mode != "no"
        dtype = dtype or torch.get_default_dtype()
        if self.modulate:
            max_decay = math.log(target) / fast_decay_pct
            min_decay = math.log(target) / slow_decay_pct
            for name in ("Xdeltas", "Ydeltas"):
                deltas = torch.linspace(min_decay, max_decay, d_model, dtype=torch.float64)[None, None]
                deltas = deltas.to(device=device, dtype=dtype)                    # (1, 1, D)
                if window_mode == "learn":
                    setattr(self, name, nn.Parameter(deltas))
                else:
                    self.register_buffer(name, deltas)
        if window_mode == "learn":
            self.shift = nn.Parameter(torch.rand(1, 1, d_model, device=device, dtype=dtype))
        else:
            self.shift = float(shift)

    def forward(self, t_h: Tensor, t_w: Tensor, h: Tensor) -> Tensor:
        """h (1, H, W, D); t_h (1, H, 1), t_w (1, W, 1)."""
        if not self.modulate:
            return h
        dt = h.dtype
        decay_x = torch.exp(-t_h.to(dt) * self.Xdeltas.to(dt).abs())              # (1, H, D)
        decay_y = torch.exp(-t_w.to(dt) * self.Ydeltas.to(dt).abs())              # (1, W, D)
        decay = decay_x[:, :, None, :] * decay_y[:, None, :, :]                   # (1, H, W, D)
        shift = self.shift.to(dt) if isinstance(self.shift, Tensor) else self.shift
        return h * (decay + shift)


class HyenaFilter2d(nn.Module):
    """The implicit 2-D filter, official attribute names (see the key map in the module docstring)."""

    def __init__(self, d_model: int, *, filter_mode: str, emb_dim: int, filter_order: int, seq_len: int,
                 num_inner_mlps: int, w: float, learn_pos_emb: bool, window_mode: str, fast_decay_pct: float,
                 slow_decay_pct: float, target: float, shift: float, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.filter_mode = filter_mode
        self.bias = nn.Parameter(torch.randn(d_model, **factory))
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len, learn=learn_pos_emb, **factory)
        act = Sin(filter_order, w, **factory)          # one Sin for every hidden layer, as the official
        decay = dict(fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct, target=target)
        if filter_mode == "separable":
            self.Yimplicit_filter = implicit_mlp(emb_dim, filter_order, d_model, num_inner_mlps, act, **factory)
            self.Ximplicit_filter = implicit_mlp(emb_dim, filter_order, d_model, num_inner_mlps, act, **factory)
            for name in ("Ymodulation", "Xmodulation"):
                setattr(self, name, ExponentialModulation(
                    d_model, **decay, modulate=window_mode != "no", shift=shift,
                    learn_deltas=window_mode == "learn", learn_shift=window_mode == "learn",
                    register_deltas=window_mode != "no", **factory))
        else:
            self.implicit_filter = implicit_mlp(2 * emb_dim, filter_order, d_model, num_inner_mlps, act, **factory)
            self.modulation = ExponentialModulation2d(d_model, **decay, shift=shift, window_mode=window_mode,
                                                      **factory)

    def filter2d(self, H: int, W: int, dtype: torch.dtype) -> Tensor:
        """(H, W, d_model): taps h[a, b] for a < H (H axis), b < W (W axis), in `dtype`."""
        z, t = self.pos_emb.z, self.pos_emb.t                                     # (1, l_max, E), (1, l_max, 1)
        if self.filter_mode == "separable":
            hx = self.Xmodulation(t[:, :H], run_mlp(self.Ximplicit_filter, z[:, :H], dtype))   # (1, H, D)
            hy = self.Ymodulation(t[:, :W], run_mlp(self.Yimplicit_filter, z[:, :W], dtype))   # (1, W, D)
            return hx[0, :, None, :] * hy[0, None, :, :]                                       # (H, W, D)
        E = z.shape[-1]
        za = z[:, :H, None, :].expand(1, H, W, E)                                 # (1, H, W, E): z_a
        zb = z[:, None, :W, :].expand(1, H, W, E)                                 # (1, H, W, E): z_b
        h = run_mlp(self.implicit_filter, torch.cat([za, zb], dim=-1), dtype)     # (1, H, W, D)
        return self.modulation(t[:, :H], t[:, :W], h)[0]                          # (H, W, D)


@register(MechanismSpec(
    name=NAME, paper="Multi-Dimensional Hyena for Spatial Inductive Bias", year=2024,
    family="long_conv", layout="2d", time="O(N log N C), N = H W", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False,
    url="https://arxiv.org/abs/2309.13600", provenance="official-code",
    source=("Itamarzimm/HyenaND pytorch-image-models/timm/models/layers/hyena2d.py::HyenaOperator2d "
            "(HyenaFilter2d, fftconv2d), directional modes standard/seq; the exact (unscaled) convolution "
            "and the mirrored 'full' direction are attnlab's"),
    test_kwargs=dict(l_max=8, filter_order=8),
    test_configs=(dict(l_max=8, filter_order=8, filter_mode="joint", direction="quadrant", window_mode="learn"),
                  dict(l_max=8, order=3, filter_order=8, direction="seq", official_scale=True, emb_dim=5,
                       window_mode="no"))))
class HyenaOperator2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C), H, W <= l_max.

    Hooks (attnlab.hooks; no softmax, so no scores/probs): hook_q = x_0, the output gate; hook_k =
    the gates before each long convolution; hook_v = v; hook_filter = the long filters (offsets
    a, b >= 0; "full" mirrors them); hook_out = x_0 * v before out_proj. Shapes in __init__.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_filter", "hook_out")
    eager_hook_names = ()
    absent_hooks = {
        "hook_scores": "no softmax and no score matrix: the data-controlled operator (gates times a "
                       "block-Toeplitz convolution) is applied by 2-D FFT, never formed",
        "hook_probs": "no softmax and no attention matrix (the operator is applied by 2-D FFT, never formed)",
    }

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 l_max: int = 64, order: int = 2, filter_order: int = 64, filter_mode: str = "separable",
                 direction: str = "full", official_scale: bool = False, window_mode: str = "standard",
                 emb_dim: int = 3, num_inner_mlps: int = 2, w: float = 1.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0,
                 learn_pos_emb: bool = True, device=None, dtype=None):
        super().__init__()
        _int_at_least("dim", dim, 1)
        _int_at_least("num_heads", num_heads, 1)           # unused: Hyena has no heads
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        self.l_max = _int_at_least("l_max", l_max, 1)
        self.order = _int_at_least("order", order, 2)
        _int_at_least("filter_order", filter_order, 1)
        _int_at_least("num_inner_mlps", num_inner_mlps, 0)
        if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"{NAME}: emb_dim must be an odd int >= 3 (time, then cosine and sine bands), "
                             f"got {emb_dim!r}")
        self.filter_mode = _choice("filter_mode", filter_mode, FILTER_MODES)
        self.direction = _choice("direction", direction, DIRECTIONS)
        if window_mode == "symettric":
            raise ValueError(f"{NAME}: window_mode 'symettric' (the official decay in raw pixel indices) is not "
                             f"supported; use one of {WINDOW_MODES}")
        self.window_mode = _choice("window_mode", window_mode, WINDOW_MODES)
        for arg, value in (("official_scale", official_scale), ("learn_pos_emb", learn_pos_emb)):
            if not isinstance(value, bool):
                raise TypeError(f"{NAME}: {arg} must be a bool, got {type(value).__name__}")
        _finite("w", w)
        _finite("fast_decay_pct", fast_decay_pct, positive=True)
        _finite("slow_decay_pct", slow_decay_pct, positive=True)
        if _finite("target", target, positive=True) >= 1:
            raise ValueError(f"{NAME}: target (the window's value at the decay length) must be in (0, 1), "
                             f"got {target!r}")
        _finite("shift", shift)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.filter_order, self.emb_dim = filter_order, emb_dim
        self.official_scale = official_scale
        inner = dim * (order + 1)
        self.in_proj = nn.Linear(dim, inner, **factory)
        self.out_proj = nn.Linear(dim, dim, **factory)
        self.short_filter = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, **factory)
        self.filter_fn = HyenaFilter2d(
            dim * (order - 1), filter_mode=filter_mode, emb_dim=emb_dim, filter_order=filter_order,
            seq_len=l_max, num_inner_mlps=num_inner_mlps, w=w, learn_pos_emb=learn_pos_emb,
            window_mode=window_mode, fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct,
            target=target, shift=shift, **factory)
        self.dropout = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points; D = dim, channels-first as computed.
        self.hook_q = HookPoint()           # (B, D, H, W): x_0, the last gate
        self.hook_k = HookPoint()           # (B, N-1, D, H, W): x_1 .. x_{N-1}; filter o follows gate x_{N-1-o}
        self.hook_v = HookPoint()           # (B, D, H, W): v after the short filter
        self.hook_filter = HookPoint()      # (N-1, D, H, W): h^o[a, b], a < H, b < W (no bias, no scale)
        self.hook_out = HookPoint()         # (B, D, H, W): x_0 * v, before out_proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, order={self.order}, l_max={self.l_max}, filter_mode={self.filter_mode}, "
                f"direction={self.direction}, window_mode={self.window_mode}, official_scale={self.official_scale}")

    def long_filters(self, H: int, W: int, dtype: torch.dtype) -> Tensor:
        """(N-1, D, H, W), the official rearrange 'l1 l2 (o d) -> o d l1 l2'."""
        h = self.filter_fn.filter2d(H, W, dtype)                                 # (H, W, (N-1) D)
        return h.reshape(H, W, self.order - 1, self.dim).permute(2, 3, 0, 1)     # (N-1, D, H, W)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        if H > self.l_max or W > self.l_max:
            raise ValueError(f"{NAME}: image {H} x {W} exceeds l_max={self.l_max} along an axis (the implicit "
                             f"filter's positions are a learned table of l_max rows); build the module with "
                             f"l_max >= {max(H, W)}")
        N, cd = self.order, compute_dtype(x.dtype)
        u = self.in_proj(x).permute(0, 3, 1, 2)                                  # (B, (N+1) C, H, W)
        uc = self.short_filter(u).to(cd)                                         # (B, (N+1) C, H, W)
        q = self.hook_q(uc[:, :C])                                               # (B, C, H, W)
        gates = self.hook_k(uc[:, C:N * C].reshape(B, N - 1, C, H, W))           # (B, N-1, C, H, W)
        v = self.hook_v(uc[:, N * C:])                                           # (B, C, H, W)
        h = self.hook_filter(self.long_filters(H, W, cd))                        # (N-1, C, H, W)
        bias = self.filter_fn.bias.to(cd).reshape(N - 1, C)                      # (N-1, C)
        scale = 1.0 / (2 * self.l_max) if self.official_scale else 1.0
        full = self.direction == "full"
        for o in range(N - 1):
            v = self.dropout(v * gates[:, N - 2 - o])
            if self.direction == "seq" and o == 0:       # the official flips v around this convolution
                v = long_conv2d(v.flip(-1, -2), h[o], bias[o], full=False, scale=scale).flip(-1, -2)
            else:
                v = long_conv2d(v, h[o], bias[o], full=full, scale=scale)        # (B, C, H, W)
        y = self.hook_out(q * v)                                                 # (B, C, H, W)
        y = y.permute(0, 2, 3, 1).to(x.dtype)                                    # (B, H, W, C)
        return self.proj_drop(self.out_proj(y))                                  # (B, H, W, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds of the projections, 3 x 3 short filter and filter MLP, plus FFT work,
        for N = seq_len = H W pixels of a square image.

        An rfft2 or irfft2 of n = 4N real points counts 2.5 n log2 n flops; per long convolution and
        channel: rfft2 of the input (per sample) and of the filter (once), a complex product (6 flops
        per bin, about n / 2 bins), an irfft2, the bias term and the gate (3 N). Separable filter MLPs
        run over 2 sqrt(N) positions, the joint one over N. Backward: twice the forward.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        B, P, C, N = batch, seq_len, self.dim, self.order
        n = 4 * P
        fft = 2.5 * n * math.log2(n) if n > 1 else 0.0
        proj = 2 * B * P * C * (N + 1) * C + 2 * B * P * C * C
        short = 2 * 9 * B * P * (N + 1) * C
        F_, E = self.filter_order, self.emb_dim
        depth = (len(self.filter_fn.implicit_filter) if self.filter_mode == "joint"
                 else len(self.filter_fn.Ximplicit_filter)) // 2 - 1
        per_pos = lambda e_in: 2 * (e_in * F_ + depth * F_ * F_ + F_ * (N - 1) * C)  # noqa: E731
        mlp = 2 * math.isqrt(P) * per_pos(E) if self.filter_mode == "separable" else P * per_pos(2 * E)
        conv = (N - 1) * C * (B * (2 * fft + 6 * (n // 2 + 1)) + fft + 3 * B * P)
        fwd = int(proj + short + mlp + conv + B * P * C)
        return fwd, 2 * fwd
