"""Multi-head self-attention (MHSA), with optional grouped-query attention and QK-norm.

Paper: Attention Is All You Need (2017); grouped-query attention from GQA (2023); QK-norm as
in timm's `Attention` (LayerNorm over the head dim of q and k).
Status: exact softmax attention through `attnlab.ops.attention` (SDPA by default).
`softmax="edgemoe"` instead runs attention eagerly with the Edge-MoE single-pass softmax
(`attnlab.ops.numerics`; Edge-MoE, ICCAD 2023), an approximation: such an instance is not exact.
Parameters follow timm: `qkv = Linear(dim, 3 * dim)` whose output reshapes as (B, N, 3, h, d)
and `proj = Linear(dim, dim)`. With `num_kv_heads < num_heads` the fused projection is
`Linear(dim, (h + 2 * h_kv) * d)`, laid out as [q heads | k heads | v heads].
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_tokens
from attnlab.ops.numerics import SOFTMAXES, softmax_attention
from attnlab.ops.heads import split_qkv
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register


@register(MechanismSpec(
    name="mhsa", paper="Attention Is All You Need", year=2017, family="softmax", layout="seq",
    time="O(N^2 d)", memory="O(N) with fused SDPA, O(N^2) eager", exact=True,
    causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/1706.03762",
    provenance="paper",
    source=("Vaswani et al. 2017 Sec. 3.2.1 Eq. (1) (scaled dot-product) and Sec. 3.2.2 (multi-head); "
            "parametrisation as timm timm/layers/attention.py::Attention (fused qkv reshaped "
            "(B, N, 3, h, d), proj, q_norm/k_norm LayerNorm over the head dim); grouped-query heads "
            "as GQA (Ainslie et al. 2023); softmax='edgemoe' is Edge-MoE's single-pass softmax "
            "(attnlab.ops.numerics)"),
    test_kwargs=dict(qkv_bias=True),
    test_configs=(dict(num_kv_heads=2, qk_norm=True), dict(softmax="edgemoe"))))
class MultiHeadAttention(nn.Module):
    """x (B, N, C) -> (B, N, C). Softmax runs in float32 (or float64 for float64 input).

    Hooks (attnlab.hooks): scores and probs on the eager path, `backend="reference"` (the
    `softmax="edgemoe"` path is always eager).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, num_kv_heads: int | None = None,
                 proj_bias: bool = True, scale: float | None = None, norm_layer: type[nn.Module] = nn.LayerNorm,
                 backend: str | None = None, softmax: str = "exact", device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims("mhsa", dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"mhsa: num_kv_heads must be a positive divisor of num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        check_dropout("mhsa", attn_drop=attn_drop, proj_drop=proj_drop)
        if not isinstance(softmax, str) or softmax not in SOFTMAXES:
            raise ValueError(f"mhsa: softmax must be one of {sorted(SOFTMAXES)}, got {softmax!r}")
        if softmax != "exact" and backend is not None:
            raise ValueError(f"mhsa: softmax={softmax!r} runs eagerly and takes no attention backend, "
                             f"got backend={backend!r} (use backend=None)")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.scale = scale
        self.backend = backend
        self.softmax = softmax
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points for probes (see attnlab.probes): shapes in comments.
        self.hook_q = HookPoint()    # (B, h, N, d)
        self.hook_k = HookPoint()    # (B, h_kv, M, d), after the cache
        self.hook_v = HookPoint()    # (B, h_kv, M, d), after the cache
        self.hook_scores = HookPoint()  # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()  # (B, h, N, d), per-head outputs before proj

    def extra_repr(self) -> str:
        extra = "" if self.softmax == "exact" else f", softmax={self.softmax!r}"
        return f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}{extra}"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("mhsa", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = split_qkv(self.qkv(x), h, h_kv, d)                     # (B, h, N, d), 2 x (B, h_kv, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.update(k, v)                                    # (B, h_kv, M, d), M = past + N
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.softmax == "exact":
            out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                            attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                            dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        else:  # an approximate softmax: eager scores -> SOFTMAXES[softmax] -> @ v, same mask rules
            out = softmax_attention(q, k, v, softmax=self.softmax, attn_mask=attn_mask, is_causal=is_causal,
                                    scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0,
                                    scores_hook=self.hook_scores, probs_hook=self.hook_probs)
        out = self.hook_out(out)                                         # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                       # (B, N, C)
        return self.proj_drop(self.proj(out))
