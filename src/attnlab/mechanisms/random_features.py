"""Random-feature attention: many heads with frozen random query-key matrices, trainable values.

Paper: What can a Single Attention Layer Learn? A Study Through the Random Features Lens
(Fu, Guo, Bai, Mei, 2023), arXiv:2307.11353.
Status: the paper's random-feature attention layer as a sequence mechanism. Head m holds a frozen
W_m (C x C) = qk_mean * I + qk_std * G_m, G_m with iid N(0, 1) entries (the product Q_m^T K_m of
the paper; qk_mean != 0 is the paper's non-zero-mean, identity-mean sampling), drawn once from
`seed`, stored as the paper writes it: `qk_weight[m]` is W_m in the score x_0^T W_m x_i (the query
on the left). Every token is a query:

    phi_m(x_i) = sum_j a(s_ij) x_j,   s_ij = x_i^T W_m x_j * scale          (per head, C-dim)
    y_i = sum_m V_m phi_m(x_i)  =  value([phi_1(x_i), ..., phi_M(x_i)])    (trainable V_m: C x C)

with a = ReLU averaged over the keys query i may see (activation="relu", a(s_ij) = ReLU(s_ij) /
#allowed keys, the paper's 1/N-normalised form) or softmax over them (activation="softmax",
standard attention weights). The default scale is the paper's: 1 for "relu" (its score is the
plain bilinear form x_0^T W_m x_i, no 1/sqrt(d)); 1/sqrt(C) for "softmax", which is not the
paper's model but standard attention, kept at the usual temperature (with W_m ~ N(0, 1/C) entries
and unit-variance tokens the scores have std ~ sqrt(C) at scale 1, which saturates a softmax).
For ReLU (and no float attn_mask bias) the scale only multiplies every feature by the same
constant (ReLU(c s) = c ReLU(s) for c > 0): a fitted random-features model changes only in the
units of its ridge penalty. The output is linear in the trainable parameters, so this is a
random-features model: W_m are buffers (never parameters, never in an optimizer), only the value
matrices (one `value` Linear over the concatenated heads) train.

The paper's single query: f(x_0; x_1..x_N) is one output position. Put x_0 after the keys and hide
it from the keys with a key-padding mask, then read position N (tests check this against the
paper's sum over heads and keys):

    y = m(torch.cat([X, x0[:, None]], 1), attn_mask=[True] * N + [False])[:, N]   # (B, C)

Each output channel c is one scalar model of the paper, with v_m = value.weight[c, m C:(m+1) C].

Source (provenance "reconstruction"): the full text was not reachable from this machine (the
stored copies of the paper are abstracts: arXiv/NeurIPS/OpenReview pages), so no equation number
was checked; the score x_0^T W_m x_i with ReLU and a 1/N average and no 1/sqrt(d) is the paper's
random-feature attention model as quoted second-hand, the rest as the abstract states it.

Deviations and readings:
- The activation: the paper analyses a fixed activation averaged over the N keys (functions of
  the form (1/N) sum_i F(x_0, x_i)); ReLU is the default here, softmax is offered because it is
  the attention people train. Check `activation` against the paper before citing a result.
- The scale: the paper's score is the plain bilinear form x_0^T W_m x_i, the default for "relu";
  `scale` multiplies it (softmax's default is 1/sqrt(C)).
- Variance: entries of G_m are scaled by qk_std (default 1/sqrt(C), i.e. W_m ~ N(qk_mean I, 1/C)).
- The paper studies one layer with scalar output; a C-dim output, multiple queries, causal
  masks, padding and a KV cache (it stores x itself, once for all heads) are the natural
  extensions and leave each output position equal to the paper's formula over its visible keys.
- `num_heads` is M, the number of random features. Heads do not split the width (each W_m acts
  on the whole token), so dim need not be divisible by num_heads, unlike other mechanisms.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.masks import allowed_and_bias
from attnlab._checks import check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

ACTIVATIONS = ("relu", "softmax")


def _relu_mean_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None,
                         scale: float, dropout_p: float, hook_scores=None, hook_weights=None) -> Tensor:
    """out_i = (1 / #allowed_i) sum_j ReLU(q_i.k_j * scale + bias_ij) v_j over allowed keys j.

    q (B, h, N, C), k and v (B, 1, M, C) -> (B, h, N, C); float32 (float64 for float64 input).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhnc,bgmc->bhnm", q.to(compute), k.to(compute)) * scale     # (B, h, N, M)
    if bias is not None:    # a float mask is added to the scores, as for softmax
        scores = scores + torch.where(allowed, bias.to(compute), torch.zeros((), dtype=compute))
    if hook_scores is not None:
        scores = hook_scores(scores)
    weights = torch.where(allowed, F.relu(scores), scores.new_zeros(()))
    count = allowed.sum(-1, keepdim=True).clamp_min(1).to(compute)                      # (B|1, h|1, N, 1)
    probs = weights / count                                                             # empty rows: 0
    if hook_weights is not None:
        probs = hook_weights(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhnm,bgmc->bhnc", probs, v.to(compute))                         # (B, h, N, C)
    return out.to(q.dtype)


@register(MechanismSpec(
    name="random_features",
    paper="What can a Single Attention Layer Learn? A Study Through the Random Features Lens",
    year=2023, family="random_features", layout="seq", time="O(M N C (N + C)) for M heads",
    provenance="reconstruction",
    source="score x_0^T W_m x_i, ReLU, 1/N over the keys, no 1/sqrt(d), arXiv:2307.11353 as quoted second-hand "
           "(full text not reachable here: no equation number checked); W_m = mu I + G_m from the abstract",
    memory="O(M N (C + N)) (O(M N C) on SDPA with softmax)",
    # backends=(): the paper's (and the test config's) relu activation is computed here; only
    # activation="softmax" takes a backend (sdpa, flex or reference, through ops.attention).
    exact=False, causal=True, attn_mask=True, kv_cache=True, backends=(),
    url="https://arxiv.org/abs/2307.11353",
    # scale < 1 keeps the shared suite's outputs O(1) at its width (32) so that its float32
    # tolerances test the code, not the rounding of ~sqrt(C)-times larger outputs at scale 1
    test_kwargs=dict(seed=0, qk_mean=1.0, scale=0.25)))
class RandomFeatureAttention(nn.Module):
    """x (B, N, C) -> (B, N, C) with M = num_heads frozen random query-key matrices.

    Buffers: `qk_weight` (M, C, C), frozen, saved in the state dict, never a parameter.
    Parameters: `value` = Linear(M * C, C), the value matrices [V_1 ... V_M] of all heads.
    Options: `activation` ("relu" (default) or "softmax"), `qk_mean` (the mean of W_m is
    qk_mean * I), `qk_std` (entry std, default 1/sqrt(C)), `seed` (an int makes W reproducible
    and independent of the global RNG), `scale` (default 1, the paper's, for relu; 1/sqrt(C) for
    softmax), `value_bias`, `attn_drop`,
    `proj_drop` (dropout on the output), `backend` (softmax only).
    Hooks (attnlab.hooks): q = x W_m, k = v = x, the scores and the weights on v (eager path:
    always for relu, `backend="reference"` for softmax), out = the features phi_m.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_weights", "hook_out")
    eager_hook_names = ("hook_scores", "hook_weights")

    def __init__(self, dim: int, num_heads: int = 8, *, activation: str = "relu", qk_mean: float = 0.0,
                 qk_std: float | None = None, seed: int | None = None, scale: float | None = None,
                 value_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        name = "random_features"
        for arg, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if isinstance(qk_mean, bool) or not isinstance(qk_mean, (int, float)) or not math.isfinite(qk_mean):
            raise ValueError(f"{name}: qk_mean must be a finite number (the mean of W_m is qk_mean * I), "
                             f"got {qk_mean!r}")
        std = 1.0 / math.sqrt(dim) if qk_std is None else qk_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0.0 <= std < math.inf:
            raise ValueError(f"{name}: qk_std must be a finite number >= 0, got {qk_std!r}")
        if scale is not None:
            check_positive(name, "scale", scale)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"{name}: seed must be an int or None, got {type(seed).__name__}")
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        if backend is not None and activation != "softmax":
            raise ValueError(f"{name}: backend={backend!r} applies to activation='softmax' only "
                             f"(activation={activation!r} is computed here, not by ops.attention)")
        self.dim, self.num_heads = dim, num_heads
        self.activation, self.qk_mean, self.qk_std = activation, float(qk_mean), float(std)
        self.seed = seed
        if scale is None:   # the paper's plain x_0^T W_m x_i for relu; standard attention's for softmax
            scale = 1.0 if activation == "relu" else 1.0 / math.sqrt(dim)
        self.scale = float(scale)
        self.attn_drop, self.backend = attn_drop, backend

        # W_m = qk_mean * I + qk_std * G_m, drawn in float64 on the CPU so a seed gives the same
        # matrices on every device and dtype. A buffer: no gradient, no optimizer state.
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        noise = torch.randn(num_heads, dim, dim, generator=gen, dtype=torch.float64)
        qk = self.qk_mean * torch.eye(dim, dtype=torch.float64) + self.qk_std * noise   # (M, C, C)
        self.register_buffer("qk_weight", qk.to(device=device, dtype=dtype or torch.get_default_dtype()))

        self.value = nn.Linear(num_heads * dim, dim, bias=value_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()    # (B, M, N, C): x_i^T W_m (a row vector per token)
        self.hook_k = HookPoint()    # (B, 1, K, C): the tokens themselves, after the cache
        self.hook_v = HookPoint()    # (B, 1, K, C): the tokens themselves, after the cache
        # The next two fire on the eager path: always for relu, backend="reference" for softmax.
        self.hook_scores = HookPoint()   # (B, M, N, K): x_i^T W_m x_j * scale (+ float mask), before the activation
        self.hook_weights = HookPoint()  # (B, M, N, K): what multiplies v: ReLU(scores) / #keys, or softmax
        self.hook_out = HookPoint()  # (B, M, N, C): the random features phi_m(x_i)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, activation={self.activation!r}, "
                f"qk_mean={self.qk_mean}, qk_std={self.qk_std:.4g}, seed={self.seed}")

    def features(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                 cache: KVCache | None = None) -> Tensor:
        """The random features [phi_1(x_i), ..., phi_M(x_i)]: (B, N, C) -> (B, N, M * C)."""
        check_tokens("random_features", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        h = self.num_heads
        q = torch.einsum("bnc,mcd->bmnd", x, self.qk_weight)               # (B, M, N, C): x_i^T W_m
        k = x[:, None]                                                      # (B, 1, N, C), shared by heads
        v = k
        if cache is not None:
            k, v = cache.update(k, v)                                       # (B, 1, K, C), K = past + N
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.activation == "softmax":
            phi = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_weights,
                            attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                            dropout_p=dropout_p, backend=self.backend)
        else:
            allowed, bias = allowed_and_bias(attn_mask, is_causal, B, h, N, k.shape[2], x.device)
            phi = _relu_mean_attention(q, k, v, allowed, bias, self.scale, dropout_p,
                                       self.hook_scores, self.hook_weights)
        phi = self.hook_out(phi)                                            # (B, M, N, C)
        return phi.transpose(1, 2).reshape(B, N, h * C)                     # (B, N, M C)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        phi = self.features(x, attn_mask=attn_mask, is_causal=is_causal, cache=cache)   # (B, N, M C)
        return self.proj_drop(self.value(phi))                              # (B, N, C)
