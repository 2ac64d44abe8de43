"""Mixture-of-Head attention (MoH): heads as experts, chosen per token by a router.

Paper: MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yuan, Yan; 2024,
arXiv 2410.11842; ICML 2025).
Official code: github.com/SkyworkAI/MoH, read for the formulas, not copied.
Sec. 3.2: multi-head attention in summation form is Σ_i H^i W_O^i (Eq. 3), H^i the
output of head i and W_O^i its slice of the output projection. MoH weights the sum (Eq. 4):

    MoH(x_t) = Σ_i g_i(x_t) H^i_t W_O^i
    g_i = α1 Softmax_i(W_s x_t)                      1 <= i <= h_s           (shared heads)
    g_i = α2 Softmax_i(W_r x_t)   if i ∈ Top-K(W_r x_t) over the h_r = h - h_s routed heads
    g_i = 0                       otherwise                                           (Eq. 5)
    [α1, α2] = Softmax(W_h x_t)                                                      (Eq. 6)

with the Switch-style load-balance loss over the routed heads, on the T tokens of one forward
(Eq. 7), exposed as `module.aux_loss` (train with `task_loss + β * aux_loss`, β = 0.01 in the
paper, Eq. 8):

    L_b = Σ_{i routed} f_i P_i,  f_i = (1/T) Σ_t 1[token t selects head i],
                                 P_i = (1/T) Σ_t Softmax_i(W_r x_t)

The released code (`MoHAttention.forward` in MoH-DiT/models.py, plain softmax attention; the
same gating in `Attention.forward` of MoH-ViT/attention.py and `AggregatedAttention.forward` of
MoH-ViT/attention_native.py around TransNeXt's attention) scales these gates. With
p = Softmax(W_r x_t) and S = Top-K(p), per token:

    g_i = 2 α1 · h_s Softmax_i(W_s x_t)                   shared heads (h_s = 1: 2 α1)
    g_i = 2 α2 · K p_i / max(Σ_{j∈S} p_j, eps)  (i ∈ S)   routed heads, 0 outside S
    L_b = h_r Σ_i f_i P_i                                 (`mean(me * ce) * E * E`, E = h_r)

with L_b computed only in training (`if self.training`). With one kind of head only there is no
W_h and no factor 2 α (as in the released code). So every gate is 1 when the routers output
zeros. This is the default, `variant="official"` (`create("moh")` is
`create("moh:official")`); `variant="paper"` is Eq. 5-7 verbatim.

The shared heads are heads 0..h_s-1 and the routed heads h_s..h-1, of the same fused
`qkv = Linear(dim, 3 dim)` and `proj = Linear(dim, dim)` as `mhsa`, so an mhsa state dict loads
with `load_state_dict(sd, strict=False)` (only the routers are new).

Status: routing, two-stage weighting and load-balance loss as in the authors' released code
(`variant="official"`, the default) or as in the paper's equations (`variant="paper"`), both
checked against naive float64 references (tests/mechanisms/test_moh.py). Every token
activates exactly h_s + K heads; `module.last_active_fraction` reports (h_s + K) / h after each
forward. Causal, attn_mask and KV cache are supported: the routing of a token depends on that
token alone, so it composes with any mask and with a cache (the cache holds keys/values of all
h heads, since a later token may route to any head).
Efficiency: all h heads are computed by one dense attention call and then gated, so the time
is that of mhsa plus the routers; the head sparsity the paper exploits (only the active heads'
queries, attention rows and output-projection slices are needed) is not turned into savings
here. `useful_flops` reports the work a head-sparse kernel would do.

Deviations:
- The default follows the released code, not the equations: the paper does not state
  the renormalisation over the Top-K or the factors K, h_s and 2, which make the gates of
  zero-output routers 1 (so MoH with every head active and the routers at zero is mhsa) instead
  of 1/(2 h_s) (shared) and 1/(2 h_r) (routed). `variant="paper"` keeps Eq. 5-7 and computes
  L_b in eval too.
- `variant="official"` leaves `aux_loss` None in eval mode, as the released code appends no loss
  there. Its training scripts (MoH-ViT/engine.py, MoH-DiT/train.py) average the layers' L_b and
  weight the mean by 0.01; attnlab keeps one L_b per module (`Transformer.aux_loss` sums them).
- The released code's `routed_head` argument is K (the Top-K count), not h_r; here `top_k`.
  MoH-DiT's version has no path for h_s = 1 with routed heads (it calls the missing W_s); this
  follows MoH-ViT there (shared gate 2 α1 · 1).
- Degenerate splits (the paper always has both kinds): with h_s = 0 there is no W_s and no W_h
  and α2 = 1; with h_r = 0 there is no W_r, no W_h, α1 = 1 and L_b is 0; with h_s = 1 the
  shared softmax is over one head, i.e. 1, and W_s is omitted (as in the released ViT code).
- Top-K is taken on the logits W_r x_t (the same set as on their softmax); ties go to
  torch.topk's choice.
- Router logits, softmaxes and the loss are computed in float32 (float64 for float64 input; the
  released code uses the input dtype); the gates are cast to the input dtype before they scale
  the head outputs. Masks, causal and the KV cache are additions (the released layers have none).
- Every token of `x` counts in T of Eq. 7, padding included (the mask says which keys a query
  may see, not which queries are real); with a cache, T is the tokens of the current call.
- MoH-LLaMA3's continue-tuning variant routes parameter-free on the query norms; not done here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

VARIANTS = ("official", "paper")  # the released code's scaling (default), the paper's Eq. 5-7


def _check_count(name: str, value, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"moh: {name} must be an int in [{low}, {high}] ({why}), got {value!r}")
    return value


@register(MechanismSpec(
    name="moh", paper="MoH: Multi-Head Attention as Mixture-of-Head Attention", year=2024,
    family="softmax", layout="seq",
    time="O(N^2 C): all heads computed, then gated (a head-sparse kernel: O(N^2 C (h_s+K)/h))",
    memory="O(N) with fused SDPA, O(N^2) eager", exact=False,
    causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2410.11842", variants=VARIANTS,
    provenance="official-code", source="SkyworkAI/MoH MoH-DiT/models.py::MoHAttention.forward",
    test_kwargs=dict(shared_heads=2, top_k=1, qkv_bias=True),
    test_configs=(dict(variant="paper", shared_heads=1, top_k=2), dict(shared_heads=0, top_k=2))))
class MoHAttention(nn.Module):
    """x (B, N, C) -> (B, N, C). Routers run in float32 (float64 for float64 input).

    Options: `shared_heads` h_s (default h // 2) always-active heads; `top_k` K (default
    max(1, h_r // 2)) of the h_r = h - h_s routed heads chosen per token; `variant` "official"
    (default: the released code's scaling, see the module docstring) or "paper" (Eq. 5-7).
    After each forward: `aux_loss` (scalar tensor, Eq. 7; None after an eval-mode forward of
    "official") and `last_active_fraction` (float).
    Hooks (attnlab.hooks): scores and probs of all h heads on the eager path
    (`backend="reference"`); `hook_gates` the gates g.
    """

    hook_names = ("hook_gates", "hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, shared_heads: int | None = None, top_k: int | None = None,
                 variant: str = "official", proj_bias: bool = True, scale: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims("moh", dim, num_heads)
        check_dropout("moh", attn_drop=attn_drop, proj_drop=proj_drop)
        if variant not in VARIANTS:
            raise ValueError(f"moh: variant must be one of {VARIANTS}, got {variant!r}")
        h = num_heads
        h_s = h // 2 if shared_heads is None else _check_count(
            "shared_heads", shared_heads, 0, h, f"num_heads={h}")
        h_r = h - h_s
        if h_r == 0:
            if top_k not in (None, 0):
                raise ValueError(f"moh: top_k must be None or 0 when every head is shared "
                                 f"(shared_heads={h_s} = num_heads), got {top_k!r}")
            k = 0
        else:
            k = max(1, h_r // 2) if top_k is None else _check_count(
                "top_k", top_k, 1, h_r, f"routed heads = num_heads - shared_heads = {h} - {h_s}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, h
        self.shared_heads, self.routed_heads, self.top_k = h_s, h_r, k
        self.variant = variant
        self.scale = scale
        self.backend = backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        # Routers (bias-free, as in the paper's W x_t). A softmax over a single logit is 1, so
        # W_s needs two or more shared heads and W_h needs both kinds of head.
        self.w_r = nn.Linear(dim, h_r, bias=False, **factory) if h_r > 0 else None   # W_r: routed
        self.w_s = nn.Linear(dim, h_s, bias=False, **factory) if h_s > 1 else None   # W_s: shared
        self.w_h = nn.Linear(dim, 2, bias=False, **factory) if h_s and h_r else None  # W_h: α1, α2
        self.aux_loss: Tensor | None = None
        self.last_active_fraction: float | None = None
        # Identity hook points for probes (see attnlab.probes): shapes in comments.
        self.hook_q = HookPoint()      # (B, h, N, d)
        self.hook_k = HookPoint()      # (B, h, M, d), after the cache
        self.hook_v = HookPoint()      # (B, h, M, d), after the cache
        self.hook_scores = HookPoint()   # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()    # (B, h, N, d), per-head outputs H^i before gating
        self.hook_gates = HookPoint()  # (B, N, h), g_i per token, 0 for inactive heads

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, shared_heads={self.shared_heads}, "
                f"top_k={self.top_k}, variant={self.variant!r}")

    @property
    def active_fraction(self) -> float:
        """Fraction of heads each token activates: (h_s + K) / h."""
        return (self.shared_heads + self.top_k) / self.num_heads

    def route(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Gates g (B, N, h) of Eq. 5-6 and the load-balance loss of Eq. 7, in float32/float64
        (the loss is None for "official" outside training, as in the released code)."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(compute)
        B, N, _ = x.shape
        h_s, h_r, k = self.shared_heads, self.routed_heads, self.top_k
        official = self.variant == "official"
        with_loss = self.training or not official                           # released: training only
        parts, aux = [], xc.new_zeros(()) if with_loss else None

        def logits(layer: nn.Linear) -> Tensor:
            return F.linear(xc, layer.weight.to(compute))

        if h_s:
            # Softmax_i(W_s x_t) over the shared heads; a single shared head gets 1.
            shared = logits(self.w_s).softmax(-1) if self.w_s is not None else xc.new_ones(B, N, 1)
            parts.append(shared * h_s if official else shared)              # (B, N, h_s)
        if h_r:
            scores = logits(self.w_r)                                        # (B, N, h_r)
            probs = scores.softmax(-1)
            chosen = torch.zeros_like(probs).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
            routed = probs * chosen                                          # (B, N, h_r)
            if official:  # renormalise over the Top-K, then scale by K (released code)
                routed = k * routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).eps)
            parts.append(routed)
            if with_loss:
                # Eq. 7 over the T = B N tokens of this call; f_i carries no gradient (an indicator).
                T = max(B * N, 1)
                f = chosen.reshape(-1, h_r).sum(0) / T                       # (h_r,)
                P = probs.reshape(-1, h_r).sum(0) / T                        # (h_r,)
                aux = (f * P).sum() * (h_r if official else 1)              # official: mean(f P) h_r^2
        if self.w_h is not None:
            alpha = logits(self.w_h).softmax(-1)                             # (B, N, 2), Eq. 6
            if official:
                alpha = 2 * alpha
            parts = [parts[0] * alpha[..., :1], parts[1] * alpha[..., 1:]]
        return torch.cat(parts, dim=-1), aux                                 # (B, N, h), () or None

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("moh", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        gates, self.aux_loss = self.route(x)                                 # (B, N, h), ()
        gates = self.hook_gates(gates)
        self.last_active_fraction = self.active_fraction  # exactly h_s + K heads per token
        q, k, v = self.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        if cache is not None:
            k, v = cache.update(k, v)                                        # (B, h, M, d), M = past + N
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        # All h heads are computed and the inactive ones zeroed by their gate (see Efficiency).
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                             # (B, h, N, d)
        out = out.transpose(1, 2) * gates.to(out.dtype)[..., None]          # (B, N, h, d), g_i H^i
        out = out.reshape(B, N, C)                                           # (B, N, C)
        return self.proj_drop(self.proj(out))                               # Σ_i g_i H^i W_O^i + b_O

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool) -> tuple[int, int]:
        """Multiply-adds x 2 of a head-sparse MoH: only the a = h_s + K active heads of a token
        need its query, its attention row and its slice of the output projection; keys and
        values are needed for all heads. Routers included. Backward: twice the forward.
        (Uses this module's h_s and K as fractions of `num_heads`.)"""
        B, N, C = batch, seq_len, dim
        frac = self.active_fraction
        pairs = N * (N + 1) // 2 if causal else N * N
        routers = 2 * B * N * C * (self.routed_heads + (self.shared_heads if self.w_s is not None else 0)
                                   + (2 if self.w_h is not None else 0))
        fwd = (2 * B * N * C * (frac * C + 2 * C)        # q for active heads, k and v for all
               + 4 * B * C * frac * pairs                # scores and weighted sum, active heads
               + B * N * C * frac                        # gating
               + 2 * B * N * C * frac * C                # output projection of active slices
               + routers)
        return int(fwd), int(2 * fwd)
