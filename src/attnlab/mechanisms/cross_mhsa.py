"""Multi-head cross-attention: queries from x, keys and values from a context (encoder-decoder attention).

Paper: Attention Is All You Need (Vaswani et al., NeurIPS 2017, arXiv:1706.03762), Sec. 3.2.3
("encoder-decoder attention": queries from the previous decoder layer, keys and values from the
encoder's output) with the multi-head form of Sec. 3.2.2 and Eq. (1).
Status: exact softmax attention through `attnlab.ops.attention` (SDPA by default; FlexAttention
and the eager reference too). Grouped key/value heads (`num_kv_heads`, as GQA, Ainslie et al. 2023).
Layout: "cross". `forward(x (B, N, C), context (B, M, C_ctx), *, attn_mask=None, is_causal=False,
cache=None) -> (B, N, C)`.
- `attn_mask`: a (B, M) key-padding mask over the context, True = the context token is present;
  or any bool / float mask broadcastable to (B, h, N, M) (float: added to the scores), the
  conventions of `attnlab.masks`. A query with no allowed context token gets a zero attention
  output (the module then returns `proj.bias` for that row), never NaN.
- `is_causal=True` is refused (NotImplementedError): the context has no order relative to the
  queries. Decoder self-attention is `mhsa`.
- `cache`: an `attnlab.ContextCache`. The context's k, v are projected on the first call and
  reused while the context stays the same (decoding steps with new x); a context of another
  shape, dtype or device raises ValueError until `cache.reset()`. A `KVCache` is refused
  (TypeError): there is nothing to append to.

Parameters (timm's naming, as `timm/layers/attention_pool.py::AttentionPoolLatent`, whose
latent queries attend to the tokens): `q = Linear(C, h d)`, `kv = Linear(C_ctx, 2 h_kv d)` whose
output reshapes as (B, M, 2, h_kv, d), i.e. the rows of `kv.weight` are [k heads | v heads],
and `proj = Linear(h d, C)`; h d = C. `context_dim=None` means C_ctx = C. `qkv_bias` gives q and kv
biases, `proj_bias` the output projection's.

Checkpoint key map (C = dim, C_ctx = context_dim, h_kv = h):
- torch.nn.MultiheadAttention(C, h, kdim=C_ctx, vdim=C_ctx, bias=True, batch_first=True), with
  C_ctx != C (separate projection weights):
    q.weight = q_proj_weight; kv.weight = cat([k_proj_weight, v_proj_weight], 0);
    q.bias = in_proj_bias[:C]; kv.bias = in_proj_bias[C:]; proj.weight/bias = out_proj.weight/bias.
  With C_ctx == C torch keeps one in_proj_weight (3C, C): q.weight = in_proj_weight[:C],
  kv.weight = in_proj_weight[C:] (biases as above). bias=False maps to qkv_bias=False,
  proj_bias=False. add_bias_kv and add_zero_attn have no counterpart here.
  torch's key_padding_mask is True = ignore: pass attn_mask=~key_padding_mask.
- HuggingFace BERT-style cross-attention (BertLayer with add_cross_attention, prefix
  `...crossattention.`): q.weight/bias = self.query.weight/bias;
  kv.weight = cat([self.key.weight, self.value.weight], 0) (biases likewise);
  proj.weight/bias = output.dense.weight/bias. BERT's `output.LayerNorm` and residual belong to
  the block around the attention and are not part of this module. BERT's encoder_attention_mask
  (1 = attend, as an additive mask after HF's extension) is the (B, M) key-padding mask here.
- timm's AttentionPoolLatent (C_ctx = C): its q.*, kv.* and proj.* keys load as they are (its
  latent, q/k norms and MLP are not part of this module).

Deviations: none in the formula. No relative position bias and no q/k normalisation; keys and
values share one context tensor (torch's MultiheadAttention can take different key and value
tensors: pass key = value = context). Attention dropout `attn_drop` is applied to the
probabilities in training mode, as SDPA's dropout_p.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from attnlab._checks import (check_context, check_dims, check_dropout, check_features, check_positive,
                             check_positive_int)
from attnlab.cache import ContextCache
from attnlab.hooks import HookPoint
from attnlab.masks import check_attn_mask
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "cross_mhsa"


@register(MechanismSpec(
    name=NAME, paper="Attention Is All You Need", year=2017, family="softmax", layout="cross",
    time="O(N M d)", memory="O(N + M) with fused SDPA, O(N M) eager", exact=True,
    causal=False, attn_mask=True, kv_cache=True, cross=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/1706.03762",
    provenance="paper",
    source=("Vaswani et al. 2017 Sec. 3.2.3 (encoder-decoder attention: queries from the decoder, "
            "keys and values from the encoder output), Sec. 3.2.2 (multi-head) and Eq. (1); "
            "parametrised as timm (q = Linear(C, C), kv = Linear(C_ctx, 2C) reshaped (B, M, 2, h, d), "
            "proj), as in timm/layers/attention_pool.py::AttentionPoolLatent; grouped key/value heads "
            "as GQA (Ainslie et al. 2023)"),
    test_kwargs=dict(qkv_bias=True),
    test_configs=(dict(num_kv_heads=2, qkv_bias=False, proj_bias=False),)))
class CrossAttention(nn.Module):
    """x (B, N, C), context (B, M, C_ctx) -> (B, N, C). Softmax in float32 (float64 for float64 input).

    Hooks (attnlab.hooks): hook_scores and hook_probs on the eager path (`backend="reference"`);
    hook_k and hook_v carry the context's keys and values, cached or not.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, context_dim: int | None = None, num_kv_heads: int | None = None,
                 proj_bias: bool = True, scale: float | None = None, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        context_dim = dim if context_dim is None else check_positive_int(NAME, "context_dim", context_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"{NAME}: num_kv_heads must be a positive divisor of num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.context_dim = dim, context_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.scale = None if scale is None else check_positive(NAME, "scale", scale)
        self.backend = backend
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.kv = nn.Linear(context_dim, 2 * num_kv_heads * self.head_dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()       # (B, h, N, d)
        self.hook_k = HookPoint()       # (B, h_kv, M, d), the context's keys (from the cache if given)
        self.hook_v = HookPoint()       # (B, h_kv, M, d), the context's values
        self.hook_scores = HookPoint()  # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()     # (B, h, N, d), per-head outputs before proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, context_dim={self.context_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}")

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context (B, M, C_ctx) -> k, v (B, h_kv, M, d): what a ContextCache keeps."""
        B, M, _ = context.shape
        kv = self.kv(context).reshape(B, M, 2, self.num_kv_heads, self.head_dim)   # (B, M, 2, h_kv, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                 # 2 x (B, h_kv, M, d)
        return k, v

    def forward(self, x: Tensor, context: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: ContextCache | None = None) -> Tensor:
        check_context(NAME, x, context, self.dim, self.context_dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        if cache is not None and not isinstance(cache, ContextCache):
            raise TypeError(f"{NAME}: cache must be an attnlab.ContextCache (the context's keys and values, "
                            f"computed once), got {type(cache).__name__}")
        B, N, C = x.shape
        M = context.shape[1]
        h, d = self.num_heads, self.head_dim
        if attn_mask is not None:
            try:
                check_attn_mask(attn_mask, B, h, N, M)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{NAME}: {err} (x {tuple(x.shape)}, context {tuple(context.shape)})") from None
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)                          # (B, h, N, d)
        if cache is None:
            k, v = self.project_context(context)                                   # 2 x (B, h_kv, M, d)
        else:
            k, v = cache.fetch(context, self.project_context, owner=self)          # 2 x (B, h_kv, M, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend,
                        scores_hook=self.hook_scores, probs_hook=self.hook_probs)   # (B, h, N, d)
        out = self.hook_out(out)
        out = out.transpose(1, 2).reshape(B, N, C)                                 # (B, N, C)
        return self.proj_drop(self.proj(out))

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool, *,
                     context_len: int | None = None) -> tuple[int, int]:
        """2 x the multiply-adds, for N = seq_len queries and M = context_len (default seq_len:
        the bench uses its tokens as the context too) context tokens.

        Forward: q 2 N C C, kv 2 M C_ctx (2 h_kv d), proj 2 N C C, scores and weighted sum
        4 h d per (query, key) pair. Backward: twice the forward.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C = batch, seq_len, self.dim
        M = seq_len if context_len is None else context_len
        fwd = (4 * B * N * C * C + 2 * B * M * self.context_dim * 2 * self.num_kv_heads * self.head_dim
               + 4 * B * N * M * C)
        return fwd, 2 * fwd
