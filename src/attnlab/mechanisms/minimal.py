"""Minimal attention: collapsed query-key and value-output matrices, symmetric similarity.

Paper: Reducing the Transformer Architecture to a Minimum (Bermeitinger, Hrycej, Pavone, Kath,
Handschuh, 2024; arXiv 2410.13732).
Implements the paper's reductions of one attention layer, each an option:
- `collapse_qk`: the similarity of head h is the bilinear form x_i^T W_h x_j * scale with one
  C x C matrix W_h per head, standing for the product W_q,h W_k,h^T (C x d times d x C) that
  is all the scores ever use. Keys are the inputs themselves, so a KV cache holds x.
- `symmetric`: a symmetric similarity. Without `collapse_qk` the key matrix is the query matrix
  (W_k = W_q, so W_h = W_q,h W_q,h^T, positive semi-definite: no token is dissimilar to itself);
  with it, W_h is a symmetric matrix stored as its upper triangle, C(C+1)/2 numbers per head.
  Either way half the parameters of the asymmetric form.
- `collapse_vo`: "separate" (False, default of the original layer) keeps W_v (C x C, split into
  heads) and W_o (C x C); "one" (True) replaces each head's W_v,h W_o (C x d times d x C) by one
  C x C matrix W_vo,h, out = sum_h P_h X W_vo,h; "none" omits both: the values are the inputs
  and the heads are averaged, out = (1/h) sum_h P_h X, a convex combination of input tokens.
Blocks without the MLP (the paper's other reduction) are `attnlab.Block(..., mlp_ratio=0)`.
Defaults are the reduced layer (collapse_qk=True, collapse_vo="none"); collapse_qk=False with
collapse_vo="separate" is the original layer (mhsa's parameters, without biases by default).

Parameter arithmetic (weights; biases only where asked), C = dim, h = num_heads, d = C / h:
    similarity  asymmetric: 2 C^2          symmetric: C^2                 (not collapsed)
                collapsed:  h C^2          collapsed symmetric: h C(C+1)/2
    value/out   separate:   2 C^2          one: h C^2                     none: 0
So one head, collapsed, is C^2 (the "single matrix of the same size" as W_q) instead of 2 C^2,
and the original layer's 4 C^2 falls to C^2 (C(C+1)/2 symmetric) with collapse_vo="none".
With h > 2 heads collapsing costs more than it saves (h C^2 > 2 C^2), as the paper notes for the
multi-head case; `parameter_count_formula` computes every configuration.

Status: softmax attention over these similarities through `attnlab.ops.attention` (no
approximation; spec.exact is False because most configurations compute a different function
than mhsa), with causal, masks and a KV cache. With collapse_qk=True and W_h = W_q,h W_k,h^T the scores equal
mhsa's q k^T * scale (tests/mechanisms/test_minimal.py checks it).
Sources: checked against the text of arXiv 2410.13732v2 (its display equations were not rendered
in the copy read, so sections rather than equation numbers are cited): Sec. 2 (no MLP), Sec. 3
(single head: W^Q W^K^T collapsed to W^QK, W^V W^O to W^VO; "delete the value transformations",
done in their Keras code by setting W^V and W^O to unit matrices, giving a convex combination of
the inputs; the collapse by "setting W^K to a unit matrix", W^QK replacing W^Q), Sec. 4 (several
heads: a collapsed W^QK_h is N x N per head, "no longer efficient"; omitting W^VO_h keeps the
convex combination), Sec. 5 (symmetry: W^Q = W^K, or a W^QK mirrored over the diagonal,
N(N+1)/2 parameters). The paper's experiments use the collapsed and value-free variants with one
head only; the multi-head forms of those two are this file's generalisation.
Deviations (readings where the text does not decide):
- Scale: scores are multiplied by `scale` = 1/sqrt(d), d = C / h, as in mhsa, also when
  collapsed (the paper's W could absorb it) so that collapsing reproduces mhsa's scores exactly;
  their Keras implementation (W^K = I inside a standard attention layer) keeps that layer's
  1/sqrt(key width) as well.
- collapse_vo="none" with several heads averages the heads (W_vo,h = I / h), the reading under
  which the output stays a convex combination of the input tokens (Sec. 4 asks for that, without
  saying how the heads combine).
- With collapse_qk the keys are the inputs x, shared by all heads (one key head), and so are the
  values for collapse_vo "one"/"none", whose matrices are applied to the averages afterwards
  ((P_h X) W_vo,h = P_h (X W_vo,h)). For collapse_vo="separate" the values of all heads travel
  as one (B, 1, M, C) tensor and head h keeps its own d columns of the output.
- Biases: the paper's matrices have none, so qkv_bias and proj_bias default to False; they
  apply to the W_q, W_k, W_v and output matrices that a configuration has, and asking for a
  bias that has no matrix to sit on is an error.
- Initialisation: collapsed matrices are drawn with the standard deviation of the product of
  two default-initialised Linear layers, sqrt(d) / (3 C), so scores start at mhsa's scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

def _vo_mode(collapse_vo) -> str:
    if isinstance(collapse_vo, bool):
        return "one" if collapse_vo else "separate"
    if isinstance(collapse_vo, str) and collapse_vo in ("separate", "one", "none"):
        return collapse_vo
    raise ValueError(f"minimal: collapse_vo must be one of False/'separate', True/'one', 'none'; "
                     f"got {collapse_vo!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"minimal: {name} must be a bool, got {type(value).__name__} {value!r}")


@register(MechanismSpec(
    name="minimal", paper="Reducing the Transformer Architecture to a Minimum", year=2024,
    family="softmax", layout="seq",
    time="O(N^2 C h) (O(N^2 C) with collapse_qk=False, collapse_vo='separate')",
    memory="O(N) with fused SDPA, O(N^2) eager", exact=False, causal=True, attn_mask=True,
    kv_cache=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2410.13732",
    provenance="paper",
    source=("arXiv 2410.13732v2 Sec. 3 (collapse W^Q W^K^T -> W^QK and W^V W^O -> W^VO; W^V = W^O = I "
            "for a convex combination), Sec. 4 (multi-head), Sec. 5 (symmetric: W^Q = W^K or a "
            "mirrored W^QK); the multi-head collapsed / value-free forms (heads averaged) and the "
            "1/sqrt(d) scale when collapsed are attnlab's readings"),
    test_kwargs=dict(collapse_qk=True, symmetric=True, collapse_vo="one"),
    test_configs=(dict(collapse_qk=False, collapse_vo="separate", qkv_bias=True), dict(collapse_vo="none"))))
class MinimalAttention(nn.Module):
    """x (B, N, C) -> (B, N, C). Softmax runs in float32 (or float64 for float64 input).

    Parameters by configuration (C = dim, h = heads, d = C / h):
    - `qk`: Linear(C, 2C) as [W_q | W_k] (Linear(C, C), W_q only, when symmetric);
    - `qk_weight` (h, C, C): W_h with scores_h = x W_h x^T * scale (collapse_qk);
    - `qk_triu` (h, C(C+1)/2): the upper triangle of a symmetric W_h (collapse_qk, symmetric);
    - `v`: Linear(C, C) and `proj`: Linear(C, C) (collapse_vo="separate");
    - `vo_weight` (h, C, C) and `vo_bias` (C) if proj_bias (collapse_vo="one").
    Hooks (attnlab.hooks): scores and probs on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, proj_bias: bool = False, collapse_qk: bool = True,
                 collapse_vo: bool | str = "none", symmetric: bool = False, scale: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims("minimal", dim, num_heads)
        for name, value in (("collapse_qk", collapse_qk), ("symmetric", symmetric), ("qkv_bias", qkv_bias),
                            ("proj_bias", proj_bias)):
            _check_bool(name, value)
        vo = _vo_mode(collapse_vo)
        check_dropout("minimal", attn_drop=attn_drop, proj_drop=proj_drop)
        if scale is not None:
            check_positive("minimal", "scale", scale)
        if qkv_bias and collapse_qk and vo != "separate":
            raise ValueError("minimal: qkv_bias=True needs a W_q, W_k or W_v matrix to add a bias to, but "
                             f"collapse_qk=True and collapse_vo={vo!r} leave none")
        if proj_bias and vo == "none":
            raise ValueError("minimal: proj_bias=True needs an output matrix, but collapse_vo='none' has none")

        factory = dict(device=device, dtype=dtype)
        C, h, d = dim, num_heads, self.head_dim
        self.dim, self.num_heads = dim, num_heads
        self.collapse_qk, self.symmetric, self.collapse_vo = collapse_qk, symmetric, vo
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.backend = backend
        self.attn_drop = attn_drop
        # Standard deviation of an entry of W_q,h W_k,h^T for default-initialised Linear layers
        # (entries uniform in +-1/sqrt(C), variance 1/(3C); d terms): sqrt(d) / (3 C).
        std = math.sqrt(d) / (3 * C)

        if not collapse_qk:
            self.qk = nn.Linear(C, C if symmetric else 2 * C, bias=qkv_bias, **factory)
        elif symmetric:
            self.qk_triu = nn.Parameter(torch.randn(h, C * (C + 1) // 2, **factory) * std)
            self.register_buffer("triu_index", torch.triu_indices(C, C, device=device), persistent=False)
        else:
            self.qk_weight = nn.Parameter(torch.randn(h, C, C, **factory) * std)

        if vo == "separate":
            self.v = nn.Linear(C, C, bias=qkv_bias, **factory)
            self.proj = nn.Linear(C, C, bias=proj_bias, **factory)
        elif vo == "one":
            self.vo_weight = nn.Parameter(torch.randn(h, C, C, **factory) * std)
            self.vo_bias = nn.Parameter(torch.zeros(C, **factory)) if proj_bias else None
        self.proj_drop = nn.Dropout(proj_drop)
        # Identity hook points for probes (see attnlab.probes): shapes in comments.
        self.hook_q = HookPoint()    # (B, h, N, d), or (B, h, N, C) = x W_h with collapse_qk
        self.hook_k = HookPoint()    # (B, h, M, d), or (B, 1, M, C) = x with collapse_qk; after the cache
        self.hook_v = HookPoint()    # (B, h, M, d) or (B, 1, M, C) = x W_v with collapse_qk, or x itself
        #                              (B, h|1, M, C) with collapse_vo; after the cache
        self.hook_scores = HookPoint()   # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()  # (B, h, N, d) per-head outputs before proj, or (B, h, N, C) = P_h x

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, collapse_qk={self.collapse_qk}, "
                f"symmetric={self.symmetric}, collapse_vo={self.collapse_vo!r}")

    # --- parameters --------------------------------------------------------------------------

    @staticmethod
    def parameter_count_formula(dim: int, num_heads: int = 8, *, collapse_qk: bool = True,
                                collapse_vo: bool | str = "none", symmetric: bool = False,
                                qkv_bias: bool = False, proj_bias: bool = False) -> int:
        """The number of trainable parameters of this configuration, from the paper's arithmetic."""
        C, h = dim, num_heads
        vo = _vo_mode(collapse_vo)
        if collapse_qk:
            count = h * C * (C + 1) // 2 if symmetric else h * C * C
        else:
            count = (1 if symmetric else 2) * (C * C + (C if qkv_bias else 0))
        if vo == "separate":
            count += 2 * C * C + (C if qkv_bias else 0) + (C if proj_bias else 0)
        elif vo == "one":
            count += h * C * C + (C if proj_bias else 0)
        return count

    def similarity_matrices(self) -> Tensor:
        """W_h (h, C, C) with scores_h = x W_h x^T * scale, for every configuration (no biases)."""
        C, h, d = self.dim, self.num_heads, self.head_dim
        if self.collapse_qk and not self.symmetric:
            return self.qk_weight
        if self.collapse_qk:
            upper = self.qk_triu.new_zeros(h, C, C)
            upper[:, self.triu_index[0], self.triu_index[1]] = self.qk_triu       # (h, C, C), upper
            return upper + upper.triu(1).transpose(-2, -1)                         # symmetric
        w_q = self.qk.weight[:C].reshape(h, d, C)                                  # (h, d, C) = W_q,h^T
        w_k = w_q if self.symmetric else self.qk.weight[C:].reshape(h, d, C)       # (h, d, C) = W_k,h^T
        return w_q.transpose(-2, -1) @ w_k                                         # (h, C, C)

    # --- forward -----------------------------------------------------------------------------

    def _queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, h, N, d|C) and k (B, h|1, N, d|C) such that scores = q k^T * scale."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        if self.collapse_qk:
            q = torch.einsum("bnc,hce->bhne", x, self.similarity_matrices())      # (B, h, N, C)
            return q, x.unsqueeze(1)                                               # k = x: (B, 1, N, C)
        qk = self.qk(x)                                                            # (B, N, 2C) or (B, N, C)
        q = qk[..., :C].reshape(B, N, h, d).transpose(1, 2)                        # (B, h, N, d)
        k = q if self.symmetric else qk[..., C:].reshape(B, N, h, d).transpose(1, 2)
        return q, k

    def scores(self, x: Tensor) -> Tensor:
        """Pre-softmax scores (B, h, N, N) = q k^T * scale, before any mask."""
        check_tokens("minimal", x, self.dim)
        q, k = self._queries_keys(x)
        return torch.einsum("bhne,bhme->bhnm", q, k.expand(-1, self.num_heads, -1, -1)) * self.scale

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("minimal", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k = self._queries_keys(x)
        if self.collapse_qk:
            # One key head: x itself. Values: x W_v + b_v for all heads at once (separate), or x.
            if self.collapse_vo == "separate":
                v = self.v(x).unsqueeze(1)                                         # (B, 1, N, C)
                if cache is not None:
                    k, v = cache.update(k, v)                                      # (B, 1, M, C)
            else:
                # Keys and values are both x: the cache holds x once, as keys, and a zero-width value.
                if cache is not None:
                    k, _ = cache.update(k, k[..., :0])                             # (B, 1, M, C)
                v = k
        else:
            if self.collapse_vo == "separate":
                v = self.v(x).reshape(B, N, h, d).transpose(1, 2)                  # (B, h, N, d)
            else:
                v = x.unsqueeze(1).expand(B, h, N, C)                              # (B, h, N, C)
            if cache is not None:
                k, v = cache.update(k, v)                                          # (B, h, M, d|C)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        if self.collapse_qk and self.collapse_vo == "separate":
            # out (B, h, N, C) averages every head's values; head i keeps its own columns i d:(i+1) d.
            out = out.reshape(B, h, N, h, d).diagonal(dim1=1, dim2=3)              # (B, N, d, h)
            out = out.permute(0, 3, 1, 2)                                          # (B, h, N, d)
        out = self.hook_out(out)                                                   # (B, h, N, d|C)
        if self.collapse_vo == "separate":
            out = out.transpose(1, 2).reshape(B, N, C)                             # (B, N, C)
            out = self.proj(out)
        elif self.collapse_vo == "one":
            out = torch.einsum("bhnc,hce->bne", out, self.vo_weight)               # sum_h (P_h X) W_vo,h
            if self.vo_bias is not None:
                out = out + self.vo_bias
        else:
            out = out.mean(dim=1)                                                  # (B, N, C), mean over heads
        return self.proj_drop(out)
