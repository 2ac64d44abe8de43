"""Proxima attention and Combined attention (MHSA fused with Proxima), from HTR-JAND.

Paper: HTR-JAND: Handwritten Text Recognition with Joint Attention Network and Knowledge
Distillation (Hamdan, Rahiche, Cheriet; arXiv 2412.18524, Dec 2024 / 2025).
Implements:
- `proxima`: multi-head softmax attention whose scores carry a per-head proximity prior, a
  Gaussian in the distance between token positions with a learned width sigma_h:

      scores_hij = q_hi . k_hj / sqrt(d) - (p_i - p_j)^2 / (2 sigma_h^2)
      out_hi     = sum_j softmax_j(scores_hi) v_hj

  i.e. the softmax weights are exp(q.k / sqrt(d)) * exp(-(p_i - p_j)^2 / (2 sigma^2)),
  content similarity multiplied by closeness ("proxima"). sigma_h = exp(log_sigma_h).
- `combined`: the paper's Combined Attention, a learned convex mix of a standard MHSA branch
  and a Proxima branch, each with its own q/k/v and output projections:

      combined(x) = alpha * mhsa(x) + (1 - alpha) * proxima(x),   alpha = sigmoid(gate_logit)

Status: reconstruction. The HTR-JAND abstract names the two mechanisms ("a Combined Attention
mechanism fusing Multi-Head Self-Attention with Proxima Attention") but the paper body (its
equations) and the official repository (github.com/DocumentRecognitionModels/HTR-JAND, a dead
link) could not be consulted while writing this file, so no equation numbers are cited. The
formulas above are the reading that the name, the abstract and the HTR setting (neighbouring
columns of a text-line feature map belong to the same character) support best; they should be
checked against the paper's Section on the Combined Attention when it is at hand.
What can be consulted: the paper's HTML (arxiv.org/html/2412.18524v1) is stored by
the search service, but only its title and abstract could be read through it; no mirror of the
body, no citing paper describing Proxima Attention's formula, and no copy of the code were
found, and the code link is dead (paperswithnocode.com/paper/2412.18524: "Declared Dead",
404). Both specs stay provenance="reconstruction": everything below the abstract's two
sentences (the Gaussian form, the learned width, the scalar gate) is guessed.
Deviations (readings chosen):
- Proximity prior: Gaussian in |i - j| added to the logits (a multiplicative kernel on the
  softmax weights), one learned width per head, initialised to `sigma` tokens. An additive log
  kernel keeps every row a proper softmax (masks, causal and the KV cache then work as for
  mhsa); a kernel multiplied into the *logits* would not suppress distant keys.
  sigma -> inf gives mhsa exactly, sigma -> 0 gives each token attending only to itself.
- Positions are absolute token indices aligned like `is_causal` (bottom-right): with a KV
  cache the new queries sit at the end of the M cached keys, so cached decoding equals the full
  forward.
- Fusion: one learned scalar gate, alpha = sigmoid(gate_logit), initialised at 0.5
  (gate_logit = 0). gate_logit -> +inf gives mhsa, -> -inf gives proxima. The branches do not
  share projections (a mix of two attention maps over shared values would be the other
  reading; separate branches are what "fusing MHSA with Proxima Attention" describes).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.masks import check_attn_mask
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

PAPER = "HTR-JAND: Handwritten Text Recognition with Joint Attention Network and Knowledge Distillation"
URL = "https://arxiv.org/abs/2412.18524"
# Only the title and abstract were readable (arXiv 2412.18524); the code link
# (github.com/DocumentRecognitionModels/HTR-JAND) is dead. What was guessed:
SOURCE_PROXIMA = ("title + abstract only (arXiv 2412.18524; code repository 404). Guessed: softmax "
                  "attention plus a per-head Gaussian proximity bias -(p_i - p_j)^2 / (2 sigma_h^2) "
                  "on the logits, learned log-width, absolute positions aligned like is_causal")
SOURCE_COMBINED = ("title + abstract only (arXiv 2412.18524; code repository 404): 'a Combined Attention "
                   "mechanism fusing Multi-Head Self-Attention with Proxima Attention'. Guessed: "
                   "sigmoid(g) * mhsa(x) + (1 - sigmoid(g)) * proxima(x), separate projections, one "
                   "learned scalar gate")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def proximity_bias(log_sigma: Tensor, N: int, M: int, dtype: torch.dtype) -> Tensor:
    """-(p_i - p_j)^2 / (2 sigma_h^2) as (h, N, M); query i is position M - N + i."""
    device = log_sigma.device
    query_pos = torch.arange(M - N, M, device=device, dtype=dtype)            # (N,)
    key_pos = torch.arange(M, device=device, dtype=dtype)                     # (M,)
    dist2 = (query_pos[:, None] - key_pos[None, :]) ** 2                      # (N, M)
    inv_two_var = 0.5 * torch.exp(-2.0 * log_sigma.to(dtype))                 # (h,) = 1 / (2 sigma^2)
    return -inv_two_var[:, None, None] * dist2                                # (h, N, M)


def with_proximity(bias: Tensor, attn_mask: Tensor | None, B: int, N: int, M: int) -> Tensor:
    """One float mask (B|1, h, N, M): the proximity bias, -inf where `attn_mask` forbids."""
    h = bias.shape[0]
    bias = bias[None]                                                         # (1, h, N, M)
    if attn_mask is None:
        return bias
    mask = check_attn_mask(attn_mask, B, h, N, M).to(bias.device)            # 4-D, broadcastable
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.to(bias.dtype)


@register(MechanismSpec(
    name="proxima", paper=PAPER, year=2024, family="softmax", layout="seq",
    time="O(N^2 d)", memory="O(N^2) (materialised proximity bias)", exact=False,
    causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url=URL, provenance="reconstruction", source=SOURCE_PROXIMA,
    test_kwargs=dict(qkv_bias=True, sigma=2.0)))
class ProximaAttention(nn.Module):
    """x (B, N, C) -> (B, N, C): softmax attention with a learned Gaussian proximity prior.

    Parameters are timm's (`qkv`, `proj`) plus `log_sigma` (h,), the log width of each head's
    proximity prior in tokens. `learn_sigma=False` keeps the widths fixed (a buffer).
    Hooks (attnlab.hooks): scores and probs on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sigma: float = 4.0, learn_sigma: bool = True,
                 scale: float | None = None, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims("proxima", dim, num_heads)
        check_dropout("proxima", attn_drop=attn_drop, proj_drop=proj_drop)
        sigma = check_positive("proxima", "sigma", sigma)
        if scale is not None:
            scale = check_positive("proxima", "scale", scale)
        if not isinstance(learn_sigma, bool):
            raise TypeError(f"proxima: learn_sigma must be a bool, got {learn_sigma!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.scale, self.backend, self.attn_drop = scale, backend, float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        log_sigma = torch.full((num_heads,), math.log(sigma), **factory)
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.hook_q = HookPoint()    # (B, h, N, d)
        self.hook_k = HookPoint()    # (B, h, M, d), after the cache
        self.hook_v = HookPoint()    # (B, h, M, d), after the cache
        self.hook_scores = HookPoint()  # (B, h, N, M), the softmax input with the proximity bias (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()  # (B, h, N, d), per-head outputs before proj

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)    # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # 3 x (B, h, N, d)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """(B, h, N, d) x (B, h, M, d) x 2 -> (B, h, N, d) with the proximity prior."""
        B, N, M = q.shape[0], q.shape[2], k.shape[2]
        bias = proximity_bias(self.log_sigma, N, M, _compute_dtype(q.dtype))  # (h, N, M)
        mask = with_proximity(bias, attn_mask, B, N, M)                        # (B|1, h, N, M)
        return attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                         attn_mask=mask, is_causal=is_causal, scale=self.scale,
                         dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("proxima", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.update(k, v)                                         # (B, h, M, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = self.hook_out(self.attend(q, k, v, attn_mask, is_causal))       # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                            # (B, N, C)
        return self.proj_drop(self.proj(out))


@register(MechanismSpec(
    name="combined", paper=PAPER, year=2024, family="softmax", layout="seq",
    time="O(N^2 d)", memory="O(N^2) (materialised proximity bias)", exact=False,
    causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url=URL, provenance="reconstruction", source=SOURCE_COMBINED,
    test_kwargs=dict(qkv_bias=True, sigma=2.0, gate_init=0.5)))
class CombinedAttention(nn.Module):
    """x (B, N, C) -> (B, N, C): alpha * mhsa(x) + (1 - alpha) * proxima(x), alpha learned.

    The MHSA branch is `qkv` / `proj` (the names mhsa uses, so an mhsa state dict loads into it
    with strict=False); the Proxima branch is the submodule `proxima`. One KVCache serves both:
    it holds 2h heads, the MHSA branch's first.
    Hooks (attnlab.hooks): the MHSA branch's here; the Proxima branch's scores and probs are
    `proxima.hook_scores` / `proxima.hook_probs` (its q/k/v/out hooks do not fire inside
    combined). Scores and probs fire on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sigma: float = 4.0, learn_sigma: bool = True,
                 gate_init: float = 0.0, scale: float | None = None, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims("combined", dim, num_heads)
        check_dropout("combined", attn_drop=attn_drop, proj_drop=proj_drop)
        if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not math.isfinite(gate_init):
            raise ValueError(f"combined: gate_init must be a finite number (a logit), got {gate_init!r}")
        check_positive("combined", "sigma", sigma)
        if scale is not None:
            scale = check_positive("combined", "scale", scale)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.scale, self.backend, self.attn_drop = scale, backend, float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)          # MHSA branch
        self.proj = nn.Linear(dim, dim, **factory)
        self.proxima = ProximaAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                        proj_drop=0.0, sigma=sigma, learn_sigma=learn_sigma,
                                        scale=scale, backend=backend, **factory)
        self.gate_logit = nn.Parameter(torch.tensor(float(gate_init), **factory))
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()    # (B, h, N, d), MHSA branch
        self.hook_k = HookPoint()    # (B, h, M, d), MHSA branch, after the cache
        self.hook_v = HookPoint()    # (B, h, M, d), MHSA branch, after the cache
        self.hook_scores = HookPoint()  # (B, h, N, M), MHSA branch, the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, N, M), MHSA branch, the softmax output (eager path only)
        self.hook_out = HookPoint()  # (B, N, C), the fused output alpha mhsa + beta proxima, before dropout

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    @property
    def alpha(self) -> Tensor:
        """The MHSA branch's weight, sigmoid(gate_logit)."""
        return torch.sigmoid(self.gate_logit)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("combined", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        pq, pk, pv = self.proxima.project(x)                                  # 3 x (B, h, N, d)
        if cache is not None:
            k_all, v_all = cache.update(torch.cat([k, pk], dim=1), torch.cat([v, pv], dim=1))  # (B, 2h, M, d)
            k, pk = k_all[:, :h], k_all[:, h:]                                # (B, h, M, d) each
            v, pv = v_all[:, :h], v_all[:, h:]
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        mhsa = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                         attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                         dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        mhsa = self.proj(mhsa.transpose(1, 2).reshape(B, N, C))               # (B, N, C)
        prox = self.proxima.attend(pq, pk, pv, attn_mask, is_causal)          # (B, h, N, d)
        prox = self.proxima.proj(prox.transpose(1, 2).reshape(B, N, C))       # (B, N, C)
        # sigmoid(-g) rather than 1 - sigmoid(g): each limit (g -> +-inf) is then exact.
        alpha, beta = torch.sigmoid(self.gate_logit).to(mhsa.dtype), torch.sigmoid(-self.gate_logit).to(mhsa.dtype)
        out = self.hook_out(alpha * mhsa + beta * prox)                       # (B, N, C)
        return self.proj_drop(out)
