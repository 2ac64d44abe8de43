"""MEDUSA: one shared self-attention body whose heads gate several scales (`medusa`).

Paper: MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for
Medical Image Analysis (Aboutalebi, Pavlova, Gunraj, Shafiee, Sabri, Alaref, Wong; arXiv
2110.06063, 2021; Frontiers in Medicine 8:821120, 2022). The network behind COVID-Net CXR-3.

What the paper says (its abstract, the part of the text that could be read here): instead of
"multiple isolated lightweight attention mechanisms" placed at different points of a network,
MEDUSA has "a single, unified self-attention mechanism with significantly higher capacity with
multiple attention heads feeding into different scales in the network architecture" ("single
body, multi-scale heads"), giving "explicit global context amongst selective attention at
different levels of representational abstractions while still enabling differing local attention
context at individual levels". Only a TensorFlow checkpoint was released (lindawangg/COVID-Net
docs/models.md, COVID-Net CXR-3), no model code; the method section's equations and layer sizes
were not available to this reconstruction.

Status: a reconstruction (provenance "reconstruction"). What is computed, for a source map S
(B, H, W, C_src) and backbone features X_s (B, H_s, W_s, C_s), s = 1..S:

    t   = Embed(S)                  strided conv, kernel = stride = `stride`: (B, H/p, W/p, D)
    t   = t + Proj(MHSA(t))         multi-head softmax self-attention over the H W / p^2 tokens
    A_s = Resize_{H_s x W_s}(Head_s(t))      Head_s a 1 x 1 projection D -> C_s, bilinear resize
    X_s <- X_s * sigmoid(A_s)       (`residual=True`: X_s * (1 + sigmoid(A_s)))

The body (Embed + MHSA, computed once) is the "encoder", the per-scale heads with their resize
the "decoder": the attention is computed once and feeds every scale. `MedusaGate` is that module
for any list of scales (`gate(features, source=None)`, for the networks built on it);
`MedusaAttention2d`, registered as `medusa`, is its one-scale case with source = x, the
x (B, H, W, C) -> x * sigmoid(A) layer the shared suites and the arena run.

Layout: channels-last throughout; H and W of the source must be multiples of `stride` (a
ValueError otherwise). Backbone feature maps may have any size.

Parameters (checkpoint key map): `embed` (Conv2d C_src -> D, kernel = stride = p, biased;
weight (D, C_src, p, p), an NCHW conv applied to the permuted map), `qkv` (Linear D -> 3 D; the
output reshapes as (..., 3, h, d), as `mhsa`), `proj` (Linear D -> D), `heads.<s>` (Linear
D -> C_s, one per scale; the registered module has `heads.0`). No BatchNorm. No official PyTorch
weights exist; a port of the TF checkpoint would map its tensors onto these by hand (TF conv
kernels (kh, kw, in, out) -> (out, in, kh, kw), dense (in, out) -> transposed), if its layers
match at all.

Guesses (each a reading of the abstract, not the paper's equations):
- The body is dot-product multi-head self-attention (through attnlab.ops.attention, scale
  1/sqrt(d)) over patch tokens of the source, with a residual around it (t + Proj(MHSA(t)), the
  transformer convention). The paper's body is an "encoder-decoder" of unknown composition and
  depth (COVID-Net models are convolutional); one attention layer stands in for it.
- "Heads feeding into different scales" are per-scale 1 x 1 projections of the shared map,
  resized bilinearly (align_corners=False) to each scale; the paper's heads may hold more layers
  (its "differing local attention context at individual levels" suggests convolutions per head).
- "Selective attention" is a sigmoid gate multiplied into the features (attention-condenser style,
  as in Wong's other work); `residual=False` (default) is the plain gate X * sigmoid(A), and
  `residual=True` the residual-attention form X (1 + sigmoid(A)), which keeps the features'
  scale at initialisation. Which one the paper uses is not known.
- The source of the body: the registered module uses its own input; `MedusaGate.gate` takes
  `source=` (the image or the stem features, the paper's body reads the image) and defaults to
  the highest-resolution feature map.
- `num_heads` is the body's attention heads; `body_dim` (default: the source width) its width D.
Softmax in float32 (float64 input: float64) inside ops.attention; the sigmoid gate in float32
(float64 for float64). Not supported: causal, attn_mask, KV cache (check_features refuses them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_dims, check_dropout, check_features, check_image,
                             check_positive_int)
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import PRIORITY, attention
from attnlab.registry import MechanismSpec, register

NAME = "medusa"


class MedusaGate(nn.Module):
    """Shared self-attention body over a source map; one sigmoid gate per backbone scale.

    `gate(features, source=None)`: features a list of (B, H_s, W_s, C_s) maps with C_s =
    `scale_dims[s]`, source (B, H, W, source_dim) (default features[0]) -> the list of gated
    maps, same shapes and dtypes. The body runs once per call, whatever the number of scales.
    Hooks (attnlab.hooks), N' = (H/p)(W/p) tokens: hook_q, hook_k, hook_v (B, h, N', d);
    hook_scores / hook_probs (B, h, N', N') on the reference backend only; hook_out (B, h, N', d)
    before `proj`; hook_gates (B, H_s, W_s, C_s) = sigmoid(A_s), once per scale.

    `attention=` swaps the body's attention for any module of width `body_dim`: a sequence
    mechanism ((B, N', D) -> (B, N', D), `attention_layout="seq"`) or a 2-D one ((B, H/p, W/p, D)
    -> same, `"2d"`), e.g. `attnlab.create("mhsa", D, h)`; the body is then t + attention(t) and
    the built-in qkv/proj (and their hooks) are absent. With `attention=create("mhsa", D, h)` and
    its weights copied from `qkv`/`proj`, the body computes what the built-in one does (tested).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out", "hook_gates")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, source_dim: int, scale_dims: Sequence[int], num_heads: int = 8, *,
                 body_dim: int | None = None, stride: int = 2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, residual: bool = False,
                 backend: str | None = None, attention: nn.Module | None = None,
                 attention_layout: str = "seq", device=None, dtype=None):
        super().__init__()
        check_positive_int(NAME, "source_dim", source_dim)
        if attention is not None and not isinstance(attention, nn.Module):
            raise TypeError(f"{NAME}: attention must be an nn.Module (the body's attention) or None, "
                            f"got {type(attention).__name__}")
        if attention_layout not in ("seq", "2d"):
            raise ValueError(f"{NAME}: attention_layout must be 'seq' (B, N, D) or '2d' (B, H, W, D), "
                             f"got {attention_layout!r}")
        if isinstance(scale_dims, (int, str)) or not isinstance(scale_dims, Sequence) or not scale_dims:
            raise ValueError(f"{NAME}: scale_dims must be a non-empty sequence of positive ints "
                             f"(one width per scale), got {scale_dims!r}")
        scale_dims = tuple(check_positive_int(NAME, "scale_dims[%d]" % i, c) for i, c in enumerate(scale_dims))
        body_dim = source_dim if body_dim is None else check_positive_int(NAME, "body_dim", body_dim)
        self.head_dim = check_dims(NAME, body_dim, num_heads)
        self.stride = check_positive_int(NAME, "stride", stride)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        for arg, value in (("qkv_bias", qkv_bias), ("residual", residual)):
            if not isinstance(value, bool):
                raise TypeError(f"{NAME}: {arg} must be a bool, got {type(value).__name__}")
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{NAME}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.source_dim, self.scale_dims, self.body_dim = source_dim, scale_dims, body_dim
        self.num_heads, self.residual, self.backend = num_heads, residual, backend
        self.attn_drop = attn_drop
        self.embed = nn.Conv2d(source_dim, body_dim, kernel_size=stride, stride=stride, **factory)
        self.attention, self.attention_layout = attention, attention_layout
        if attention is None:
            self.qkv = nn.Linear(body_dim, 3 * body_dim, bias=qkv_bias, **factory)
            self.proj = nn.Linear(body_dim, body_dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.heads = nn.ModuleList(nn.Linear(body_dim, c, **factory) for c in scale_dims)
        self.hook_q = HookPoint()        # (B, h, N', d)
        self.hook_k = HookPoint()        # (B, h, N', d)
        self.hook_v = HookPoint()        # (B, h, N', d)
        self.hook_scores = HookPoint()   # (B, h, N', N'): q k^T / sqrt(d) (reference backend only)
        self.hook_probs = HookPoint()    # (B, h, N', N') (reference backend only)
        self.hook_out = HookPoint()      # (B, h, N', d): per-head outputs before proj
        self.hook_gates = HookPoint()    # (B, H_s, W_s, C_s): sigmoid(A_s), once per scale

    def extra_repr(self) -> str:
        return (f"source_dim={self.source_dim}, scale_dims={self.scale_dims}, body_dim={self.body_dim}, "
                f"num_heads={self.num_heads}, stride={self.stride}, residual={self.residual}")

    def body(self, source: Tensor) -> Tensor:
        """source (B, H, W, C_src) -> the shared map t (B, H/p, W/p, D), computed once per call."""
        B, H, W, _ = source.shape
        p = self.stride
        if H % p or W % p:
            raise ValueError(f"{NAME}: the source's height and width must be multiples of stride={p}, "
                             f"got H={H}, W={W} (shape {tuple(source.shape)})")
        h, d = self.num_heads, self.head_dim
        t = self.embed(source.permute(0, 3, 1, 2))                          # (B, D, H/p, W/p)
        t = t.permute(0, 2, 3, 1)                                           # (B, H/p, W/p, D)
        Hp, Wp, n = H // p, W // p, (H // p) * (W // p)
        if self.attention is not None:
            if self.attention_layout == "2d":
                return t + self.proj_drop(self.attention(t))                # (B, H/p, W/p, D)
            out = self.attention(t.reshape(B, n, self.body_dim))            # (B, N', D)
            return t + self.proj_drop(out.reshape(B, Hp, Wp, self.body_dim))
        tokens = t.reshape(B, n, self.body_dim)                             # (B, N', D)
        q, k, v = self.qkv(tokens).reshape(B, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N', d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend,
                        scores_hook=self.hook_scores, probs_hook=self.hook_probs)
        out = self.hook_out(out)                                            # (B, h, N', d)
        out = out.transpose(1, 2).reshape(B, Hp, Wp, self.body_dim)         # (B, H/p, W/p, D)
        return t + self.proj_drop(self.proj(out))                           # (B, H/p, W/p, D)

    def gate_scale(self, t: Tensor, x: Tensor, s: int) -> Tensor:
        """Gate scale s: x (B, H_s, W_s, C_s) by sigmoid(Resize(Head_s(t))), t = `body(source)`.

        For networks that gate their stages one after another with one body computed up front."""
        if not 0 <= s < len(self.scale_dims):
            raise IndexError(f"{NAME}: scale {s} out of range (the gate has {len(self.scale_dims)} scales)")
        check_image(NAME, x, self.scale_dims[s], what=f"features[{s}]")
        a = self.heads[s](t)                                                # (B, H/p, W/p, C_s)
        if a.shape[1:3] != x.shape[1:3]:
            a = F.interpolate(a.permute(0, 3, 1, 2), size=tuple(x.shape[1:3]), mode="bilinear",
                              align_corners=False)                          # (B, C_s, H_s, W_s)
            a = a.permute(0, 2, 3, 1)                                       # (B, H_s, W_s, C_s)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        gates = self.hook_gates(torch.sigmoid(a.to(compute)))               # (B, H_s, W_s, C_s)
        if self.residual:
            gates = 1.0 + gates
        return (x.to(compute) * gates).to(x.dtype)

    def gate(self, features: Sequence[Tensor], source: Tensor | None = None) -> list[Tensor]:
        """Gate every scale of `features` with the one shared attention computed from `source`."""
        if isinstance(features, Tensor) or not isinstance(features, Sequence):
            raise TypeError(f"{NAME}: features must be a list of (B, H_s, W_s, C_s) tensors, "
                            f"got {type(features).__name__}")
        if len(features) != len(self.scale_dims):
            raise ValueError(f"{NAME}: expected {len(self.scale_dims)} feature maps (scale_dims="
                             f"{self.scale_dims}), got {len(features)}")
        for s, (x, c) in enumerate(zip(features, self.scale_dims)):
            check_image(NAME, x, c, what=f"features[{s}]")
        source = features[0] if source is None else source
        check_image(NAME, source, self.source_dim, what="source")
        B = source.shape[0]
        bad = [s for s, x in enumerate(features) if x.shape[0] != B]
        if bad:
            raise ValueError(f"{NAME}: feature maps {bad} have another batch size than the source ({B})")
        t = self.body(source)
        return [self.gate_scale(t, x, s) for s, x in enumerate(features)]

    def forward(self, features: Sequence[Tensor], source: Tensor | None = None) -> list[Tensor]:
        return self.gate(features, source)


@register(MechanismSpec(
    name=NAME, paper=("MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network "
                      "Architecture for Medical Image Analysis"),
    year=2021, family="gating", layout="2d",
    time="O(N C D + (N/p^2)^2 D)", memory="O(N C) (sdpa, flex); + O((N/p^2)^2) (reference)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2110.06063", provenance="reconstruction",
    source=("Aboutalebi et al. 2021 (arXiv 2110.06063), abstract only: one shared self-attention body, "
            "heads gating several scales. Guessed: patch-embedded MHSA body with residual, per-scale 1x1 "
            "heads with bilinear resize, sigmoid gate x * sigmoid(A); only a TF checkpoint was released "
            "(lindawangg/COVID-Net docs/models.md, COVID-Net CXR-3)"),
    test_kwargs=dict(stride=2),
    test_configs=(dict(stride=1, body_dim=16, residual=True),)))
class MedusaAttention2d(MedusaGate):
    """x (B, H, W, C) -> x * sigmoid(A(x)) (B, H, W, C): MedusaGate with one scale, source = x.

    H and W must be multiples of `stride`. `num_heads` are the body's attention heads. Hooks as
    MedusaGate's (hook_gates fires once).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, body_dim: int | None = None, stride: int = 2, residual: bool = False,
                 backend: str | None = None, device=None, dtype=None):
        check_positive_int(NAME, "dim", dim)
        super().__init__(dim, (dim,), num_heads, body_dim=body_dim, stride=stride, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, residual=residual, backend=backend,
                         device=device, dtype=dtype)
        self.dim = dim

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        t = self.body(x)                                                    # (B, H/p, W/p, D)
        return self.gate_scale(t, x, 0)                                      # (B, H, W, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds, N = seq_len = H W pixels, n = N / p^2 tokens: embed 2 N C D,
        qkv 2 n D 3D, scores and weighted sum 4 n^2 D, proj 2 n D^2, head 2 n D C (the resize and
        the gate are not counted). Backward: twice the forward."""
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C, D = batch, seq_len, self.dim, self.body_dim
        n = N // self.stride ** 2
        fwd = 2 * B * N * C * D + 2 * B * n * D * 3 * D + 4 * B * n * n * D + 2 * B * n * D * D + 2 * B * n * D * C
        return fwd, 2 * fwd
