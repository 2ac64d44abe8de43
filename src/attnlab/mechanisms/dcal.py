"""DCAL's two cross-attentions: global-local cross-attention (`glca`) and pair-wise cross-attention (`pwca`).

Paper: Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification (Haowei Zhu, Wenjing Ke, Dong Li, Ji Liu, Lu Tian, Yi Shan; CVPR 2022,
arXiv 2205.02151). No code was released: both are written from the paper's equations.
Status: Eqs. (3) and (4) as stated, multi-head, through `attnlab.ops.attention` (SDPA by default;
hook_scores / hook_probs on the eager path). Not supported: causal, KV cache (both), attn_mask (pwca).
The networks around them (attention rollout, query selection, the SA / GLCA / PWCA stack and the
uncertainty-weighted loss) are in `attnlab.models.dcal`.

`glca` (Sec. 3.2, Eq. 3): f_GLCA(Q^l, K^g, V^g) = softmax(Q^l K^g^T / sqrt(d)) V^g, the selected
local queries Q^l (the R tokens with the highest attention-rollout response of the CLS token,
Eq. 2) attending every key and value of the same block input. Layout "cross":
    forward(x (B, R, C), context (B, N, C), *, attn_mask=None) -> (B, R, C)
with x the selected local tokens and context all the tokens (x is typically `context` gathered at
the selected positions; `attnlab.models.dcal.select_local_queries` does the selection). q = x W_Q,
k = context W_K, v = context W_V, all three from GLCA's own weights (the paper: "GLCA does not
share weights with SA"). attn_mask: a (B, N) key-padding mask over the context (True = present),
or any mask broadcastable to (B, h, R, N) (attnlab.masks); a query with no present key gets a
zero attention output, never NaN. The formula is exact softmax cross-attention (spec exact=True);
what makes it GLCA is which queries come in, decided outside the module.

`pwca` (Sec. 3.3, Eq. 4): f_PWCA(Q_1, K_c, V_c) = softmax(Q_1 K_c^T / sqrt(d)) V_c with
K_c = [K_1; K_2], V_c = [V_1; V_2]: the queries of image 1 attend their own keys and values and
those of a second image of the pair, in one softmax over N + M keys. Layout "cross":
    forward(x (B, N, C), context (B, M, C)) -> (B, N, C)
with x image 1's tokens and context image 2's (the distractor). The weights are those of the
self-attention block (the paper: "the PWCA branch shares weights with the SA branch"), so the same
module also runs the plain self-attention: `forward_self(x, *, attn_mask=None)` is multi-head
self-attention with these weights (equal to `mhsa` with the same parameters); PWCA is used only
in training and at inference the network runs `forward_self` alone. With M = 0 context tokens
`forward` equals `forward_self`.
Not supported by pwca: attn_mask (NotImplementedError). The pairs of DCAL are images of one size,
so there is no padding to mask; and a key-padding mask over the context alone would never empty a
query's row (its own image's keys are always there), which is not what a (B, M) context mask
means for the cross layout (a query with no context token gets zero).

Both: is_causal refused (the context has no order relative to the queries); no KV cache (a fixed
context could be cached, but DCAL's context changes at every call).

Parameters (timm's ViT `Attention` names, so a ViT / DeiT block's `attn.` weights load as they are,
as the paper initialises its backbones from ImageNet-pretrained DeiT / ViT):
    qkv   Linear(C, 3 C), output reshaped (..., 3, h, d): rows [W_Q | W_K | W_V], each h heads of d;
          glca applies rows [0, C) to x and rows [C, 3C) to the context; pwca applies all three to
          x and rows [C, 3C) to the context.
    proj  Linear(C, C), the output projection.
Checkpoint key map: timm `blocks.<i>.attn.qkv.*` / `blocks.<i>.attn.proj.*` -> `qkv.*` / `proj.*`
(one to one, no reshaping). A GLCA block is often initialised from a pretrained SA block (the
paper does not say how it initialises GLCA): load the same `attn.` entries into glca.

Deviations / readings chosen (the paper gives equations, not code):
- Multi-head: the equations are written for one head; both run them per head (h heads of
  d = C / h), concatenated and projected by `proj`, as the MSA of the ViT the paper builds on.
- pwca's keys are ordered [image 1; image 2] as K_c; the order does not change the softmax.
- Attention dropout (`attn_drop`) and output dropout (`proj_drop`) as timm's, default 0; the
  paper trains with stochastic depth, which belongs to the blocks (not these modules).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_context, check_dims, check_dropout, check_features, check_positive,
                             check_tokens)
from attnlab.hooks import HookPoint
from attnlab.masks import check_attn_mask
from attnlab.ops.sdpa import PRIORITY, attention
from attnlab.registry import MechanismSpec, register

PAPER = "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification"
URL = "https://arxiv.org/abs/2205.02151"


class _TimmAttentionWeights(nn.Module):
    """The shared constructor: timm `Attention` weights (qkv, proj), options, hook points."""

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")
    NAME = ""

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, proj_bias: bool = True, scale: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        name = self.NAME
        self.head_dim = check_dims(name, dim, num_heads)
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        for arg, value in (("qkv_bias", qkv_bias), ("proj_bias", proj_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be a bool, got {type(value).__name__}")
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{name}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.scale = None if scale is None else check_positive(name, "scale", scale)
        self.backend = backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        # Shapes: glca N = R local queries, M = N context tokens; pwca M = N + M_ctx keys
        # ([image 1; image 2]), M = N in forward_self.
        self.hook_q = HookPoint()        # (B, h, N, d)
        self.hook_k = HookPoint()        # (B, h, M, d)
        self.hook_v = HookPoint()        # (B, h, M, d)
        self.hook_scores = HookPoint()   # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()      # (B, h, N, d), per-head outputs before proj

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def _heads(self, t: Tensor) -> Tensor:
        """(B, L, C) -> (B, h, L, d)."""
        B, L, _ = t.shape
        return t.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _project_q(self, x: Tensor) -> Tensor:
        """x (B, N, C) -> q (B, h, N, d), the rows [0, C) of qkv."""
        C = self.dim
        bias = None if self.qkv.bias is None else self.qkv.bias[:C]
        return self._heads(F.linear(x, self.qkv.weight[:C], bias))

    def _project_kv(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t (B, M, C) -> k, v (B, h, M, d), the rows [C, 3C) of qkv."""
        C = self.dim
        bias = None if self.qkv.bias is None else self.qkv.bias[C:]
        B, M, _ = t.shape
        kv = F.linear(t, self.qkv.weight[C:], bias).reshape(B, M, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                         # 2 x (B, h, M, d)
        return k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, probs_hook=None) -> Tensor:
        """Hooks, attention, per-head output hook, projection: (B, h, N, d) x 2 (B, h, M, d) -> (B, N, C)."""
        B, _, N, _ = q.shape
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        backend = self.backend if probs_hook is None else "reference"
        out = attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=backend,
                        scores_hook=self.hook_scores, probs_hook=probs_hook or self.hook_probs)
        out = self.hook_out(out)                                           # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, self.dim)                  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def _check_mask(self, attn_mask, B: int, N: int, M: int, shapes: str):
        if attn_mask is None:
            return None
        try:
            return check_attn_mask(attn_mask, B, self.num_heads, N, M)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self.NAME}: {err} ({shapes})") from None


