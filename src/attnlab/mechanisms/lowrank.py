"""Low-rank multi-head attention pooling (LAMA): several attention distributions from one
low-rank bilinear affinity with a learned global context vector.

Paper: Low Rank Factorization for Compact Multi-Head Self-Attention (Mehta, Rangwala,
Ramakrishnan, 2019; arXiv 1912.00835).
Implements the attention layer that turns the hidden states h_1..h_N (here x, (B, N, C)) into
a structured sentence representation:
- affinity of token i with the global context vector c for head j, a bilinear form
  h_i^T W_j c whose matrices are factorised as low-rank bilinear pooling does
  (Hadamard product of two rank-k projections, read out by a k x h matrix P):
      f_i = P^T ( sigma(U^T h_i) o sigma(V^T c) ),   f_i in R^h (one score per head),
  U, V in R^{C x k}, P in R^{k x h}, c in R^C, sigma = tanh. With sigma = identity this is
  exactly f_i^j = h_i^T (U diag(P_j) V^T) c: a rank-k W_j per head, and the heads cost only
  a column of P each (no per-head projection matrices);
- a_j = softmax_i(f_i^j) over the valid tokens, per head;
- m_j = sum_i a_i^j h_i, and the representation is the concatenation [m_1; ...; m_h]
  (B, h C), or its projection to `out_dim` by one Linear.
The affinity is a dot product between a key k_i = sigma(U^T h_i) (shared by all heads) and a
per-head query q_j = P_j o sigma(V^T c), so the pooling runs through `attnlab.ops.attention`
(one query per head, one shared key/value head, scale 1) with attnlab's mask conventions.

Status: a reconstruction (see Sources). x (B, N, C) -> (B, h C) or (B, out_dim); `attn_mask`
is a (B, N) key-padding mask (bool, True = token present; or float, added to the scores); a
sample with no valid token outputs zeros (also after the `out_dim` projection).
Sources: a reconstruction. Only the abstract (arXiv 1912.00835; v2 titled "Compact Multi-Head
Self-Attention for Learning Supervised Text Representations") could be read here: "low-rank
matrix factorization of the affinity matrix to efficiently get multiple attention distributions
instead of having separate parameters for each head" and "attention scores are obtained by
querying a global context vector". The bilinear form above is low-rank bilinear pooling (Kim et
al. 2017, f = P^T(sigma(U^T x) o sigma(V^T y)) + b) applied to (h_i, c), which is this file's
reading; the paper's own equations (Sec. 3) were not seen. A third-party port
(JohnGiorgi/compact-multi-head-self-attention-pytorch, modules/lama.py::LAMA, "not one of the
authors") reads it differently: scores tanh((P^T c) o (Q^T h_i)) with P, Q in R^{C x h} (rank =
heads, the activation after the product) and cites an L2 normalisation in "Eq. 3.13" that it
leaves out. Check against the paper before relying on the exact form.
Deviations (readings chosen):
- The bias b of low-rank bilinear pooling (f = P^T(...) + b) is left out: a per-head constant
  does not change a softmax over tokens.
- No scaling of the scores (the paper has none); sigma is tanh by default, `activation=
  "identity"` gives the plain low-rank bilinear affinity.
- The GRU encoder that produces the hidden states in the paper is not part of this module.
- `rank` (the paper's k) defaults to dim // num_heads, a choice of this library; num_heads need
  not divide dim (each head pools full-width tokens). Parameters: 2 C k + C + k h.
- FlexAttention is not among the backends: keys are k wide and values C wide.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

_ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda t: t}


@register(MechanismSpec(
    name="lowrank", paper="Low Rank Factorization for Compact Multi-Head Self-Attention", year=2019,
    family="softmax", layout="pool", time="O(N C k)", memory="O(N (k + h))", exact=False,
    causal=False, attn_mask=True, kv_cache=False, backends=("sdpa", "reference"),
    url="https://arxiv.org/abs/1912.00835",
    provenance="reconstruction",
    source=("abstract only (arXiv 1912.00835): low-rank factorised affinity, global context vector. "
            "Guessed: low-rank bilinear pooling f_i = P^T(tanh(U^T h_i) o tanh(V^T c)) (Kim et al. "
            "2017) with rank k = dim // heads, no bias, no score scaling, no L2 normalisation; a "
            "third-party port (JohnGiorgi/compact-multi-head-self-attention-pytorch modules/lama.py) "
            "reads tanh((P^T c) o (Q^T h_i)) instead"),
    test_kwargs=dict(rank=8)))
class LowRankPooling(nn.Module):
    """x (B, N, C) -> (B, h C) (heads concatenated, head-major) or (B, out_dim).

    Parameters (paper symbols): `word_proj` = U (Linear(C, k), no bias), `context_proj` = V
    (Linear(C, k), no bias), `context` = c (C,), `head_weights` = P (k, h); `proj` = Linear(h C,
    out_dim) when out_dim is given.
    Hooks (attnlab.hooks): the pooling softmax's scores and probs on the eager path
    (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, rank: int | None = None, out_dim: int | None = None,
                 activation: str = "tanh", attn_drop: float = 0.0, proj_drop: float = 0.0,
                 proj_bias: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        # Heads need not divide dim here: every head pools full-width tokens.
        for arg, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"lowrank: {arg} must be a positive int, got {value!r}")
        rank = dim // num_heads if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"lowrank: rank must be a positive int, got {rank!r}")
        if out_dim is not None and (isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim <= 0):
            raise ValueError(f"lowrank: out_dim must be a positive int or None, got {out_dim!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"lowrank: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        check_dropout("lowrank", attn_drop=attn_drop, proj_drop=proj_drop)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.rank = dim, num_heads, rank
        self.activation = activation
        self.out_dim = num_heads * dim if out_dim is None else out_dim
        self.backend = backend
        self.attn_drop = attn_drop
        self.word_proj = nn.Linear(dim, rank, bias=False, **factory)          # U^T
        self.context_proj = nn.Linear(dim, rank, bias=False, **factory)       # V^T
        self.context = nn.Parameter(torch.randn(dim, **factory))              # c
        self.head_weights = nn.Parameter(torch.randn(rank, num_heads, **factory) / math.sqrt(rank))  # P
        self.proj = nn.Linear(num_heads * dim, out_dim, bias=proj_bias, **factory) if out_dim is not None else None
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()       # (B, h, 1, k): q_j = P_j o sigma(V^T c), one query per head
        self.hook_k = HookPoint()       # (B, 1, N, k): sigma(U^T x_i), shared by the heads
        self.hook_v = HookPoint()       # (B, 1, N, C): the tokens x_i
        self.hook_scores = HookPoint()  # (B, h, 1, N), the affinities f with the mask (eager path only)
        self.hook_probs = HookPoint()   # (B, h, 1, N), the pooling weights (eager path only)
        self.hook_out = HookPoint()     # (B, h, 1, C), per-head pooled vectors before proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, rank={self.rank}, out_dim={self.out_dim}, "
                f"activation={self.activation!r}")

    def _queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q (1, h, 1, k) with q_j = P_j o sigma(V^T c), and k (B, 1, N, k) = sigma(U^T x)."""
        sigma = _ACTIVATIONS[self.activation]
        context = sigma(self.context_proj(self.context))                       # (k,)
        q = (self.head_weights * context[:, None]).T                           # (h, k)
        k = sigma(self.word_proj(x))                                           # (B, N, k)
        return q[None, :, None, :], k.unsqueeze(1)

    def scores(self, x: Tensor) -> Tensor:
        """The affinities f (B, h, N) before the softmax and before any mask."""
        check_tokens("lowrank", x, self.dim)
        q, k = self._queries_keys(x)
        return torch.einsum("zhk,bnk->bhn", q[:, :, 0], k[:, 0])

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_features(self, is_causal=is_causal, cache=cache)   # a pooled summary has neither
        check_tokens("lowrank", x, self.dim)
        B, N, C = x.shape
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"lowrank: attn_mask must be a (B, N) torch.Tensor, got {type(attn_mask).__name__}")
            if attn_mask.dim() != 2 or attn_mask.shape[0] not in (B, 1) or attn_mask.shape[1] != N:
                raise ValueError(f"lowrank: attn_mask is a key-padding mask of shape (B, N) = ({B}, {N}), "
                                 f"got {tuple(attn_mask.shape)}")
        q, k = self._queries_keys(x)
        q = q.expand(B, -1, -1, -1).to(x.dtype)                                # (B, h, 1, k)
        v = x.unsqueeze(1)                                                     # (B, 1, N, C)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, scale=1.0,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                               # (B, h, 1, C)
        out = out.reshape(B, self.num_heads * C)                               # (B, h C), head-major
        if self.proj is not None:
            out = self.proj(out)                                               # (B, out_dim)
            empty = self._empty_rows(attn_mask, N, x.device)                   # (B|1, 1) or None
            if empty is not None:  # a sample with no valid token outputs zeros, bias included
                out = out.masked_fill(empty, 0.0)
        return self.proj_drop(out)

    @staticmethod
    def _empty_rows(attn_mask: Tensor | None, N: int, device) -> Tensor | None:
        """(B|1, 1) bool: samples with no token to pool (all padded, or N == 0)."""
        if N == 0:
            return torch.ones(1, 1, dtype=torch.bool, device=device)
        if attn_mask is None:
            return None
        if attn_mask.dtype == torch.bool:
            return ~attn_mask.any(-1, keepdim=True)
        return ~(attn_mask != float("-inf")).any(-1, keepdim=True)
