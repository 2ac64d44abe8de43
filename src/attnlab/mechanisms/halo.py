"""HaloNet blocked local self-attention with halos (`halo2d`).

Paper: Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani,
Ramachandran, Srinivas, Parmar, Hechtman, Shlens; CVPR 2021, arXiv 2103.12731).
Implements the paper's local self-attention layer: attention over a neighbourhood N(i, j) with
relative position embeddings, as in SASA (Stand-Alone Self-Attention, which the paper builds on),

    y_ij = Σ_{(a,b) ∈ N(i,j)} softmax_ab(q_ij·k_ab / sqrt(d) + q_ij·r_{a-i,b-j}) v_ab,

computed blockwise ("blocked local self-attention", Fig. 1): the image is cut into
non-overlapping b x b query blocks, and every query of a block shares one neighbourhood N, the
(b + 2 halo)^2 window made of its block and a ring of `halo` pixels around it. Neighbouring
queries therefore see the same keys, which makes the layer a few large matmuls instead of one
gather per pixel.

Status: blocked attention with halos, separable height/width relative logits, multi-head, as
timm's `HaloAttn` with stride 1 (see Deviations). Keys and values are gathered with
`Tensor.unfold` (no Python loop over blocks); the block softmax runs in `attnlab.ops.attention`,
the relative logits entering as a float mask added to the scores. Not supported: the strided /
downsampling variant (the paper's strided self-attention, queries subsampled inside each block;
timm's `stride` / `avg_down`), causal attention, attn_mask, KV cache (an image layer:
check_features refuses them with NotImplementedError).

Layout: x (B, H, W, C) channels-last -> (B, H, W, C). H and W must be multiples of block_size
(a ValueError otherwise; padding the input would change what border pixels attend to, so the
caller decides how to pad). Parameters: `qkv = Linear(C, 3 h d)` whose output reshapes as
(..., 3, h, d) like `mhsa`, `proj = Linear(h d, C)`, and the relative tables `rel_height`,
`rel_width`, each (2 (b + halo) - 1, d), shared by the heads; row t holds the embedding of the
offset t - (b + halo - 1) = key coordinate - query coordinate along that axis, the offsets a
query of a block can meet in its window.

Deviations / readings chosen:
- Relative logits are separable, q·r_{a-i,b-j} = q·r^H_{a-i} + q·r^W_{b-j} with full-width
  r^H and r^W (the Attention-Augmented-Conv / BoTNet form that timm's HaloAttn uses). SASA, which
  the paper follows, concatenates half-width row and column embeddings; that is the special case
  r^H = [r^row, 0], r^W = [0, r^col], so the form used here contains it. The relative logits are
  not multiplied by 1/sqrt(d) (timm's default, `scale_pos_embed=False`).
- Image border: the halo reaches outside the image for border blocks. timm pads the projected
  keys and values with zeros and attends to them: a padded key scores only its relative logit
  and brings a zero value, so border queries give some weight to "nothing". As far as the
  sources at hand show (the paper's description of blocking and haloing, Fig. 1; lucidrains'
  port, which notes that the paper claims masks are not needed and masks the padding anyway),
  the paper does not mask the padded pixels either. Attending to them is the default here
  (`mask_padding=False`). `mask_padding=True` instead removes the padded positions from the
  softmax (a border query normalises over the real pixels of its window only), which makes the
  output independent of the padding convention. Every query keeps at least its own block, so
  no row is ever empty in either mode.
- timm's tables have 2 (b + 2 halo) - 1 rows of which the first 2 halo are never used; here the
  table has exactly the 2 (b + halo) - 1 offsets that occur. timm weights load as
  `rel_height = timm.pos_embed.height_rel[2 * halo:]` (same for width). timm's q conv gives
  the q rows of `qkv.weight` as they are; its kv conv interleaves k and v per head
  ([k_0 | v_0 | k_1 | v_1 ...]) and must be reordered into the [k heads | v heads] rows here.
- timm's HaloAttn has no output projection (the bottleneck's next 1x1 conv plays that role);
  the house layout of attention modules has one (`proj`), as `mhsa`.
- `dim_head` (as timm's) sets the q/k/v head width independently of dim / num_heads.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_dims, check_dropout, check_features, check_image,
                             check_positive, check_positive_int)
from attnlab.ops.sdpa import PRIORITY
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "halo2d"


@register(MechanismSpec(
    name=NAME, paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    year=2021, family="local", layout="2d",
    time="O(N w^2 C), w = block + 2 halo", memory="O(N w^2)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2103.12731",
    provenance="paper",
    source=("Vaswani et al. 2021 (HaloNet) blocked local self-attention with halos (Fig. 1) and the "
            "SASA relative-logit softmax; the separable relative logits, unscaled rel. logits and "
            "zero-padded border keys follow timm timm/layers/halo_attn.py::HaloAttn (stride 1), a "
            "third-party port: no authors' code was released"),
    test_kwargs=dict(block_size=4, halo_size=1, qkv_bias=True)))
class HaloAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C), H and W multiples of `block_size`.

    Each b x b block of queries attends to the (b + 2 halo)^2 window around it, with relative
    position logits; softmax in float32 (float64 for float64 input) inside ops.attention.
    Hooks (attnlab.hooks): blocks are extra heads (h * nb); scores (with the relative logits)
    and probs on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_rel_logits", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, block_size: int = 8, halo_size: int = 3,
                 dim_head: int | None = None, mask_padding: bool = False, proj_bias: bool = True,
                 scale: float | None = None, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if dim_head is None:
            dim_head = check_dims(NAME, dim, num_heads)
        else:
            check_positive_int(NAME, "dim", dim)
            check_positive_int(NAME, "num_heads", num_heads)
            check_positive_int(NAME, "dim_head", dim_head)
        self.block_size = check_positive_int(NAME, "block_size", block_size)
        self.halo_size = check_positive_int(NAME, "halo_size", halo_size, allow_zero=True)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        if not isinstance(mask_padding, bool):
            raise TypeError(f"{NAME}: mask_padding must be a bool, got {type(mask_padding).__name__}")
        if scale is not None:
            check_positive(NAME, "scale", scale)
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{NAME}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim_head
        self.inner_dim = num_heads * dim_head
        self.window = self.block_size + 2 * self.halo_size        # w, the key window side
        self.mask_padding = mask_padding
        self.scale = dim_head ** -0.5 if scale is None else float(scale)
        self.backend = backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * self.inner_dim, bias=qkv_bias, **factory)
        # Offsets key - query along one axis, seen from inside a block: -(b - 1 + halo) .. b - 1 + halo.
        num_offsets = 2 * (self.block_size + self.halo_size) - 1
        self.rel_height = nn.Parameter(torch.empty(num_offsets, dim_head, **factory))
        self.rel_width = nn.Parameter(torch.empty(num_offsets, dim_head, **factory))
        self.proj = nn.Linear(self.inner_dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points for probes; shapes in comments (nb = number of blocks).
        self.hook_q = HookPoint()           # (B, h * nb, b^2, d)
        self.hook_k = HookPoint()           # (B, h * nb, w^2, d)
        self.hook_v = HookPoint()           # (B, h * nb, w^2, d)
        self.hook_rel_logits = HookPoint()  # (B, h * nb, b^2, w^2), added to the scores; -inf = masked pad
        self.hook_scores = HookPoint()      # (B, h * nb, b^2, w^2), the softmax input (eager path only)
        self.hook_probs = HookPoint()       # (B, h * nb, b^2, w^2), the softmax output (eager path only)
        self.hook_out = HookPoint()         # (B, h * nb, b^2, d), per-head outputs of each block before proj
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As timm: normal with std = 1/sqrt(d) (truncated here at 2 std; timm's bound is +-2 absolute).
        std = self.head_dim ** -0.5
        nn.init.trunc_normal_(self.rel_height, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(self.rel_width, std=std, a=-2 * std, b=2 * std)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, dim_head={self.head_dim}, "
                f"block_size={self.block_size}, halo_size={self.halo_size}, mask_padding={self.mask_padding}")

    # --- pieces -------------------------------------------------------------------------------

    def _offset_index(self, device) -> Tensor:
        """(b, w) long: table row of (query coordinate i in block, key coordinate a in window).

        Key a sits at block_start - halo + a, query i at block_start + i, so the offset is
        a - halo - i and its row a - halo - i + (b + halo - 1) = a - i + b - 1.
        """
        i = torch.arange(self.block_size, device=device)[:, None]
        a = torch.arange(self.window, device=device)[None, :]
        return a - i + self.block_size - 1

    def relative_logits(self, q: Tensor) -> Tensor:
        """q (B, h, nb, b, b, d) -> (B, h, nb, b^2, w^2): q·r^H_{a-i} + q·r^W_{b-j}.

        q·r is taken against every table row once (b^2 (2b + 2 halo - 1) d per block), then the
        rows each (query, key) pair needs are gathered, rather than gathering (b, w, d) tables.
        """
        b, w = self.block_size, self.window
        idx = self._offset_index(q.device)                                  # (b, w)
        lead = q.shape[:3]
        by_h = q @ self.rel_height.to(q.dtype).transpose(0, 1)              # (B, h, nb, b_y, b_x, R)
        by_w = q @ self.rel_width.to(q.dtype).transpose(0, 1)               # (B, h, nb, b_y, b_x, R)
        # height: row depends on the query's y (dim -3) and the key's window row a
        idx_h = idx[:, None, :].expand(*lead, b, b, w)                      # (B, h, nb, b_y, b_x, w)
        idx_w = idx[None, :, :].expand(*lead, b, b, w)                      # (B, h, nb, b_y, b_x, w)
        logit_h = torch.gather(by_h, -1, idx_h)                             # (B, h, nb, b_y, b_x, w_y)
        logit_w = torch.gather(by_w, -1, idx_w)                             # (B, h, nb, b_y, b_x, w_x)
        rel = logit_h[..., :, None] + logit_w[..., None, :]                 # (B, h, nb, b_y, b_x, w_y, w_x)
        return rel.reshape(*lead, b * b, w * w)                             # (B, h, nb, b^2, w^2)

    def _padding_valid(self, H: int, W: int, device) -> Tensor:
        """(nb, w^2) bool: which window positions of each block lie inside the image."""
        b, p, w = self.block_size, self.halo_size, self.window
        inside = torch.ones(1, 1, H, W, device=device)
        inside = F.pad(inside, (p, p, p, p))                                # (1, 1, H + 2p, W + 2p)
        inside = inside.unfold(2, w, b).unfold(3, w, b)                     # (1, 1, nH, nW, w, w)
        return inside.reshape(-1, w * w) > 0.5                              # (nb, w^2)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        b, p, w = self.block_size, self.halo_size, self.window
        if H % b or W % b:
            raise ValueError(f"{NAME}: image height and width must be multiples of block_size={b}, "
                             f"got H={H}, W={W} (shape {tuple(x.shape)}); pad or crop the input first")
        h, d = self.num_heads, self.head_dim
        nH, nW = H // b, W // b
        nb = nH * nW

        qkv = self.qkv(x)                                                   # (B, H, W, 3 h d)
        q, k, v = qkv.reshape(B, H, W, 3, h, d).permute(3, 0, 4, 5, 1, 2).unbind(0)  # 3 x (B, h, d, H, W)

        # Query blocks: (B, h, d, nH, b, nW, b) -> (B, h, nH, nW, b_y, b_x, d).
        q = q.reshape(B, h, d, nH, b, nW, b).permute(0, 1, 3, 5, 4, 6, 2)
        q = q.reshape(B, h, nb, b, b, d)                                    # (B, h, nb, b, b, d)

        # Key/value windows: pad the projected maps with zeros (timm), then one (w x w) window
        # every b pixels. (B, h, 2d, H + 2p, W + 2p) -> (B, h, 2d, nH, nW, w, w).
        kv = torch.cat([k, v], dim=2)                                       # (B, h, 2d, H, W)
        kv = F.pad(kv, (p, p, p, p))                                        # (B, h, 2d, H + 2p, W + 2p)
        kv = kv.unfold(3, w, b).unfold(4, w, b)                             # (B, h, 2d, nH, nW, w, w)
        kv = kv.permute(0, 1, 3, 4, 5, 6, 2).reshape(B, h, nb, w * w, 2 * d)  # (B, h, nb, w^2, 2d)
        k, v = kv.split(d, dim=-1)                                          # 2 x (B, h, nb, w^2, d)

        bias = self.relative_logits(q)                                      # (B, h, nb, b^2, w^2)
        if self.mask_padding and p > 0:
            valid = self._padding_valid(H, W, x.device)                     # (nb, w^2)
            bias = bias.masked_fill(~valid[:, None, :], float("-inf"))

        # Blocks become extra "heads" for ops.attention: (B, h, nb, ...) -> (B, h * nb, ...).
        q = self.hook_q(q.reshape(B, h * nb, b * b, d))                     # (B, h nb, b^2, d)
        k = self.hook_k(k.reshape(B, h * nb, w * w, d))                     # (B, h nb, w^2, d)
        v = self.hook_v(v.reshape(B, h * nb, w * w, d))                     # (B, h nb, w^2, d)
        bias = self.hook_rel_logits(bias.reshape(B, h * nb, b * b, w * w))  # (B, h nb, b^2, w^2)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=bias, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                            # (B, h nb, b^2, d)

        # Fold the blocks back: (B, h, nH, nW, b_y, b_x, d) -> (B, nH, b_y, nW, b_x, h, d).
        out = out.reshape(B, h, nH, nW, b, b, d).permute(0, 2, 4, 3, 5, 1, 6)
        out = out.reshape(B, H, W, h * d)                                   # (B, H, W, h d)
        return self.proj_drop(self.proj(out))                               # (B, H, W, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds that matter, for N = seq_len = H * W pixels.

        Forward: qkv 2 N C (3 h d), proj 2 N (h d) C, scores and weighted sum 4 (h d) per
        (query, key) pair with w^2 keys per query (padded keys included: they are computed),
        relative logits 2 * 2 N h d R against both tables (R = 2 (b + halo) - 1).
        Backward: twice the forward. The module's own dim and heads are used (the arguments are
        the bench's and must agree).
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C, inner = batch, seq_len, self.dim, self.inner_dim
        R = 2 * (self.block_size + self.halo_size) - 1
        fwd = (2 * B * N * C * 3 * inner + 2 * B * N * inner * C + 4 * B * N * self.window ** 2 * inner
               + 4 * B * N * inner * R)
        return fwd, 2 * fwd