GLCA = "glca"


@register(MechanismSpec(
    name=GLCA, paper=PAPER, year=2022, family="softmax", layout="cross",
    time="O(R N d h), R local queries", memory="O(R + N) (sdpa); O(R N) (reference)", exact=True,
    causal=False, attn_mask=True, kv_cache=False, cross=True, backends=("sdpa", "flex", "reference"),
    url=URL,
    provenance="paper",
    source=("Zhu et al. 2022 Sec. 3.2 Eq. (3): softmax(Q^l K^g^T / sqrt(d)) V^g, the top-R local queries "
            "(Eq. (2) attention rollout, selection in attnlab.models.dcal) against all keys and values, "
            "GLCA's own weights; multi-head and parameter names as timm timm/layers/attention.py::Attention "
            "(qkv reshaped (B, N, 3, h, d), proj); no official code"),
    test_kwargs=dict(qkv_bias=True),
    test_configs=(dict(qkv_bias=False, proj_bias=False, scale=0.25),)))
class GlobalLocalCrossAttention(_TimmAttentionWeights):
    """x (B, R, C) local queries, context (B, N, C) all tokens -> (B, R, C).

    Softmax in float32 (float64 for float64 input). Hooks (attnlab.hooks): hook_scores and
    hook_probs (B, h, R, N) on the eager path (`backend="reference"`).
    """

    NAME = GLCA

    def forward(self, x: Tensor, context: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_context(GLCA, x, context, self.dim, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, R, _ = x.shape
        N = context.shape[1]
        attn_mask = self._check_mask(attn_mask, B, R, N, f"x {tuple(x.shape)}, context {tuple(context.shape)}")
        q = self._project_q(x)                                             # (B, h, R, d)
        k, v = self._project_kv(context)                                   # 2 x (B, h, N, d)
        return self._attend(q, k, v, attn_mask)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool, *,
                     context_len: int | None = None) -> tuple[int, int]:
        """2 x the multiply-adds, for R = seq_len queries and N = context_len (default seq_len)
        context tokens: q 2 R C^2, k and v 4 N C^2, proj 2 R C^2, scores and weighted sum 4 R N C.
        Backward: twice the forward."""
        _check_flops_call(self, dim, num_heads, causal)
        B, R, C = batch, seq_len, self.dim
        N = seq_len if context_len is None else context_len
        fwd = B * (4 * R * C * C + 4 * N * C * C + 4 * R * N * C)
        return fwd, 2 * fwd


PWCA = "pwca"


@register(MechanismSpec(
    name=PWCA, paper=PAPER, year=2022, family="softmax", layout="cross",
    time="O(N (N + M) d h)", memory="O(N + M) (sdpa); O(N (N + M)) (reference)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, cross=True, backends=("sdpa", "flex", "reference"),
    url=URL,
    provenance="paper",
    source=("Zhu et al. 2022 Sec. 3.3 Eq. (4): softmax(Q_1 [K_1; K_2]^T / sqrt(d)) [V_1; V_2], the SA block's "
            "own weights (shared with SA, Sec. 4.1); multi-head and parameter names as timm "
            "timm/layers/attention.py::Attention (qkv reshaped (B, N, 3, h, d), proj); no official code"),
    test_kwargs=dict(qkv_bias=True),
    test_configs=(dict(qkv_bias=False, proj_bias=False, scale=0.25),)))
class PairWiseCrossAttention(_TimmAttentionWeights):
    """x (B, N, C) image 1, context (B, M, C) image 2 -> (B, N, C): image 1's queries over the
    keys and values of both images; `forward_self(x)` is the self-attention with the same weights.

    Softmax in float32 (float64 for float64 input). Hooks (attnlab.hooks): hook_k / hook_v
    carry the concatenated keys and values (B, h, N + M, d), hook_scores / hook_probs
    (B, h, N, N + M) on the eager path (`backend="reference"`); forward_self fires the same hooks
    with M = 0.
    """

    NAME = PWCA

    def forward(self, x: Tensor, context: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_context(PWCA, x, context, self.dim, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        q = self._project_q(x)                                             # (B, h, N, d)
        k, v = self._project_kv(torch.cat([x, context], dim=1))            # 2 x (B, h, N + M, d): [K_1; K_2]
        return self._attend(q, k, v, None)

    def forward_self(self, x: Tensor, *, attn_mask: Tensor | None = None,
                     return_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Multi-head self-attention with these weights: x (B, N, C) -> (B, N, C), the SA branch.

        attn_mask: as `mhsa`'s (a (B, N) key-padding mask or anything broadcastable to
        (B, h, N, N)). `return_probs=True` also returns the attention probabilities
        (B, h, N, N), for attention rollout; the call then runs the eager reference backend,
        the one that forms them (hook_probs sees them first and may edit them).
        """
        check_tokens(PWCA, x, self.dim)
        B, N, _ = x.shape
        attn_mask = self._check_mask(attn_mask, B, N, N, f"x {tuple(x.shape)}")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)   # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # 3 x (B, h, N, d)
        if not return_probs:
            return self._attend(q, k, v, attn_mask)
        kept = []

        def record(probs: Tensor) -> Tensor:
            probs = self.hook_probs(probs)
            kept.append(probs)
            return probs

        out = self._attend(q, k, v, attn_mask, probs_hook=record)
        if not kept:                       # an empty batch or sequence: attention never ran
            kept.append(q.new_zeros(B, self.num_heads, N, N))
        return out, kept[0]

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool, *,
                     context_len: int | None = None) -> tuple[int, int]:
        """2 x the multiply-adds, for N = seq_len queries and M = context_len (default seq_len)
        distractor tokens: qkv of x 6 N C^2, k and v of the context 4 M C^2, proj 2 N C^2, scores
        and weighted sum 4 N (N + M) C. Backward: twice the forward."""
        _check_flops_call(self, dim, num_heads, causal)
        B, N, C = batch, seq_len, self.dim
        M = seq_len if context_len is None else context_len
        fwd = B * (8 * N * C * C + 4 * M * C * C + 4 * N * (N + M) * C)
        return fwd, 2 * fwd


def _check_flops_call(module, dim: int, num_heads: int, causal: bool) -> None:
    name = type(module).spec.name
    if causal:
        raise NotImplementedError(f"mechanism {name!r} does not support causal")
    if dim != module.dim or num_heads != module.num_heads:
        raise ValueError(f"{name}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                         f"with dim={module.dim}, num_heads={module.num_heads}")
