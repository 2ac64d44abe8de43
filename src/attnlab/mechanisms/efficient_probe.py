"""Efficient Probing (EP): multi-query attentive pooling with no query or key projection.

Paper: Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency (Psomas,
Christopoulos, Baltzi, Kakogeorgiou, Aravanis, Komodakis, Karantzalos, Avrithis, Tolias;
ICLR 2026; arXiv 2506.10178).
Official code: billpsomas/efficient-probing `poolings/ep.py::EfficientProbing`, used by
`probe_heads.py` as the head `Sequential(EfficientProbing, BatchNorm1d(C / d_out, affine=False),
Linear(C / d_out, classes))` on the frozen encoder's patch tokens.

Computation, x (B, N, C) the tokens, M = `num_queries`, c = C / (d_out M):
    Q0 (M, C), learned, initialised 0.02 * randn            (`cls_token`, shape (1, M, C))
    A = softmax_tokens(Q0 x^T * C^-1/2)    (M, N)           raw tokens are the keys: no W_q, W_k
    V = x W_v^T                            (N, C / d_out)   (`v`, Linear(C, C / d_out))
    V^(m) = V[:, m c:(m + 1) c]            (N, c)           query m reads its own value chunk
    y = [A_1 V^(1) ; ... ; A_M V^(M)]      (C / d_out,)     query-major concatenation
So each query is one "head" with a full-width (C) key and a c-wide value; the pooling runs
through `attnlab.ops.attention` with q (B, M, 1, C), the tokens shared as keys (B, M, N, C)
(an expanded view) and v (B, M, N, c), scale C^-1/2 (`qk_scale` overrides it).
Parameters: M C + C^2 / d_out (+ C / d_out with `qkv_bias`).

Status: the official computation (official-code). x (B, N, C) -> (B, C / d_out).
Checkpoint key map: the official module's keys are this module's (`cls_token` (1, M, C),
`v.weight` (C / d_out, C), `v.bias` with qkv_bias), so
`load_state_dict(official.state_dict())` works; in a trained probe (the official
`model.head = Sequential(pooling, BatchNorm1d, Linear)`, and the released `ep_head.pth`
files' "state_dict") they sit under `head.0.`: strip that prefix; `head.1` (the non-affine
BatchNorm1d's running stats) and `head.2` (the classifier) are not part of this module.
Deviations:
- `num_heads` is accepted for the shared signature and unused. The official constructor has a
  `num_heads` argument, but its forward only runs with num_heads = 1 (it squeezes the head
  axis of the logits), which is the computation here: one logit per (query, token) over the
  full width, scale C^-1/2. The number of queries is `num_queries` (official default 32).
- `attn_mask`: a (B, N) key-padding mask (bool, True = token present; or float, added to the
  logits) that the official forward does not take; a sample with no valid token (or N = 0)
  pools to zeros. The official `cls=` argument (queries given at call time) is not offered.
- Optional `attn_drop` (dropout on A) and `proj_drop` (on the pooled output); the official has
  neither, default 0. The softmax runs in
  float32 (float64 for float64 input); the official runs it in the input dtype.
- `qk_scale=None` means C^-1/2; the official's `qk_scale or head_dim ** -0.5` also turns an
  explicit 0 into the default, here 0 is refused.
- FlexAttention is not among the backends: keys are C wide and values c wide.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_positive, check_positive_int, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "efficient_probe"


@register(MechanismSpec(
    name=NAME, paper="Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency",
    year=2026, family="softmax", layout="pool", time="O(N C (M + C / d_out))", memory="O(N M)",
    exact=False, causal=False, attn_mask=True, kv_cache=False, backends=("sdpa", "reference"),
    url="https://arxiv.org/abs/2506.10178",
    provenance="official-code",
    source=("billpsomas/efficient-probing poolings/ep.py::EfficientProbing (num_heads=1, the only value "
            "its forward runs with), built by probe_heads.py as EfficientProbing(dim, num_queries, d_out) "
            "-> BatchNorm1d(dim // d_out, affine=False) -> Linear(dim // d_out, classes)"),
    test_kwargs=dict(num_queries=4, d_out=2),
    test_configs=(dict(num_queries=8, qkv_bias=True), dict(num_queries=1, qk_scale=0.3))))
class EfficientProbing(nn.Module):
    """x (B, N, C) -> (B, C / d_out): M learned queries over the raw tokens, each pooling its own
    c = C / (d_out M) wide chunk of one value projection, concatenated query-major.

    Parameters (official names): `cls_token` (1, M, C) the queries, `v` = Linear(C, C / d_out).
    Hooks (attnlab.hooks): the pooling softmax's scores and probs (B, M, 1, N) on the eager path
    (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 1, *, num_queries: int = 32, d_out: int = 1,
                 qkv_bias: bool = False, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_positive_int(NAME, "dim", dim)
        check_positive_int(NAME, "num_heads", num_heads)   # accepted, unused (see the docstring)
        check_positive_int(NAME, "num_queries", num_queries)
        check_positive_int(NAME, "d_out", d_out)
        if dim % (d_out * num_queries):
            raise ValueError(f"{NAME}: dim ({dim}) must be divisible by d_out * num_queries "
                             f"({d_out} * {num_queries} = {d_out * num_queries}): each query pools a "
                             f"dim / (d_out * num_queries) wide chunk of the values")
        if qk_scale is not None:
            qk_scale = check_positive(NAME, "qk_scale", qk_scale)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.num_queries, self.d_out = num_queries, d_out
        self.out_dim = dim // d_out                                  # C' of the official code
        self.chunk = dim // (d_out * num_queries)                    # c, one query's value width
        self.scale = dim ** -0.5 if qk_scale is None else qk_scale
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)         # on the pooled output (the official has none)
        self.backend = backend
        self.v = nn.Linear(dim, self.out_dim, bias=qkv_bias, **factory)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, num_queries, dim, **factory))
        self.hook_q = HookPoint()       # (B, M, 1, C): the learned queries, one per "head"
        self.hook_k = HookPoint()       # (B, 1, N, C): the raw tokens, shared by the queries
        self.hook_v = HookPoint()       # (B, M, N, c): query m's chunk of the value projection
        self.hook_scores = HookPoint()  # (B, M, 1, N), the logits with the mask (eager path only)
        self.hook_probs = HookPoint()   # (B, M, 1, N), the pooling weights A (eager path only)
        self.hook_out = HookPoint()     # (B, M, 1, c), per-query pooled chunks before concatenation

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_queries={self.num_queries}, d_out={self.d_out}, "
                f"out_dim={self.out_dim}, scale={self.scale:.4g}")

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_features(self, is_causal=is_causal, cache=cache)   # a pooled summary has neither
        check_tokens(NAME, x, self.dim)
        B, N, C = x.shape
        M, c = self.num_queries, self.chunk
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"{NAME}: attn_mask must be a (B, N) torch.Tensor, got {type(attn_mask).__name__}")
            if attn_mask.dim() != 2 or attn_mask.shape[0] not in (B, 1) or attn_mask.shape[1] != N:
                raise ValueError(f"{NAME}: attn_mask is a key-padding mask of shape (B, N) = ({B}, {N}), "
                                 f"got {tuple(attn_mask.shape)}")
        q = self.cls_token.expand(B, -1, -1).unsqueeze(2)                 # (B, M, 1, C)
        k = x.unsqueeze(1)                                                 # (B, 1, N, C)
        v = self.v(x).reshape(B, N, M, c).transpose(1, 2)                  # (B, M, N, c)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k.expand(B, M, N, C), v,                        # k: a view, (B, M, N, C)
                        scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                           # (B, M, 1, c)
        return self.proj_drop(out.reshape(B, M * c))                      # (B, C / d_out), query-major

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds, for N = seq_len tokens.

        Forward: the value projection 2 N C (C / d_out), the logits 2 M N C, the weighted sums
        2 M N c = 2 N C / d_out. Backward: twice the forward. The module's own dim is used (the
        bench's must agree); `num_heads` is unused here as in the module.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        B, N, C, M = batch, seq_len, self.dim, self.num_queries
        fwd = 2 * B * N * C * self.out_dim + 2 * B * M * N * C + 2 * B * M * N * self.chunk
        return fwd, 2 * fwd
