"""ConvShareViT attention: MHSA whose projections are shared-kernel depthwise convolutions (`convshare`).

Paper: ConvShareViT: Enhancing Vision Transformers with Convolutional Attention Mechanisms for
Free-Space Optical Accelerators (Riad Ibadulla, Thomas M. Chen, Constantino Carlos
Reyes-Aldasoro; arXiv 2504.11517, 2025; journal version IEEE TNNLS 2026, "ConvShareViT: A Vision
Transformer-Like Architecture for Free-Space Optical Accelerators").

Status: a RECONSTRUCTION from the abstract. No code was released and the paper's body was not at
hand; the abstract says that ConvShareViT "replaces linear layers in multi-head self-attention
(MHSA) and multilayer perceptrons (MLPs) with a depthwise convolutional layer with shared weights
across input channels", that "valid-padded shared convolutions" learn attention (attention scores
comparable to a ViT's) while "same-padded" ones "operate like regular CNNs". Everything below that
goes beyond those sentences is attnlab's reading, listed under Deviations / guesses.

What is computed. The token grid is the image: x (B, H, W, C), each channel c a 2-D map x_c of
H x W tokens. One k x k kernel per projection, shared by all C channels (a depthwise convolution
whose C kernels are tied), maps each channel's map to that channel's q, k or v map:

    q_c = w_q ⋆ x_c + b_q[c],   k_c = w_k ⋆ x_c + b_k[c],   v_c = w_v ⋆ x_c + b_v[c]

(⋆ = cross-correlation, as torch's conv2d; b optional, one per channel). Heads split the channels
as in MHSA (head i holds channels i d .. (i + 1) d - 1, d = C / h); every position of the q/k/v
maps is a token, and

    out_i = softmax(q_i k_i^T / sqrt(d)) v_i          over the N' tokens of the maps,

through `attnlab.ops.attention` (hooks as halo2d / mhsa). The output projection is the fourth
linear layer of MHSA, replaced the same way by one shared kernel w_o (bias b_o per channel).

- `padding="same"`: the convolutions zero-pad (torch's padding="same"; an even k pads one more
  pixel after than before), so q, k, v and the output keep the H x W grid: N' = N = H W.
- `padding="valid"`: no padding. q, k and v are (H - k + 1) x (W - k + 1) maps, so attention runs
  over N' = (H - k + 1)(W - k + 1) tokens, each the kernel's response to one k x k window lying
  wholly inside the image. The output projection is then the transpose (adjoint) of a valid
  convolution, `conv_transpose2d` with w_o, which takes the (H - k + 1) x (W - k + 1) map back to
  H x W: out[i, j] = Σ_{a, b} y[i - a, j - b] w_o[a, b] over the positions that exist. Needs
  H >= k and W >= k (a ValueError otherwise).

Layout: x (B, H, W, C) channels-last -> (B, H, W, C); the convolutions run on (B C, 1, H, W).
num_heads splits the C channels into heads of d = C / num_heads (C must be divisible).
Parameters: `qkv_weight` (3, 1, k, k) (rows q, k, v; one kernel each), `qkv_bias` (3 C) laid out
[q | k | v] (with qkv_bias=True), `proj_weight` (1, 1, k, k), `proj_bias` (C) (proj_bias=True).
Not supported: causal attention, attn_mask, KV cache (an image layer; check_features refuses
them with NotImplementedError).

Deviations / guesses (no source beyond the abstract):
- One kernel per projection, shared by every channel: no channel mixing anywhere in the
  attention. A model of the paper may use several shared kernels (a depth multiplier); with one,
  a 1 x 1 kernel makes every projection a scalar times the identity (tested: `padding="same"`,
  k = 1 equals `mhsa` with qkv and proj weights a I).
- Per-channel biases (a linear layer's bias) are assumed; the abstract does not mention biases.
- Valid padding: q, k and v all shrink (the queries too), and the output returns to H x W through
  the transposed convolution of the output kernel. An alternative reading (full-resolution
  queries attending to the shrunken keys) was not taken: with a shared k x k kernel a
  full-resolution query map needs padding, which is the "same" regime.
- Heads split channels as in MHSA; the scale is 1/sqrt(d).
- The MLP's linear layers (also shared convolutions in the paper), the class token, the patch
  embedding and the 4f optical tiling are network-level and are not part of this module.
- No checkpoint exists to load; the parameter names are attnlab's (no key map).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_dims, check_dropout, check_features, check_image,
                             check_positive)
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import PRIORITY, attention
from attnlab.registry import MechanismSpec, register

NAME = "convshare"
PADDINGS = ("valid", "same")


@register(MechanismSpec(
    name=NAME,
    paper="ConvShareViT: Enhancing Vision Transformers with Convolutional Attention Mechanisms for "
          "Free-Space Optical Accelerators",
    year=2025, family="softmax", layout="2d",
    time="O(N'^2 C + N k^2 C), N' = (H - k + 1)(W - k + 1) (valid) or H W (same)",
    memory="O(N'^2) eager, O(N') with SDPA",
    exact=False, causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2504.11517",
    provenance="reconstruction",
    source=("Ibadulla, Chen, Reyes-Aldasoro 2025 (arXiv 2504.11517), abstract only: MHSA's linear layers "
            "replaced by a depthwise convolution with weights shared across input channels, valid vs same "
            "padding. Guessed: one k x k kernel per projection (q, k, v, out) shared by all channels, "
            "per-channel biases, heads splitting channels as MHSA, valid padding shrinking q, k and v and "
            "the output projection a transposed convolution back to H x W"),
    test_kwargs=dict(kernel_size=3, padding="valid", qkv_bias=True),
    test_configs=(dict(kernel_size=3, padding="same", qkv_bias=True), dict(kernel_size=2, padding="same"))))
class ConvShareAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): MHSA over the token grid with shared-kernel conv projections.

    Softmax in float32 (float64 for float64 input) inside ops.attention. Hooks (attnlab.hooks):
    q, k, v, out on every path; scores and probs on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size: int = 3, padding: str = "valid", proj_bias: bool = True,
                 scale: float | None = None, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"{NAME}: kernel_size must be a positive int, got {kernel_size!r}")
        if not isinstance(padding, str) or padding not in PADDINGS:
            raise ValueError(f"{NAME}: padding must be one of {PADDINGS}, got {padding!r}")
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        for arg, value in (("qkv_bias", qkv_bias), ("proj_bias", proj_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{NAME}: {arg} must be a bool, got {type(value).__name__}")
        if scale is not None:
            check_positive(NAME, "scale", scale)
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{NAME}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.kernel_size, self.padding = kernel_size, padding
        self.scale = self.head_dim ** -0.5 if scale is None else float(scale)
        self.backend = backend
        self.attn_drop = attn_drop
        k = kernel_size
        # One kernel per projection, shared by all channels: rows q, k, v.
        self.qkv_weight = nn.Parameter(torch.empty(3, 1, k, k, **factory))
        self.qkv_bias = nn.Parameter(torch.empty(3 * dim, **factory)) if qkv_bias else None
        self.proj_weight = nn.Parameter(torch.empty(1, 1, k, k, **factory))
        self.proj_bias = nn.Parameter(torch.empty(dim, **factory)) if proj_bias else None
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points for probes; N' = tokens of the q/k/v maps (see the module docstring).
        self.hook_q = HookPoint()       # (B, h, N', d)
        self.hook_k = HookPoint()       # (B, h, N', d)
        self.hook_v = HookPoint()       # (B, h, N', d)
        self.hook_scores = HookPoint()  # (B, h, N', N'), the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N', N'), the softmax output (eager path only)
        self.hook_out = HookPoint()     # (B, h, N', d), per-head outputs before the output convolution
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Variance-preserving: a shared kernel sums k^2 taps of one channel's map, so weights of
        # std 1/k keep the map's scale (uniform on +-sqrt(3)/k); biases uniform on +-1/k.
        bound = 1.0 / self.kernel_size
        nn.init.uniform_(self.qkv_weight, -bound * 3 ** 0.5, bound * 3 ** 0.5)
        nn.init.uniform_(self.proj_weight, -bound * 3 ** 0.5, bound * 3 ** 0.5)
        for b in (self.qkv_bias, self.proj_bias):
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"padding={self.padding!r}")

    def token_grid(self, H: int, W: int) -> tuple[int, int]:
        """The (H', W') grid of the q/k/v maps for an H x W input."""
        if self.padding == "same":
            return H, W
        return H - self.kernel_size + 1, W - self.kernel_size + 1

    def _pad(self, maps: Tensor) -> Tensor:
        """'same' zero padding of (B C, 1, H, W) maps: (k - 1) // 2 before, k // 2 after (as torch's
        padding="same"), written out so that even kernels need no internal copy and warn nothing."""
        if self.padding != "same":
            return maps
        before, after = (self.kernel_size - 1) // 2, self.kernel_size // 2
        return F.pad(maps, (before, after, before, after))                       # (B C, 1, H + k - 1, W + k - 1)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        k, h, d = self.kernel_size, self.num_heads, self.head_dim
        if self.padding == "valid" and (H < k or W < k):
            raise ValueError(f"{NAME}: padding='valid' needs H and W >= kernel_size={k}, got H={H}, W={W} "
                             f"(shape {tuple(x.shape)})")
        Hq, Wq = self.token_grid(H, W)

        # Every channel is its own one-channel image: (B, H, W, C) -> (B, C, H, W) -> (B C, 1, H, W).
        maps = x.permute(0, 3, 1, 2).reshape(B * C, 1, H, W)
        qkv = F.conv2d(self._pad(maps), self.qkv_weight.to(x.dtype))              # (B C, 3, H', W')
        qkv = qkv.reshape(B, C, 3, Hq * Wq).transpose(1, 2)                      # (B, 3, C, N')
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias.to(x.dtype).reshape(1, 3, C, 1)
        # Heads split channels: (B, 3, h, d, N') -> (3, B, h, N', d).
        q, kk, v = qkv.reshape(B, 3, h, d, Hq * Wq).permute(1, 0, 2, 4, 3).unbind(0)
        q, kk, v = self.hook_q(q), self.hook_k(kk), self.hook_v(v)               # (B, h, N', d) each
        out = attention(q, kk, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                                  # (B, h, N', d)

        # Back to one-channel maps: (B, h, N', d) -> (B, h, d, N') -> (B C, 1, H', W').
        out = out.transpose(2, 3).reshape(B * C, 1, Hq, Wq)
        w_o = self.proj_weight.to(x.dtype)
        if self.padding == "same":
            out = F.conv2d(self._pad(out), w_o)                                   # (B C, 1, H, W)
        else:
            out = F.conv_transpose2d(out, w_o)                                    # (B C, 1, H, W)
        out = out.reshape(B, C, H, W).permute(0, 2, 3, 1)                         # (B, H, W, C)
        if self.proj_bias is not None:
            out = out + self.proj_bias.to(x.dtype)
        return self.proj_drop(out)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds that matter, for N = seq_len = H * W pixels of a square image.

        Forward: three shared-kernel convolutions 2 C N' k^2 each, scores and weighted sum
        4 C N'^2, the output convolution 2 C N' k^2 (valid: the transposed convolution reads the
        N' map; same: N' = N). Backward: twice the forward.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        side = int(round(seq_len ** 0.5))
        if side * side != seq_len:
            raise ValueError(f"{NAME}: useful_flops needs seq_len = H * W of a square image, got {seq_len}")
        Hq, Wq = self.token_grid(side, side)
        Nq = max(Hq, 0) * max(Wq, 0)
        B, C, kk = batch, self.dim, self.kernel_size ** 2
        fwd = 3 * 2 * B * C * Nq * kk + 4 * B * C * Nq * Nq + 2 * B * C * Nq * kk
        return fwd, 2 * fwd
