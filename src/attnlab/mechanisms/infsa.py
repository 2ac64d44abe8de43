"""Infinite Self-Attention (InfSA) and Linear-InfSA.

Paper: Self-Attention And Beyond the Infinite: Towards Linear Transformers with Infinite
Self-Attention (Roffo, Palmer; 2026), arXiv:2603.00175. Official code:
github.com/giorgioroffo/infinite-self-attention (`infsa/core.py`), read for the formulas, not copied.
The paper's body was not reachable while writing this file; the formulas below follow its
abstract, the equations of the official README and the official `core.py`, so they are cited by
name (README "How it works", `pure_infsa_scores`, `linear_infsa_scores`), not by equation number.

`infsa` (quadratic). Per head, with q, k, v (N, d) and scale = 1/d as in the official code:

    A      = [q k^T * scale]_+                                  ReLU affinities, (N, N)
    A_hat  = A / (||A||_F + eps)           norm="frobenius"     README, `pure_infsa_scores`
    A_hat  = A / (A 1 + eps)  (per row)    norm="row"           the random-walk matrix (below)
    out    = gamma A_hat v                                       variant="official" (default): one hop
    out    = sum_{t=1..T} gamma^t A_hat^t v                      variant="series", hops=T: truncated
    out    = ((I - gamma A_hat)^-1 - I) v                        variant="series" (hops=None): T -> inf

The default, variant="official", is the released layer: one hop, `pure_infsa_scores(q, k, rho) @ v`
(`infsa_attention` with its "pure_infsa" variant in `infsa/core.py`, called by
`InfSAAttention.forward` in `infsa/attention.py`). The higher powers of the series are not
summed inside a layer there: the official core says multi-hop behaviour "emerges through stacked
layers". variant="series" sums them within one layer instead: the README's spectral form, the
discounted Neumann series, truncated after `hops` terms or (hops=None) summed to infinity and
computed as the solution X of (I - gamma A_hat) X = gamma A_hat v (`torch.linalg.solve_ex`,
differentiable; `solve_triangular` when causal). It converges for gamma in (0, 1): with the
Frobenius normaliser ||A_hat||_2 <= ||A_hat||_F <= 1, with the row normaliser ||A_hat||_inf <= 1.

`linear_infsa` (linear time, fixed-size state). Per head, official `linear_infsa_scores`:

    e_i   = ||q_i|| (q, k scaled by sqrt(scale)),  q_bar = sum_i e_i q_i / (sum_i e_i + eps)  state (d)
    r_j   = [q_bar . k_j]_+,                       a = r / (sum_j r_j + eps)                  (N)
    out_i = gamma * sum_j a_j v_j           (the same pooled vector for every token)

a approximates the principal left eigenvector of A = [q k^T scale]_+ (the eigenvector
centrality of the token graph, c = A^T c): it is one power-iteration step from the start vector
e / sum(e), with the ReLU moved outside the sum over queries ([sum_i w_i q_i . k_j]_+ instead
of sum_i w_i [q_i . k_j]_+; equal when all affinities are non-negative). Computed in two passes
over chunks of `chunk_size` tokens (pass 1 pools q_bar, pass 2 accumulates sum_j r_j v_j and
sum_j r_j), so the memory beyond the input and output is O(chunk_size * C) and the state per head
is d + d + 1 numbers whatever N is. The output is one vector per (sample, head), projected once
and expanded to every token.

Status: both mechanisms as above, fp32 internals (fp64 for fp64 input). The defaults compute what
the official layers compute (`infsa`: one hop; `linear_infsa`: one pooled vector; both without
attn_drop in training, see Deviations); outputs and gradients are checked against naive float64
references of the official formulas, of the series and its closed form, and the eigenvector
(tests/mechanisms/test_infsa.py). With random weights the cosine between a and the
principal eigenvector is 0.62-0.69 for isotropic tokens and 0.87-0.90 for tokens sharing a
direction (the paper reports 0.985 for trained models); it is exactly 1 for a rank-one operator.
`scripts/infsa_scale.py` runs Linear-InfSA on 576 x 576 tokens (dim 384, 6 heads) on a CPU.

Deviations and readings:
- scale = 1/d (q and k each divided by sqrt(d)), as the official code, not softmax's 1/sqrt(d).
  Both normalisers and the pooled weights are invariant to it except through eps and additive
  float masks.
- variant="series" (not the default: that is the released layer) is the paper's spectral form inside one layer;
  the official code has no such layer. Its series starts at t = 1, as in the README's limit
  (I - gamma A_hat)^-1 - I: the t = 0 term is v itself, a skip connection that the block's
  residual already provides. variant="official" accepts hops=None or 1 only.
- gamma is learnable by default (sigmoid of a logit, `learn_gamma=True`), as the official module
  intends (its `rho_logit` parameter; its forward takes `.item()`, which cuts the gradient to rho,
  a bug we do not copy). `learn_gamma=False` keeps it fixed.
- norm="row" is not the official normaliser. It is the paper's Markov-chain reading made
  literal: A_hat is the transition matrix of the random walk on the token graph, and
  (I - gamma A_hat)^-1 the fundamental matrix of the chain absorbed with probability 1 - gamma per
  step. Its normaliser is per row, so it is causal; the Frobenius one is not (below).
- Causal (`infsa`): with norm="frobenius" the normaliser ||A||_F sums every row, later ones
  included, so output i depends on every token even when A is lower-triangular: refused with
  NotImplementedError (spec.causal is False: the paper's default mechanism is not causal).
  With norm="row" a causal A_hat is lower-triangular, each row depends only on its own query and
  earlier keys, and the series is a forward substitution: is_causal is supported there
  (bottom-right aligned, ANDed with attn_mask), tested in test_infsa.py, not by the shared suite.
- Causal (`linear_infsa`): the prefix form needs q_bar_i per position and [q_bar_i . k_j]_+
  does not factor through a fixed-size state (the ReLU kernel has no finite feature map), so a
  causal version is O(N^2): refused (NotImplementedError). No KV cache for either mechanism.
- Masks: bool masks remove edges of the token graph (A_ij = 0); float masks are added to the
  scores before the ReLU (-inf removes the edge), so bool and float masks agree, and a (B, M)
  key-padding mask means exactly what its expansion to (B, h, N, M) means. A token that no query
  may attend (a padding token) has no in-edge, so its eigenvector centrality is 0 (c_r =
  sum_i A_ir c_i) and no walk of the series passes through it. Two things follow from that, and
  keep a padding token's query from reaching the other outputs: `infsa`'s Frobenius normaliser is
  the norm of the rows of the tokens that can be attended (the part the series iterates on; the
  spectrum of A_hat is that part's, so convergence is unchanged), and `linear_infsa` leaves such
  tokens out of q_bar (the start vector). Their own outputs are computed as for any query. In the
  closed form their rows are solved apart (X_r = gamma A_hat_r (v + X)), which is the same
  solution but keeps their values out of the LU pivoting of the others. With a full (N, M)
  pattern each query of `linear_infsa` has its own key set, so that case costs O(N M d) (the
  mask itself is N x M); key padding stays O(N).
- A query with no allowed key gets a zero attention output (then proj), as everywhere in attnlab.
- Dropout (`attn_drop`, training only): `infsa` drops edges of A before the normaliser, so A_hat
  keeps its bound and the series still converges (dropping A_hat's entries after it and rescaling
  by 1/(1-p), as the official single-hop code does, can push gamma A_hat's spectral radius past 1);
  the one-hop default drops the same way, so with attn_drop > 0 in training it is not the official
  computation (which normalises by the undropped A's norm and drops after). `linear_infsa` drops
  importance weights in the numerator, as the official code drops its scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.masks import causal_grid, check_attn_mask
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.registry import MechanismSpec, register

URL = "https://arxiv.org/abs/2603.00175"
PAPER = "Self-Attention And Beyond the Infinite: Towards Linear Transformers with Infinite Self-Attention"
NORMS = ("frobenius", "row")
VARIANTS = ("official", "series")  # infsa: one hop (the released layer), or the series in one layer
SOURCE = "giorgioroffo/infinite-self-attention"


# --- option checks shared by both mechanisms --------------------------------------------------

def _check_gamma(name: str, gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"{name}: gamma must be a float in the open interval (0, 1), got {gamma!r}")
    return float(gamma)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Normalisers and the solve run in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _GammaMixin:
    """gamma = sigmoid(gamma_logit): a parameter (learn_gamma=True) or a buffer."""

    def _init_gamma(self, gamma: float, learn_gamma: bool, factory: dict) -> None:
        if not isinstance(learn_gamma, bool):
            raise TypeError(f"{self.spec.name}: learn_gamma must be a bool, got {type(learn_gamma).__name__}")
        logit = torch.tensor(math.log(gamma / (1.0 - gamma)), **factory)
        if learn_gamma:
            self.gamma_logit = nn.Parameter(logit)
        else:
            self.register_buffer("gamma_logit", logit)

    @property
    def gamma(self) -> Tensor:
        """The discount gamma in (0, 1), a 0-d tensor (differentiable when learnable)."""
        return torch.sigmoid(self.gamma_logit)


def _attended(mask: Tensor | None, is_causal: bool = False) -> Tensor | None:
    """(B|1, h|1, M) bool: True for the keys that at least one query may attend (the tokens with an
    in-edge), from the checked 4-D mask and is_causal (under which every key is attended by its own
    query). None when every key is."""
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask != float("-inf")    # (B|1, h|1, N|1, M)
    if is_causal:  # self-attention: N == M
        M = allowed.shape[-1]
        allowed = allowed & causal_grid(M, M, allowed.device)
    return allowed.any(-2)


def _masked_relu(scores: Tensor, mask: Tensor | None) -> Tensor:
    """[scores + float mask]_+, or [scores]_+ with the disallowed (bool False) entries set to 0."""
    if mask is None:
        return scores.relu()
    if mask.dtype == torch.bool:
        return scores.relu().masked_fill(~mask, 0.0)
    return (scores + mask.to(scores.dtype)).relu()


# --- InfSA ------------------------------------------------------------------------------------

def neumann_series(a_hat: Tensor, v: Tensor, gamma: Tensor | float, hops: int | None,
                   lower: bool = False, attended: Tensor | None = None) -> Tensor:
    """sum_{t=1..hops} gamma^t a_hat^t v, or with hops=None the closed form ((I - gamma a_hat)^-1 - I) v.

    a_hat (..., N, N), v (..., N, dv) -> (..., N, dv). `lower=True` says a_hat is lower-triangular
    (causal) and solves by forward substitution, so row i never reads rows after it. `attended`
    (..., N) bool, if given, must be False only for tokens whose column of a_hat is zero; their
    rows are then solved apart (same result, but their values stay out of the others' pivoting).

    Equivalent PyTorch:
        eye = torch.eye(N)
        out = (torch.linalg.inv(eye - gamma * a_hat) - eye) @ v
    """
    if hops is not None:
        out, term = torch.zeros_like(v), v
        for _ in range(hops):
            term = gamma * (a_hat @ term)            # gamma^t A_hat^t v
            out = out + term
        return out
    sources = None
    if attended is not None:
        sources = ~attended[..., :, None]            # (..., N, 1): rows of tokens nobody attends
        a_hat, a_sources = a_hat.masked_fill(sources, 0.0), a_hat.masked_fill(~sources, 0.0)
    N = a_hat.shape[-1]
    system = torch.eye(N, dtype=a_hat.dtype, device=a_hat.device) - gamma * a_hat   # (..., N, N)
    rhs = gamma * (a_hat @ v)                        # (I - g A)^-1 g A v = ((I - g A)^-1 - I) v, no cancellation
    if lower:
        out = torch.linalg.solve_triangular(system, rhs, upper=False)
    else:
        out, _ = torch.linalg.solve_ex(system, rhs)  # no error check: NaN input stays in its own sample
    if sources is not None:                          # X_r = gamma A_hat_r (v + X): one more step into them
        out = out + gamma * (a_sources @ (v + out))
    return out


@register(MechanismSpec(
    name="infsa", paper=PAPER, year=2026, family="spectral", layout="seq",
    time="O(N^2 d) (series: O(N^3 + N^2 d), O(hops N^2 d) truncated)", memory="O(N^2)", exact=False,
    causal=False, attn_mask=True, kv_cache=False, url=URL, variants=VARIANTS,
    provenance="official-code", source=f"{SOURCE} infsa/core.py::pure_infsa_scores",
    test_kwargs=dict(qkv_bias=True), test_configs=(dict(qkv_bias=True, variant="series"),)))
class InfiniteSelfAttention(_GammaMixin, nn.Module):
    """x (B, N, C) -> (B, N, C): gamma A_hat v, the normalised ReLU attention applied once (the
    official layer), or its discounted Neumann series (variant="series").

    Options: `variant` ("official", the default: one hop, `pure_infsa_scores(q, k, rho) @ v`;
    "series": the series within the layer), `hops` (series only: None sums it to infinity, an
    int T >= 1 keeps the first T terms; "official" takes None or 1), `gamma` (discount, in (0, 1),
    default 0.95 as the official rho_init), `learn_gamma`, `norm` ("frobenius", the official;
    "row", the random-walk matrix, which also supports is_causal), `scale` (default 1/d as in the
    official code), `eps`.
    Hooks (attnlab.hooks): always eager (no backend), so every hook fires on every forward.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ()

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, proj_bias: bool = True, gamma: float = 0.95, learn_gamma: bool = True,
                 variant: str = "official", hops: int | None = None, norm: str = "frobenius",
                 scale: float | None = None, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        name = "infsa"
        self.head_dim = check_dims(name, dim, num_heads)
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        gamma = _check_gamma(name, gamma)
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}")
        if hops is not None and (isinstance(hops, bool) or not isinstance(hops, int) or hops < 1):
            raise ValueError(f"{name}: hops must be None (the infinite series) or an int >= 1, got {hops!r}")
        if variant == "official":
            if hops not in (None, 1):
                raise ValueError(f"{name}: variant='official' is one hop, got hops={hops!r}; "
                                 "use variant='series' for more hops")
            hops = 1
        if not isinstance(norm, str) or norm not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
        self.scale = 1.0 / self.head_dim if scale is None else check_positive(name, "scale", scale)
        self.eps = check_positive(name, "eps", eps)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.variant, self.hops, self.norm, self.attn_drop = variant, hops, norm, attn_drop
        self._init_gamma(gamma, learn_gamma, factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()      # (B, h, N, d)
        self.hook_k = HookPoint()      # (B, h, N, d)
        self.hook_v = HookPoint()      # (B, h, N, d)
        self.hook_scores = HookPoint()  # (B, h, N, N): q k^T * scale, before the ReLU and the mask
        self.hook_probs = HookPoint()  # (B, h, N, N): A_hat, the normalised one-hop matrix
        self.hook_out = HookPoint()    # (B, h, N, d): one hop or the series, before proj

    def extra_repr(self) -> str:
        hops = "inf" if self.hops is None else self.hops
        return (f"dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}, "
                f"norm={self.norm!r}, hops={hops}")

    def attention_matrix(self, q: Tensor, k: Tensor, attn_mask: Tensor | None = None,
                         is_causal: bool = False) -> Tensor:
        """A_hat (B, h, N, N) in q's dtype from q, k (B, h, N, d); `attn_mask` already checked (4-D)."""
        N = q.shape[-2]
        root = math.sqrt(self.scale)
        scores = self.hook_scores((q * root) @ (k * root).transpose(-2, -1))  # (B, h, N, N)
        a = _masked_relu(scores, attn_mask)                         # A, non-negative
        if is_causal:
            a = a.masked_fill(~causal_grid(N, N, q.device), 0.0)
        if self.training and self.attn_drop > 0.0:                  # drop edges before normalising
            a = F.dropout(a, self.attn_drop)
        if self.norm == "frobenius":
            attended = _attended(attn_mask, is_causal)              # (B|1, h|1, N) or None
            iterated = a if attended is None else a.masked_fill(~attended[..., :, None], 0.0)
            total = torch.linalg.vector_norm(iterated, dim=(-2, -1), keepdim=True)  # (B, h, 1, 1)
            return a / (total + self.eps)
        return a / (a.sum(-1, keepdim=True) + self.eps)             # row-stochastic (or zero) rows

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("infsa", x, self.dim)
        check_features(self, attn_mask=attn_mask, cache=cache)
        if is_causal and self.norm != "row":
            raise NotImplementedError(
                "mechanism 'infsa' does not support causal with norm='frobenius': the Frobenius norm of the "
                "whole attention matrix makes every output depend on every token; norm='row' is causal")
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        if attn_mask is not None:
            attn_mask = check_attn_mask(attn_mask, B, h, N, N).to(x.device)
        cdt = _compute_dtype(x.dtype)
        q, k, v = self.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        a_hat = self.attention_matrix(q.to(cdt), k.to(cdt), attn_mask, is_causal)     # (B, h, N, N)
        a_hat = self.hook_probs(a_hat)
        out = neumann_series(a_hat, v.to(cdt), self.gamma.to(cdt), self.hops, lower=is_causal,
                             attended=_attended(attn_mask, is_causal))
        out = self.hook_out(out.to(x.dtype))                        # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                  # (B, N, C)
        return self.proj_drop(self.proj(out))

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[float, float]:
        """Projections, scores, A_hat v, and the LU (2/3 N^3) with two triangular solves (2 N^2 d)
        per head for the closed form (one triangular solve, causal), or hops products A_hat @ (N, d).
        FlopCounterMode does not count linalg solves. Backward counted as twice the forward."""
        B, N, C, h = batch, seq_len, dim, num_heads
        d = C // h
        proj = 2 * B * N * C * 4 * C
        per_head = 2 * N * N * d                                    # q k^T
        if self.hops is None:
            per_head += 2 * N * N * d                               # A_hat v
            per_head += N * N * d if causal else (2 / 3) * N ** 3 + 2 * N * N * d
        else:
            per_head += self.hops * 2 * N * N * d
        fwd = proj + B * h * per_head
        return float(fwd), float(2 * fwd)


# --- Linear-InfSA -----------------------------------------------------------------------------

@register(MechanismSpec(
    name="linear_infsa", paper=PAPER, year=2026, family="spectral", layout="seq",
    time="O(N d)", memory="O(d) state per head", exact=False,
    causal=False, attn_mask=True, kv_cache=False, url=URL,
    provenance="official-code", source=f"{SOURCE} infsa/core.py::linear_infsa_scores",
    test_kwargs=dict(qkv_bias=True, chunk_size=4)))
class LinearInfiniteSelfAttention(_GammaMixin, nn.Module):
    """x (B, N, C) -> (B, N, C): every token receives gamma * sum_j a_j v_j, with a the one-step
    power-iteration estimate of the attention graph's eigenvector centrality (module docstring).

    Options: `gamma` (default 0.95, official rho_init), `learn_gamma`, `scale` (default 1/d),
    `eps`, `chunk_size` (tokens per pass step, default 16384; only memory depends on it).
    Hooks (attnlab.hooks): q, k and v are projected chunk by chunk and never exist whole, so the
    hooks are the pooled query q_bar (`hook_state`) and the pooled output (`hook_out`).
    """

    hook_names = ("hook_state", "hook_out")
    eager_hook_names = ()
    absent_hooks = {name: "q, k and v are projected chunk by chunk (O(chunk_size C) memory); no (B, h, N, d) "
                          "tensor exists to hook" for name in ("hook_q", "hook_k", "hook_v")}
    absent_hooks.update({name: "the linear form never builds the (N, N) matrix: the pooled query replaces it "
                               "(hook_state)" for name in ("hook_scores", "hook_probs")})

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, proj_bias: bool = True, gamma: float = 0.95, learn_gamma: bool = True,
                 scale: float | None = None, eps: float = 1e-6, chunk_size: int = 16384,
                 device=None, dtype=None):
        super().__init__()
        name = "linear_infsa"
        self.head_dim = check_dims(name, dim, num_heads)
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        gamma = _check_gamma(name, gamma)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be an int >= 1, got {chunk_size!r}")
        self.scale = 1.0 / self.head_dim if scale is None else check_positive(name, "scale", scale)
        self.eps = check_positive(name, "eps", eps)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.chunk_size, self.attn_drop = dim, num_heads, chunk_size, attn_drop
        self._init_gamma(gamma, learn_gamma, factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_state = HookPoint()  # (B, h, d): q_bar, the pooled query
        self.hook_out = HookPoint()    # (B, h, 1 or N, d): the pooled output, before proj

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, chunk_size={self.chunk_size}"

    def _project(self, x: Tensor, part: int, cdt: torch.dtype) -> Tensor:
        """One of q (0), k (1), v (2) of a chunk x (B, n, C) -> (B, h, n, d) in the compute dtype."""
        B, n, C = x.shape
        rows = slice(part * C, (part + 1) * C)
        bias = None if self.qkv.bias is None else self.qkv.bias[rows]
        t = F.linear(x, self.qkv.weight[rows], bias)                # (B, n, C)
        return t.reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2).to(cdt)  # (B, h, n, d)

    def pooled_query(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Pass 1: q_bar (B, h, d) = sum_i ||q_i|| q_i / (sum_i ||q_i|| + eps), q scaled by sqrt(scale),
        over the tokens some query may attend (`padding` (B|1, h|1, N) bool, False = left out)."""
        B, N, _ = x.shape
        cdt = _compute_dtype(x.dtype)
        root = math.sqrt(self.scale)
        num = x.new_zeros(B, self.num_heads, self.head_dim, dtype=cdt)   # (B, h, d)
        den = x.new_zeros(B, self.num_heads, dtype=cdt)                  # (B, h)
        for s in range(0, N, self.chunk_size):
            e = min(s + self.chunk_size, N)
            q = self._project(x[:, s:e], 0, cdt) * root                  # (B, h, n, d)
            energy = torch.linalg.vector_norm(q, dim=-1)                 # (B, h, n)
            if padding is not None:
                energy = energy.masked_fill(~padding[..., s:e], 0.0)
            num = num + torch.einsum("bhn,bhnd->bhd", energy, q)
            den = den + energy.sum(-1)
        return num / (den + self.eps)[..., None]

    def pooled_output(self, x: Tensor, q_bar: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pass 2: gamma * sum_j a_j v_j, (B, h, Nq, d) with Nq = 1 unless `mask` is a full pattern."""
        B, N, _ = x.shape
        cdt = q_bar.dtype
        root = math.sqrt(self.scale)
        num = den = None
        for s in range(0, N, self.chunk_size):
            e = min(s + self.chunk_size, N)
            k = self._project(x[:, s:e], 1, cdt) * root                  # (B, h, n, d)
            v = self._project(x[:, s:e], 2, cdt)                         # (B, h, n, d)
            scores = torch.einsum("bhd,bhnd->bhn", q_bar, k)[..., None, :]  # (B, h, 1, n)
            w = _masked_relu(scores, None if mask is None else mask[..., s:e])  # (B, h, Nq, n)
            w_num = F.dropout(w, self.attn_drop) if self.training and self.attn_drop > 0.0 else w
            part_num, part_den = w_num @ v, w.sum(-1)                    # (B, h, Nq, d), (B, h, Nq)
            num = part_num if num is None else num + part_num
            den = part_den if den is None else den + part_den
        if num is None:                                                  # N == 0
            return q_bar.new_zeros(B, self.num_heads, 1, self.head_dim)
        return self.gamma.to(cdt) * num / (den + self.eps)[..., None]

    @torch.no_grad()
    def importance(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """a (B, h, N): the token importance (approximate eigenvector centrality) the forward uses,
        sum 1 per head (0 where nothing may be attended). For inspection; `attn_mask` may be a
        key-padding mask only (a full pattern gives every query its own weights)."""
        check_tokens("linear_infsa", x, self.dim)
        B, N, _ = x.shape
        if attn_mask is not None:
            attn_mask = check_attn_mask(attn_mask, B, self.num_heads, N, N).to(x.device)
            if attn_mask.shape[-2] != 1:
                raise ValueError("linear_infsa.importance: expected a key-padding mask (B, M) or one with a "
                                 f"query axis of size 1, got a pattern of shape {tuple(attn_mask.shape)}")
        q_bar = self.pooled_query(x, _attended(attn_mask))               # (B, h, d)
        root = math.sqrt(self.scale)
        parts = []
        for s in range(0, N, self.chunk_size):
            e = min(s + self.chunk_size, N)
            k = self._project(x[:, s:e], 1, q_bar.dtype) * root          # (B, h, n, d)
            scores = torch.einsum("bhd,bhnd->bhn", q_bar, k)[..., None, :]  # (B, h, 1, n)
            parts.append(_masked_relu(scores, None if attn_mask is None else attn_mask[..., s:e])[..., 0, :])
        r = torch.cat(parts, -1) if parts else q_bar.new_zeros(B, self.num_heads, 0)  # (B, h, N)
        return r / (r.sum(-1, keepdim=True) + self.eps)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("linear_infsa", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        if attn_mask is not None:
            attn_mask = check_attn_mask(attn_mask, B, self.num_heads, N, N).to(x.device)
        q_bar = self.hook_state(self.pooled_query(x, _attended(attn_mask)))   # (B, h, d)
        out = self.hook_out(self.pooled_output(x, q_bar, attn_mask).to(x.dtype))  # (B, h, Nq, d)
        Nq = out.shape[2]
        out = out.transpose(1, 2).reshape(B, Nq, C)                     # (B, Nq, C)
        out = self.proj(out).expand(B, N, C).contiguous()               # (B, N, C): Nq is 1 or N
        return self.proj_drop(out)
