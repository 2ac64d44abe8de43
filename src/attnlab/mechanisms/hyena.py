"""Hyena operator (`hyena`): gated implicit long convolutions.

Paper: Hyena Hierarchy: Towards Larger Convolutional Language Models (Poli, Massaroli, Nguyen,
Fu, Dao, Baccus, Bengio, Ermon, Re; ICML 2023, arXiv 2302.10866).
Code followed: HazyResearch/safari `standalone_hyena.py::HyenaOperator` (with its HyenaFilter,
PositionalEmbedding, ExponentialModulation, Sin and fftconv); the full `src/models/sequence/
hyena.py::HyenaOperator` computes the same with num_heads=1 (see the key map).

For x (B, L, C), D = C, order N (official `order`, default 2):

    x_0, ..., x_{N-1}, v = split(short_filter(in_proj(x)))       each (B, D, L)
    for o = 0 .. N-2:                                              (official loop order)
        v = x_{N-1-o} * v                                          gate (dropout = attn_drop)
        v_t = sum_{s<=t} h^o_{t-s} v_s + bias^o * v_t              long causal convolution
    y = out_proj(x_0 * v)

`in_proj = Linear(C, (N+1) C)`; `short_filter` a depthwise Conv1d, kernel 3, padding 2, cut to
the first L outputs (causal); the N-1 long filters h^o (D, L) come from the implicit filter:
an MLP (`filter_order` wide, sine activations with a learned frequency) over positional
features z_t of the positions t = 0 .. L-1, multiplied by the decay window
exp(-t' |delta_c|) + shift (t' = t / (l_max - 1), delta_c spread from fast to slow decay over
the channels). The long convolution runs as an FFT over 2L points, O(L log L) per channel.

Status: the official standalone operator; with copied weights the outputs match the official
module to 1.7e-16 in float64 and 9e-8 in float32 (a one-off run; the optional test at the end of
tests/mechanisms/test_hyena.py repeats it where a safari checkout is at hand). Not supported:
attn_mask, KV cache (check_features refuses them: Hyena's recurrent "distilled" inference
mode is not in the official code either), multi-head Hyena (the full version's
num_heads > 1, outer_mixing, post_order_ffn), `normalized` filters, the fused FFT kernel.

Layout "seq": x (B, N, C) -> (B, N, C), N <= l_max (ValueError beyond: z is a learned table of
l_max rows and t is normalised by l_max, so the filter is only defined there; the filter for
N < l_max is the first N taps of the l_max filter, as the official `pos_emb(L)` slices).

Causality. The operator is causal by construction, and `forward(x, is_causal=True)` is exactly
the official computation. The seq contract (tests/mechanisms/contracts/test_seq.py,
test_causal_no_leak) requires that a non-causal call let later tokens reach earlier outputs, so
"always causal" is not open to a spec with causal=True; `is_causal=False` therefore runs a
bidirectional reading with the same parameters (not in the paper or the official code):
the short filter is centred (padding 1: taps t-1, t, t+1) and the long filter is mirrored,
v_t = sum_s h_{|t-s|} v_s + bias v_t (h_0 counted once), one FFT over 2L points as well. For
safari checkpoints and language modelling call with `is_causal=True`.

Parameters and options. `num_heads` is accepted for the shared constructor signature and
checked to be a positive int; Hyena has no heads and it changes nothing (dim need not be
divisible by it). `attn_drop` is the official `dropout` (on each gated v); `proj_drop` a
dropout after out_proj (none in the official code; 0 by default). Filter options as the
official HyenaFilter keywords: `emb_dim` (odd >= 3), `filter_order` (MLP width), `num_inner_mlps`,
`w` (initial sine frequency), `fast_decay_pct`, `slow_decay_pct`, `target`, `shift`, `modulate`;
`learn_pos_emb` (official lr_pos_emb != 0: z is a parameter) and `learn_modulation` (official
modulation_lr != 0: deltas is a parameter).

Deviations:
- is_causal=False is the bidirectional reading above (the official operator has no such mode).
- N > l_max raises instead of the official silent truncation of the output to l_max tokens.
- The filter MLP and the FFTs run in float32 for bfloat16/float16 modules (torch.fft has no
  bfloat16) and in float64 for float64 ones; the official casts to the parameters' dtype.
- The official per-parameter optimizer hints (`_optim`: lr 1e-3, wd 0 for the filter MLP, lr 1e-5
  for z) are not set; with attnlab's trainer z and the filter train at the model's lr and wd.
- filter_fn.dropout (filter_dropout) is never applied in the official code; it is not offered.

Checkpoint key map (official standalone or full safari HyenaOperator with num_heads=1,
inner_factor=1, num_blocks=1, as every released config): keys are identical, a
`model.load_state_dict(official.state_dict())` works: in_proj.{weight,bias},
out_proj.{weight,bias}, short_filter.{weight (3C, 1, 3), bias}, filter_fn.bias ((N-1) C),
filter_fn.pos_emb.{z (1, l_max, emb_dim), t (1, l_max, 1)}, filter_fn.implicit_filter.{0,2,4}.
{weight,bias}, .6.weight (no bias), .{1,3,5}.freq (one shared Sin: the same tensor three times),
filter_fn.modulation.deltas (1, 1, (N-1) C). A safari LM checkpoint holds them under
`backbone.layers.<i>.mixer.`; strip that prefix. hyena-small-150b: l_max=2048, emb_dim=33,
filter_order=64, modulate=False, w=14. Only for order > 2: the full version reads the filter
channels as '(v o)' (channel c = d (N-1) + o) where the standalone, and attnlab, read '(o d)'
(c = o C + d); permute the rows of implicit_filter.6.weight, filter_fn.bias and deltas.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_tokens
from attnlab.hooks import HookPoint
from attnlab.mechanisms._hyena_filter import (ExponentialModulation, PositionalEmbedding, Sin, compute_dtype,
                                              implicit_mlp, run_mlp)
from attnlab.registry import MechanismSpec, register

NAME = "hyena"


def _int_at_least(name: str, arg: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: {arg} must be an int >= {low}, got {value!r}")
    return value


def _finite(name: str, arg: str, value, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name}: {arg} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def check_filter_options(name: str, *, emb_dim, filter_order, num_inner_mlps, w, fast_decay_pct,
                         slow_decay_pct, target, shift) -> None:
    """The implicit filter's keywords, as both Hyena mechanisms take them."""
    if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"{name}: emb_dim must be an odd int >= 3 (time, then cosine and sine bands), "
                         f"got {emb_dim!r}")
    _int_at_least(name, "filter_order", filter_order, 1)
    _int_at_least(name, "num_inner_mlps", num_inner_mlps, 0)
    _finite(name, "w", w)
    _finite(name, "fast_decay_pct", fast_decay_pct, positive=True)
    _finite(name, "slow_decay_pct", slow_decay_pct, positive=True)
    if _finite(name, "target", target, positive=True) >= 1:
        raise ValueError(f"{name}: target (the window's value at the decay length) must be in (0, 1), "
                         f"got {target!r}")
    _finite(name, "shift", shift)


