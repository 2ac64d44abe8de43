"""Selective self-attention (SSA): softmax attention whose scores carry a position temperature.

Paper: Selective Attention: Enhancing Transformer through Principled Context Control
(Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak; NeurIPS 2024, arXiv 2411.12892).
Code: umich-sota/selective_attention, lit_gpt/model_finetune_att.py::CausalSelfAttention
(`scaled_dot_product_attention`), which the default here follows:

    s_ij   = q_i . k_j / sqrt(d)
    s'_ij  = s_ij * (1 + exp(-exp(beta)) * log(n_i))       n_i = 1-based position of query i
    out_i  = sum_j softmax_j(s'_ij) v_j

with one learned scalar beta per layer, initialised to 2.0 (`beta_init`; the released code's
value, so exp(-exp(2)) ~ 6.2e-4 and a fresh layer is almost plain attention). That code has only
this position term: no token-dependent and no value temperature.
Opt-in (off by default, attnlab's reading of the paper's Sec. 3, see Deviations):
- `query_temp=True`: a token term added to the query's inverse temperature,
  tau_q,i = 1 + exp(-exp(beta)) log(n_i) + tanh(<w_h, q_h,i>)   (w_h in R^d, one per head);
- `value_temp=True`: a value temperature, v_j <- (1 + tanh(<u_g, v_g,j>)) v_j (u_g per kv head).
Weight sharing: the token terms reuse the q / v projections attention computes anyway, so SSA
adds 1 parameter by default and h d + h_kv d + 1 with both token terms (0.07% of a 768 / 12
layer; the paper reports < 0.5% for a whole model).
Status: the released code's computation by default, on `attnlab.ops.attention` (the row factor
is applied to q, which scales the whole score row of query i exactly as the released code
scales `att`), so masks, causal alignment, GQA, the KV cache and backends are the shared ones.
With every temperature off (`pos_temp=False`, token terms off) or beta -> +inf it is `mhsa`
exactly; the parameter names `qkv` / `proj` match `mhsa`, so an `mhsa` state dict loads with
`strict=False` (only the temperature parameters are missing).
Deviations:
- Sources: the paper's Section 3 ("Methodology: Selective Attention Layer") could not be read
  here (only its abstract, figure captions and an ablation-table caption naming tau_pos, tau_tok
  and "tau_pos + tau_tok" for q and v). The token and value temperatures are therefore a
  reconstruction: tau_tok = tanh(<w_h, W_q^h x>) and tau_v = 1 + tanh(<u_g, W_v^g x>) (shared
  projection plus one vector per head), added to the position term. Until the paper's
  equations are at hand they are opt-in and the default is the released code.
- Position under a KV cache: n_i is the absolute position (cache length + index in the chunk),
  also without `is_causal`, so cached decoding equals the full forward. The released code
  indexes its row-length buffer by the chunk's own rows (n restarts at 1 for each chunk); for a
  single full-sequence forward, which is all it is used for there, the two agree.
- The released code computes the factor in the module's dtype; here it is computed in float32
  (float64 for float64 input) and cast to q's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.ops.heads import split_qkv
from attnlab.registry import MechanismSpec, register

NAME = "selective"


def _check_flag(arg: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{NAME}: {arg} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_float(arg: str, value, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{NAME}: {arg} must be a finite number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{NAME}: {arg} must be a finite number, got {value!r}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{NAME}: {arg} must be >= {min_value}, got {value!r}")
    return float(value)


@register(MechanismSpec(
    name=NAME, paper="Selective Attention: Enhancing Transformer through Principled Context Control",
    year=2024, family="softmax", layout="seq", time="O(N^2 d)",
    memory="O(N) with fused SDPA, O(N^2) eager", exact=False,
    causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2411.12892",
    provenance="official-code",
    source=("umich-sota/selective_attention lit_gpt/model_finetune_att.py::CausalSelfAttention."
            "scaled_dot_product_attention: scores * (1 + exp(-exp(beta)) * log(n)), one beta per layer, "
            "init 2.0 (the default). Opt-in query_temp / value_temp token terms are a reconstruction "
            "of Sec. 3 (paper text not read): tanh(<w_h, q_h>) added to the query factor, "
            "1 + tanh(<u_g, v_g>) on the values"),
    test_kwargs=dict(qkv_bias=True, beta_init=0.0),
    test_configs=(dict(num_kv_heads=2, query_temp=True, value_temp=True, beta_init=0.0, temp_std=0.5),)))
class SelectiveAttention(nn.Module):
    """x (B, N, C) -> (B, N, C). Temperatures and softmax run in float32 (float64 for float64).

    Hooks (attnlab.hooks): scores (with the query temperature in them) and probs on the eager
    path (`backend="reference"`); `hook_tau_q` fires with pos_temp or query_temp, `hook_tau_v`
    with value_temp.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")
    optional_hook_names = ("hook_tau_q", "hook_tau_v")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_kv_heads: int | None = None, proj_bias: bool = True,
                 scale: float | None = None, pos_temp: bool = True, query_temp: bool = False,
                 value_temp: bool = False, beta_init: float = 2.0, temp_std: float = 0.0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"{NAME}: num_kv_heads must be a positive divisor of num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        if scale is not None:
            scale = _check_float("scale", scale)
        self.query_temp = _check_flag("query_temp", query_temp)
        self.pos_temp = _check_flag("pos_temp", pos_temp)
        self.value_temp = _check_flag("value_temp", value_temp)
        beta_init = _check_float("beta_init", beta_init)
        temp_std = _check_float("temp_std", temp_std, min_value=0.0)
        for arg, flag in (("qkv_bias", qkv_bias), ("proj_bias", proj_bias)):
            _check_flag(arg, flag)

        factory = dict(device=device, dtype=dtype)
        d = self.head_dim
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.scale = scale
        self.backend = backend
        self.attn_drop = float(attn_drop)
        # The same parameters as mhsa (names and shapes), so its weights copy over.
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * d, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        # SSA's additions: one scalar per layer for the position temperature (the released code's
        # `beta`), and, opt-in, one vector per head for each token temperature. A switched-off
        # temperature has no parameter at all.
        self.tau_pos_beta = nn.Parameter(torch.empty((), **factory)) if pos_temp else None
        self.tau_q_weight = nn.Parameter(torch.empty(num_heads, d, **factory)) if query_temp else None
        self.tau_v_weight = nn.Parameter(torch.empty(num_kv_heads, d, **factory)) if value_temp else None
        self._beta_init, self._temp_std = beta_init, temp_std
        self.reset_temperatures()
        # Identity hook points for probes (see attnlab.probes): shapes in comments.
        self.hook_q = HookPoint()      # (B, h, N, d), before the temperature
        self.hook_k = HookPoint()      # (B, h_kv, M, d), after the cache
        self.hook_v = HookPoint()      # (B, h_kv, M, d), after the value temperature and the cache
        self.hook_tau_q = HookPoint()  # (B, h, N, 1), query inverse temperature
        self.hook_tau_v = HookPoint()  # (B, h_kv, N, 1), value temperature of the new tokens
        self.hook_scores = HookPoint()   # (B, h, N, M), the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, M), the softmax output (eager path only)
        self.hook_out = HookPoint()    # (B, h, N, d), per-head outputs before proj

    def reset_temperatures(self) -> None:
        """Re-initialise the temperature parameters (beta = beta_init, w, u ~ N(0, temp_std^2))."""
        with torch.no_grad():
            for weight in (self.tau_q_weight, self.tau_v_weight):
                if weight is None:
                    continue
                if self._temp_std > 0:
                    weight.normal_(0.0, self._temp_std)
                else:
                    weight.zero_()
            if self.tau_pos_beta is not None:
                self.tau_pos_beta.fill_(self._beta_init)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"pos_temp={self.pos_temp}, query_temp={self.query_temp}, value_temp={self.value_temp}")

    # --- temperatures ---------------------------------------------------------------------------

    def query_temperature(self, q: Tensor, start: int = 0) -> Tensor | None:
        """tau_q = 1 + exp(-exp(beta)) log(n) [+ tanh(<w, q>) with query_temp] for q (B, h, N, d) at
        absolute positions start .. start + N - 1; (B|1, h, N, 1) in the compute dtype, or None if off."""
        if not (self.query_temp or self.pos_temp):
            return None
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, h, N, _ = q.shape
        tau = torch.ones(1, h, N, 1, dtype=compute, device=q.device)
        if self.pos_temp:
            n = torch.arange(start + 1, start + N + 1, dtype=compute, device=q.device)   # (N,)
            coef = torch.exp(-torch.exp(self.tau_pos_beta.to(compute)))                 # () one per layer
            tau = tau + coef * torch.log(n)[None, None, :, None]                         # (1, h, N, 1)
        if self.query_temp:
            f = torch.einsum("bhnd,hd->bhn", q.to(compute), self.tau_q_weight.to(compute))
            tau = tau + torch.tanh(f)[..., None]                                          # (B, h, N, 1)
        return tau

    def value_temperature(self, v: Tensor) -> Tensor | None:
        """tau_v = 1 + tanh(<u, v>) for v (B, h_kv, N, d); (B, h_kv, N, 1) or None if off."""
        if not self.value_temp:
            return None
        compute = torch.float64 if v.dtype == torch.float64 else torch.float32
        f = torch.einsum("bgnd,gd->bgn", v.to(compute), self.tau_v_weight.to(compute))
        return 1.0 + torch.tanh(f)[..., None]                                             # (B, h_kv, N, 1)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{NAME}: cache must be an attnlab.KVCache, got {type(cache).__name__}")
        B, N, C = x.shape
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = split_qkv(self.qkv(x), h, h_kv, d)                     # (B, h, N, d), 2 x (B, h_kv, N, d)
        q = self.hook_q(q)
        start = 0 if cache is None else len(cache)                       # absolute position of token 0

        # Query temperature multiplies the whole score row of query i, so it is applied to q and
        # the scaled q goes through the shared attention op (masks and backends unchanged).
        tau_q = self.query_temperature(q, start)                         # (B|1, h, N, 1) or None
        if tau_q is not None:
            q = q * self.hook_tau_q(tau_q).to(q.dtype)                   # (B, h, N, d)
        # Value temperature depends on token j alone, so scaled values can be cached as they are.
        tau_v = self.value_temperature(v)                                # (B, h_kv, N, 1) or None
        if tau_v is not None:
            v = v * self.hook_tau_v(tau_v).to(v.dtype)                   # (B, h_kv, N, d)
        if cache is not None:
            k, v = cache.update(k, v)                                    # (B, h_kv, M, d), M = past + N
        k, v = self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                         # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                       # (B, N, C)
        return self.proj_drop(self.proj(out))
