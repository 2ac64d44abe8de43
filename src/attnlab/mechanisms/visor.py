"""VISOR's text-stream attention: text queries attend the visual tokens' keys/values and their own, in one softmax.

Paper: VISion On Request: Enhanced VLLM efficiency with sparse, dynamically selected,
vision-language interactions (Bulat, Baldrati, Maniadis Metaxas, Ouali, Tzimiropoulos; Samsung AI
Cambridge; CVPR 2026, arXiv:2603.23495). No code is released; the model is built on LLaVA-OneVision.
Status: a reconstruction. What could be read (the abstract and third-party summaries of the paper,
not its method section): the language model keeps every high-resolution visual token; text tokens
pass through every layer; "general visual context is provided by efficient cross-attention between
text-image" at a small, strategically placed set of layers, where the text tokens read the visual
tokens without updating them; at a few "well-placed and dynamically selected self-attention
layers" the visual tokens themselves are refined; one universal network is trained over budgets
(numbers of self-attention layers) and a lightweight policy picks the budget per sample. The
visual work of every other layer is skipped.

What this module computes, and the reading chosen. A layer of the base LVLM is one softmax
attention over the joint sequence [V; T] (visual tokens first, as LLaVA places the image before the
question). VISOR keeps that layer and changes which rows run: at a cross layer only the text rows
do (the visual tokens are keys and values, never queries), at a refinement layer every row does,
elsewhere the visual columns are dropped too. Since the policy can make any layer a refinement
layer, one set of projection weights serves all three modes, so here:

    cross layer (forward):          out_T = softmax(q_T [k_V; k_T]^T / sqrt(d) + mask) [v_V; v_T]
    refinement layer (joint):       [out_V; out_T] = softmax(q_[V;T] [k_V; k_T]^T / sqrt(d) + mask) [v_V; v_T]
    text-only layer (text_self_attention): out_T = softmax(q_T k_T^T / sqrt(d) + mask) v_T

with q = q_proj(.), k = k_proj(.), v = v_proj(.) applied to text and visual tokens alike, then
o_proj. The text rows of `joint` equal `forward` on the same inputs: a cross layer is the full
layer with its visual rows skipped. The composition is "one joint attention of text queries over
[V; T] keys", not a decoder layer with separate self- and cross-attention sub-blocks (Flamingo,
Llama 3.2-Vision): the paper keeps the LVLM's layers, and a separate cross-attention block would
need new weights that a layer switched into refinement mode would not use. The residuals, norms
and MLPs are the block's (`attnlab.models.visor`).

Layout: "cross". `forward(x (B, N, C) text, context (B, M, C) visual, *, attn_mask=None,
is_causal=False, cache=None) -> (B, N, C)`.
- `attn_mask`: a (B, M) key-padding mask over the visual tokens, True = present; or any bool /
  float mask broadcastable to (B, h, N, M) over (text query, visual key) pairs. The text keys are
  always allowed (subject to `is_causal`). A text token with no visual token present attends to the
  text only: a fully masked context equals an empty one (`context[:, :0]`), never NaN. That is
  why the class sets `attends_own_tokens = True`: its queries are never without a key, and the
  cross contract checks "fully masked = no context" for it instead of a zero row.
- `is_causal=True`: the text is causal among itself and sees every visual token (the visual tokens
  precede the text): text query i sees all M visual keys and text keys 0..i. This is the bottom-right
  aligned causal mask of `attnlab.masks` on N queries over M + N keys.
- `cache`: an `attnlab.ContextCache` holding the visual k, v (B, h_kv, M, d), projected on the first
  call and reused while the visual tokens stay the same (decoding steps with new text tokens). The
  text's own keys are those of the call: incremental causal decoding of the text would also need
  the past text keys, which this cache does not hold (a `KVCache` is refused, TypeError).

Parameters (HuggingFace Qwen2 names, LLaVA-OneVision's language model): `q_proj = Linear(C, h d)`,
`k_proj = v_proj = Linear(C, h_kv d)`, `o_proj = Linear(h d, C)`, h d = C; `num_kv_heads` gives
grouped-query attention as Qwen2's `num_key_value_heads`. `qkv_bias` gives q/k/v biases and
`proj_bias` the o_proj bias (Qwen2: `qkv_bias=True, proj_bias=False`). `num_heads` is the number of
query heads. The visual tokens must have width C (in LLaVA they leave the multimodal projector at
the language model's width): one projection serves both streams, so there is no `context_dim`.

Checkpoint key map: a LLaVA-OneVision (HF `LlavaOnevisionForConditionalGeneration`) layer's
`language_model.model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.{weight,bias}` load as
they are into `{q_proj,k_proj,v_proj,o_proj}` (strip the prefix), with `qkv_bias=True,
proj_bias=False, num_kv_heads=config.num_key_value_heads`. Linear weights are (out, in) as torch
stores them; there are no conv weights or norm buffers in this module (the layer's
`input_layernorm` / `post_attention_layernorm` RMSNorms and MLP are the block's). VISOR's own
trained weights are not released.

Deviations (each a guess where the paper's method section could not be read):
- No rotary position embedding: Qwen2 rotates q and k by position inside the attention; here
  positions come from the model's learned embeddings (`attnlab.models.visor`). A RoPE checkpoint
  therefore does not compute the same function after loading.
- The cross-attention reuses the layer's projections and normalises text and visual keys in one
  softmax (see above); the paper may instead insert dedicated cross-attention weights or gates.
- The per-sample policy that picks the refinement layers is not part of this module (the model
  takes fixed `refine_layers`, overridable per call).
- `attn_drop` (attention dropout in training) and `proj_drop` are attnlab options; LLaVA-OV uses 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import (check_context, check_dims, check_dropout, check_features, check_positive,
                             check_tokens)
from attnlab.cache import ContextCache
from attnlab.hooks import HookPoint
from attnlab.masks import check_attn_mask
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "visor"


@register(MechanismSpec(
    name=NAME, paper="VISion On Request: Enhanced VLLM efficiency with sparse, dynamically selected, "
                     "vision-language interactions",
    year=2026, family="softmax", layout="cross",
    time="O(N (M + N) d)", memory="O(N + M) with fused SDPA, O(N (M + N)) eager", exact=True,
    causal=True, attn_mask=True, kv_cache=True, cross=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2603.23495",
    provenance="reconstruction",
    source=("no code released; from the abstract and third-party summaries of Bulat et al. 2026 (text tokens "
            "through every layer, cross-attention to the visual tokens at a few fixed layers, visual tokens "
            "refined by self-attention at a few selected layers, the rest of the visual work skipped). "
            "Guessed: the cross layer is the LVLM layer with its visual query rows skipped (text queries over "
            "[V; T] keys in one softmax, the layer's own q/k/v/o projections, HF Qwen2 names as LLaVA-OneVision); "
            "no RoPE"),
    test_kwargs=dict(qkv_bias=True),
    test_configs=(dict(num_kv_heads=2, qkv_bias=False, proj_bias=False),)))
class VisorAttention(nn.Module):
    """x (B, N, C) text, context (B, M, C) visual -> (B, N, C). Softmax in float32 (float64 for float64 input).

    `forward` is the cross layer, `joint` the refinement layer (full self-attention over [V; T]),
    `text_self_attention` the text-only layer. Hooks (attnlab.hooks): hook_scores and hook_probs
    on the eager path (`backend="reference"`); hook_k and hook_v carry the joint keys and values
    [visual; text] (the visual part from the cache when one is given). In `joint` the same hook
    points carry every query row: q (B, h, M + N, d), scores (B, h, M + N, M + N).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")
    # The queries also attend their own tokens (one softmax over [context; x]): no query row is ever
    # empty, and a fully masked context is the same as no context (tests/mechanisms/contracts/test_cross.py).
    attends_own_tokens = True

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_kv_heads: int | None = None, proj_bias: bool = True,
                 scale: float | None = None, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"{NAME}: num_kv_heads must be a positive divisor of num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.scale = None if scale is None else check_positive(NAME, "scale", scale)
        self.backend = backend
        self.attn_drop = attn_drop
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(dim, kv_width, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(dim, kv_width, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()       # (B, h, N, d) text queries ((B, h, M + N, d) in joint)
        self.hook_k = HookPoint()       # (B, h_kv, M + N, d), keys [visual; text]
        self.hook_v = HookPoint()       # (B, h_kv, M + N, d), values [visual; text]
        self.hook_scores = HookPoint()  # (B, h, N, M + N), the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N, M + N), the softmax output (eager path only)
        self.hook_out = HookPoint()     # (B, h, N, d), per-head outputs before o_proj

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"

    # -- projections -----------------------------------------------------------------------
    def _heads(self, t: Tensor, heads: int) -> Tensor:
        B, L, _ = t.shape
        return t.reshape(B, L, heads, self.head_dim).transpose(1, 2)             # (B, heads, L, d)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Visual tokens (B, M, C) -> k, v (B, h_kv, M, d): what a ContextCache keeps."""
        return self._heads(self.k_proj(context), self.num_kv_heads), self._heads(self.v_proj(context),
                                                                                 self.num_kv_heads)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """Hooks, attention and o_proj: q (B, h, L, d), k, v (B, h_kv, S, d) -> (B, L, C)."""
        B, _, L, _ = q.shape
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend,
                        scores_hook=self.hook_scores, probs_hook=self.hook_probs)   # (B, h, L, d)
        out = self.hook_out(out)
        out = out.transpose(1, 2).reshape(B, L, self.dim)                        # (B, L, C)
        return self.proj_drop(self.o_proj(out))

    # -- the three modes of a layer ----------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: ContextCache | None = None) -> Tensor:
        """The cross layer: text queries over [visual; text] keys. x (B, N, C), context (B, M, C) -> (B, N, C)."""
        check_context(NAME, x, context, self.dim, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        if cache is not None and not isinstance(cache, ContextCache):
            raise TypeError(f"{NAME}: cache must be an attnlab.ContextCache (the visual tokens' keys and values, "
                            f"computed once), got {type(cache).__name__}")
        B, N, _ = x.shape
        M = context.shape[1]
        h, h_kv = self.num_heads, self.num_kv_heads
        mask = None
        if attn_mask is not None:
            try:
                visual = check_attn_mask(attn_mask, B, h, N, M)                  # (B|1, h|1, N|1, M)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{NAME}: {err} (x {tuple(x.shape)}, context {tuple(context.shape)}; the mask "
                                f"covers the M = {M} visual tokens)") from None
            visual = visual.to(x.device)
            text = visual.new_ones(visual.shape[:-1] + (N,)) if visual.dtype == torch.bool \
                else visual.new_zeros(visual.shape[:-1] + (N,))                  # the text keys: always allowed
            mask = torch.cat([visual, text], dim=-1)                             # (B|1, h|1, N|1, M + N)
        q = self._heads(self.q_proj(x), h)                                       # (B, h, N, d)
        k_t, v_t = self._heads(self.k_proj(x), h_kv), self._heads(self.v_proj(x), h_kv)  # (B, h_kv, N, d)
        if cache is None:
            k_v, v_v = self.project_context(context)                             # 2 x (B, h_kv, M, d)
        else:
            k_v, v_v = cache.fetch(context, self.project_context, owner=self)    # 2 x (B, h_kv, M, d)
        k = torch.cat([k_v, k_t], dim=2)                                         # (B, h_kv, M + N, d)
        v = torch.cat([v_v, v_t], dim=2)                                         # (B, h_kv, M + N, d)
        # Bottom-right aligned causal mask: text query i sees all M visual keys and text keys <= i.
        return self._attend(q, k, v, mask, is_causal)

    def joint(self, x: Tensor, context: Tensor, *, attn_mask: Tensor | None = None,
              is_causal: bool = False) -> tuple[Tensor, Tensor]:
        """The refinement layer: full self-attention over [visual; text].

        x (B, N, C), context (B, M, C), attn_mask None or a (B, M) bool key-padding mask over the
        visual tokens -> (text out (B, N, C), visual out (B, M, C)). `is_causal` makes the joint
        sequence [V; T] causal (LLaVA's mask: visual token i sees visual tokens <= i, text sees every
        visual token). The text rows equal `forward(x, context, ...)`.
        """
        check_context(NAME, x, context, self.dim, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        M = context.shape[1]
        mask = None
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool \
                    or tuple(attn_mask.shape) != (B, M):
                got = tuple(attn_mask.shape) if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
                raise ValueError(f"{NAME}: joint takes a (B, M) = ({B}, {M}) bool key-padding mask over the visual "
                                 f"tokens, got {got}")
            mask = torch.cat([attn_mask.to(x.device), attn_mask.new_ones(B, N, device=x.device)],
                             dim=1)[:, None, None, :]                            # (B, 1, 1, M + N)
        tokens = torch.cat([context, x], dim=1)                                  # (B, M + N, C)
        h, h_kv = self.num_heads, self.num_kv_heads
        q = self._heads(self.q_proj(tokens), h)                                  # (B, h, M + N, d)
        k = self._heads(self.k_proj(tokens), h_kv)                               # (B, h_kv, M + N, d)
        v = self._heads(self.v_proj(tokens), h_kv)                               # (B, h_kv, M + N, d)
        out = self._attend(q, k, v, mask, is_causal)                             # (B, M + N, C)
        return out[:, M:], out[:, :M]

    def text_self_attention(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The text-only layer (no visual token involved): self-attention over the text, x (B, N, C) -> (B, N, C).

        Equals `forward(x, context[:, :0])`. attn_mask, if given, is over (text query, text key)
        pairs, broadcastable to (B, h, N, N), e.g. a (B, N) key-padding mask of the text.
        """
        check_tokens(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal)
        h_kv = self.num_kv_heads
        q = self._heads(self.q_proj(x), self.num_heads)                          # (B, h, N, d)
        k, v = self._heads(self.k_proj(x), h_kv), self._heads(self.v_proj(x), h_kv)  # (B, h_kv, N, d)
        return self._attend(q, k, v, attn_mask, is_causal)

    # -- cost ------------------------------------------------------------------------------
    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool, *,
                     context_len: int | None = None) -> tuple[int, int]:
        """2 x the multiply-adds of `forward` (the cross layer), for N = seq_len text tokens and
        M = context_len visual tokens (default seq_len: the bench uses its tokens as the context too).

        Forward: q 2 N C C and o_proj 2 N C C; k and v of the text 2 N C (2 h_kv d) and of the visual
        tokens 2 M C (2 h_kv d); scores and weighted sum 4 h d per (text query, key) pair, with
        N (M + N) pairs, or N M + N (N + 1) / 2 when causal. Backward: twice the forward.
        """
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C = batch, seq_len, self.dim
        M = seq_len if context_len is None else context_len
        kv = 2 * self.num_kv_heads * self.head_dim
        pairs = N * M + (N * (N + 1) // 2 if causal else N * N)
        fwd = B * (4 * N * C * C + 2 * (N + M) * C * kv + 4 * pairs * C)
        return fwd, 2 * fwd