def long_conv(u: Tensor, h: Tensor, bias: Tensor, *, causal: bool) -> Tensor:
    """u (B, D, L), taps h (D, L), bias (D,) -> (B, D, L), by FFT over 2L points.

    causal:      y_t = sum_{s<=t} h_{t-s} u_s + bias u_t     (safari fftconv)
    bidirectional: y_t = sum_s h_{|t-s|} u_s + bias u_t

    Equivalent PyTorch (causal): T = h[:, (t - s)] masked to s <= t, y = einsum("dts,bds->bdt", T, u).
    """
    L = u.shape[-1]
    n = 2 * L
    if not causal:
        # Circular layout of the offsets -(L-1)..(L-1) in 2L slots: offset j >= 0 at j, -j at 2L - j.
        h = torch.cat([h, h.new_zeros(*h.shape[:-1], 1), h[..., 1:].flip(-1)], dim=-1)   # (D, 2L)
    if u.shape[0] == 0:                      # the CPU FFT refuses an empty batch
        return u * bias[:, None]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]  # (B, D, L)
    return y + u * bias[:, None]


class HyenaFilter(nn.Module):
    """The implicit long filter, official attribute names: bias, pos_emb, implicit_filter, modulation."""

    def __init__(self, d_model: int, *, emb_dim: int, filter_order: int, seq_len: int, num_inner_mlps: int,
                 w: float, learn_pos_emb: bool, modulation: dict, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.d_model = d_model
        self.bias = nn.Parameter(torch.randn(d_model, **factory))
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len, learn=learn_pos_emb, **factory)
        act = Sin(filter_order, w, **factory)
        self.implicit_filter = implicit_mlp(emb_dim, filter_order, d_model, num_inner_mlps, act, **factory)
        self.modulation = ExponentialModulation(d_model, **modulation, **factory)

    def filter(self, L: int, dtype: torch.dtype) -> Tensor:
        """(1, L, d_model): the first L taps, in `dtype`."""
        z = self.pos_emb.z[:, :L]                                           # (1, L, emb_dim)
        t = self.pos_emb.t[:, :L]                                           # (1, L, 1)
        return self.modulation(t, run_mlp(self.implicit_filter, z, dtype))  # (1, L, d_model)


@register(MechanismSpec(
    name=NAME, paper="Hyena Hierarchy: Towards Larger Convolutional Language Models", year=2023,
    family="long_conv", layout="seq", time="O(N log N C)", memory="O(N C)", exact=False,
    causal=True, attn_mask=False, kv_cache=False,
    url="https://arxiv.org/abs/2302.10866", provenance="official-code",
    source=("HazyResearch/safari standalone_hyena.py::HyenaOperator (HyenaFilter, PositionalEmbedding, "
            "ExponentialModulation, Sin, fftconv); is_causal=False (mirrored filter, centred short "
            "filter) is attnlab's reading, not in the official code"),
    test_kwargs=dict(l_max=16, filter_order=8),
    test_configs=(dict(l_max=16, order=3, filter_order=8, emb_dim=5, num_inner_mlps=1, shift=0.1,
                       learn_modulation=True),
                  dict(l_max=32, filter_order=8, modulate=False, learn_pos_emb=False, w=14.0))))
class HyenaOperator(nn.Module):
    """x (B, N, C) -> (B, N, C), N <= l_max; causal with is_causal=True (the official operator).

    Hooks (attnlab.hooks; no softmax, so no scores/probs): hook_q = x_0, the output gate (H3's q);
    hook_k = the gates before each long convolution (H3's k); hook_v = v; hook_filter = the long
    filters; hook_out = x_0 * v before out_proj. Channels-first inside: shapes in __init__.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_filter", "hook_out")
    eager_hook_names = ()
    absent_hooks = {
        "hook_scores": "no softmax and no score matrix: the data-controlled operator "
                       "diag(x_0) T_h diag(x_1) (Toeplitz T_h) is applied by FFT, never formed",
        "hook_probs": "no softmax and no attention matrix (the operator is applied by FFT, never formed)",
    }

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 l_max: int = 1024, order: int = 2, filter_order: int = 64, emb_dim: int = 3,
                 num_inner_mlps: int = 2, w: float = 1.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0,
                 modulate: bool = True, learn_pos_emb: bool = True, learn_modulation: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _int_at_least(NAME, "dim", dim, 1)
        _int_at_least(NAME, "num_heads", num_heads, 1)      # unused: Hyena has no heads
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        self.l_max = _int_at_least(NAME, "l_max", l_max, 1)
        self.order = _int_at_least(NAME, "order", order, 2)
        check_filter_options(NAME, emb_dim=emb_dim, filter_order=filter_order, num_inner_mlps=num_inner_mlps,
                             w=w, fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct,
                             target=target, shift=shift)
        for arg, value in (("modulate", modulate), ("learn_pos_emb", learn_pos_emb),
                           ("learn_modulation", learn_modulation)):
            if not isinstance(value, bool):
                raise TypeError(f"{NAME}: {arg} must be a bool, got {type(value).__name__}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.filter_order, self.emb_dim = filter_order, emb_dim
        inner = dim * (order + 1)
        self.in_proj = nn.Linear(dim, inner, **factory)
        self.out_proj = nn.Linear(dim, dim, **factory)
        self.short_filter = nn.Conv1d(inner, inner, 3, padding=2, groups=inner, **factory)
        self.filter_fn = HyenaFilter(
            dim * (order - 1), emb_dim=emb_dim, filter_order=filter_order, seq_len=l_max,
            num_inner_mlps=num_inner_mlps, w=w, learn_pos_emb=learn_pos_emb,
            modulation=dict(fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct, target=target,
                            modulate=modulate, shift=shift, learn_deltas=learn_modulation), **factory)
        self.dropout = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points; D = dim, L = sequence length, channels-first as computed.
        self.hook_q = HookPoint()           # (B, D, L): x_0, the last gate
        self.hook_k = HookPoint()           # (B, N-1, D, L): x_1 .. x_{N-1}; filter o follows gate x_{N-1-o}
        self.hook_v = HookPoint()           # (B, D, L): v after the short filter
        self.hook_filter = HookPoint()      # (N-1, D, L): the long filters h^o_t, t = 0 .. L-1 (no bias)
        self.hook_out = HookPoint()         # (B, D, L): x_0 * v, before out_proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, order={self.order}, l_max={self.l_max}, filter_order={self.filter_order}, "
                f"emb_dim={self.emb_dim}")

    def long_filters(self, L: int, dtype: torch.dtype) -> Tensor:
        """(N-1, D, L): filter o in row o, as the official rearrange 'l (o d) -> o d l'."""
        h = self.filter_fn.filter(L, dtype)[0]                              # (L, (N-1) D)
        return h.reshape(L, self.order - 1, self.dim).permute(1, 2, 0)      # (N-1, D, L)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_tokens(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, L, C = x.shape
        if L > self.l_max:
            raise ValueError(f"{NAME}: sequence length N={L} exceeds l_max={self.l_max} (the implicit filter's "
                             f"positions are a learned table of l_max rows); build the module with l_max >= {L}")
        N, cd = self.order, compute_dtype(x.dtype)
        u = self.in_proj(x).transpose(1, 2)                                 # (B, (N+1) C, L)
        if is_causal:
            uc = self.short_filter(u)[..., :L]                              # (B, (N+1) C, L), taps t-2, t-1, t
        else:
            uc = F.conv1d(u, self.short_filter.weight, self.short_filter.bias, padding=1,
                          groups=u.shape[1])                                # (B, (N+1) C, L), taps t-1, t, t+1
        uc = uc.to(cd)
        q = self.hook_q(uc[:, :C])                                          # (B, C, L)
        gates = self.hook_k(uc[:, C:N * C].reshape(B, N - 1, C, L))         # (B, N-1, C, L)
        v = self.hook_v(uc[:, N * C:])                                      # (B, C, L)
        h = self.hook_filter(self.long_filters(L, cd))                      # (N-1, C, L)
        bias = self.filter_fn.bias.to(cd).reshape(N - 1, C)                 # (N-1, C), official '(o d) -> o d'
        for o in range(N - 1):
            v = self.dropout(v * gates[:, N - 2 - o])
            v = long_conv(v, h[o], bias[o], causal=is_causal)              # (B, C, L)
        y = self.hook_out(q * v)                                            # (B, C, L)
        y = y.transpose(1, 2).to(x.dtype)                                   # (B, L, C)
        return self.proj_drop(self.out_proj(y))                             # (B, L, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds of the projections, short filter and filter MLP, plus the FFT work.

        An rfft or irfft of n real points counts 2.5 n log2 n flops (half a complex FFT's 5 n log2 n),
        n = 2N; per long convolution and channel: rfft of the input (per sample) and of the filter
        (once), a complex product (6 flops per bin), an irfft, the bias term and the gate (3 N).
        The bidirectional form costs the same. Backward: twice the forward. The module's own dim
        is used (the argument is the bench's and must agree); num_heads is unused.
        """
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        B, L, C, N = batch, seq_len, self.dim, self.order
        F_, E, depth = self.filter_order, self.emb_dim, len(self.filter_fn.implicit_filter) // 2 - 1
        n = 2 * L
        fft = 2.5 * n * math.log2(n) if n > 1 else 0.0
        proj = 2 * B * L * C * (N + 1) * C + 2 * B * L * C * C
        short = 2 * 3 * B * L * (N + 1) * C
        mlp = 2 * L * (E * F_ + depth * F_ * F_ + F_ * (N - 1) * C)
        conv = (N - 1) * C * (B * (2 * fft + 6 * (L + 1)) + fft + 3 * B * L)
        fwd = int(proj + short + mlp + conv + B * L * C)
        return fwd, 2 * fwd
