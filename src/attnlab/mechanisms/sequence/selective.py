"""Selective self-attention (SSA): softmax attention with learned query and value temperatures.

Paper: Selective Attention: Enhancing Transformer through Principled Context Control
(Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak; NeurIPS 2024, arXiv 2411.12892).
Implements: the SSA layer of Section 3 on top of multi-head attention. Each query is scaled by an
inverse temperature that depends on the token and on its position, each value by one that
depends on the token:

    tau_q(x_i, n_i) = tau_pos(n_i) + tau_tok(x_i)
    tau_pos(n)      = 1 + sigmoid(alpha_h) * log(n)            n = 1-based absolute position
    tau_tok(x)      = tanh(<w_h, q_h(x)>)                      q_h(x) = W_q^h x (weight sharing)
    tau_v(x)        = 1 + tanh(<u_g, v_g(x)>)                  v_g(x) = W_v^g x (weight sharing)
    out_i           = sum_j softmax_j(tau_q,i * q_i . k_j / sqrt(d)) * tau_v,j * v_j

Weight sharing: the token temperatures reuse the query / value projections that attention
computes anyway and add one vector per head (w_h, u_g in R^d) and one scalar per head
(alpha_h): 2 * dim + num_heads new parameters with multi-head attention, about 0.07% of an
attention layer at dim 768 / 12 heads (the paper reports < 0.5% for a whole model).
Status: full SSA (query temperature with token and position terms, value temperature). The
scaled q and v go through `attnlab.ops.attention`, so masks, causal alignment and backends are
the shared ones. With every temperature switched off (`query_temp=False, pos_temp=False,
value_temp=False`), or with w = u = 0 and alpha -> -inf, it is `mhsa` exactly; the parameter
names `qkv` / `proj` match `mhsa`, so an `mhsa` state dict loads with `strict=False` (only the
temperature parameters are missing).
Deviations:
- Sources: the equations of the paper's Section 3 ("Methodology: Selective Attention Layer")
  could not be read in full here, so no equation numbers are cited. The forms come from the
  paper's released code (umich-sota/selective_attention, which carries only the position term,
  score * (1 + c * log(row length)) with c = exp(-exp(beta))), the paper's ablation tables, whose
  column "tau_pos + tau_tok" is read as an additive combination, and summaries of the paper giving
  tau_pos = 1 + sigmoid(alpha) log n and tau_tok = tanh(f(x)).
- Weight sharing: f(x) is read as <w_h, W_q^h x> (resp. <u_g, W_v^g x>), i.e. the shared
  projection followed by a head-wise vector; alpha is one scalar per head (the released code
  used one per layer).
- The value temperature has no position term: the position term counters attention dilution,
  which concerns the number of keys a query sees, not the value's own index. Its offset 1 plays
  the role of tau_pos(1), so tau_v in (0, 2) and tau_v = 1 when u = 0.
- n is the query's 1-based absolute position (cache length + index in the chunk), also without
  `is_causal`, so a padding mask or a KV cache never changes a token's temperature. For causal
  attention n equals the number of keys the query sees, the paper's row length.
- Initialisation: w = u = 0 (tau_tok = 0) and sigmoid(alpha) ~ 6e-4 (alpha_init=-7.4, close to
  the released code's exp(-exp(2))), so a fresh layer starts as (almost) plain attention, as
  for fine-tuning a pretrained model. `temp_std > 0` draws w and u at random instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.mechanisms.common import check_dims, check_features, check_tokens
from attnlab.ops.attention import attention
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
    test_kwargs=dict(qkv_bias=True, alpha_init=0.0, temp_std=0.5),
    test_configs=(dict(num_kv_heads=2, alpha_init=0.0, temp_std=0.5),)))
class SelectiveAttention(nn.Module):
    """x (B, N, C) -> (B, N, C). Temperatures and softmax run in float32 (float64 for float64)."""

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_kv_heads: int | None = None, proj_bias: bool = True,
                 scale: float | None = None, query_temp: bool = True, pos_temp: bool = True,
                 value_temp: bool = True, alpha_init: float = -7.4, temp_std: float = 0.0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"{NAME}: num_kv_heads must be a positive divisor of num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        for arg, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{NAME}: {arg} must be in [0, 1), got {p!r}")
        if scale is not None:
            scale = _check_float("scale", scale)
        self.query_temp = _check_flag("query_temp", query_temp)
        self.pos_temp = _check_flag("pos_temp", pos_temp)
        self.value_temp = _check_flag("value_temp", value_temp)
        alpha_init = _check_float("alpha_init", alpha_init)
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
        # SSA's additions: one vector per head for each token temperature, one scalar per head
        # for the position temperature. A switched-off temperature has no parameter at all.
        self.tau_q_weight = nn.Parameter(torch.empty(num_heads, d, **factory)) if query_temp else None
        self.tau_v_weight = nn.Parameter(torch.empty(num_kv_heads, d, **factory)) if value_temp else None
        self.tau_pos_alpha = nn.Parameter(torch.empty(num_heads, **factory)) if pos_temp else None
        self._alpha_init, self._temp_std = alpha_init, temp_std
        self.reset_temperatures()
        # Identity hook points for probes (see attnlab.probes): shapes in comments.
        self.hook_q = nn.Identity()      # (B, h, N, d), before the temperature
        self.hook_k = nn.Identity()      # (B, h_kv, M, d), after the cache
        self.hook_v = nn.Identity()      # (B, h_kv, M, d), after the value temperature and the cache
        self.hook_tau_q = nn.Identity()  # (B, h, N, 1), query inverse temperature
        self.hook_tau_v = nn.Identity()  # (B, h_kv, N, 1), value temperature of the new tokens
        self.hook_out = nn.Identity()    # (B, h, N, d), per-head outputs before proj

    def reset_temperatures(self) -> None:
        """Re-initialise the temperature parameters (w, u ~ N(0, temp_std^2), alpha = alpha_init)."""
        with torch.no_grad():
            for weight in (self.tau_q_weight, self.tau_v_weight):
                if weight is None:
                    continue
                if self._temp_std > 0:
                    weight.normal_(0.0, self._temp_std)
                else:
                    weight.zero_()
            if self.tau_pos_alpha is not None:
                self.tau_pos_alpha.fill_(self._alpha_init)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"query_temp={self.query_temp}, pos_temp={self.pos_temp}, value_temp={self.value_temp}")

    # --- temperatures ---------------------------------------------------------------------------

    def query_temperature(self, q: Tensor, start: int = 0) -> Tensor | None:
        """tau_q = 1 + sigmoid(alpha) log(n) + tanh(<w, q>) for q (B, h, N, d) at absolute positions
        start .. start + N - 1; returns (B|1, h, N, 1) in the compute dtype, or None if off."""
        if not (self.query_temp or self.pos_temp):
            return None
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, h, N, _ = q.shape
        tau = torch.ones(1, h, N, 1, dtype=compute, device=q.device)
        if self.pos_temp:
            n = torch.arange(start + 1, start + N + 1, dtype=compute, device=q.device)   # (N,)
            coef = torch.sigmoid(self.tau_pos_alpha.to(compute))                        # (h,)
            tau = tau + (coef[:, None] * torch.log(n)[None, :])[None, :, :, None]        # (1, h, N, 1)
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
        qkv = self.qkv(x)                                                # (B, N, (h + 2 h_kv) d)
        if h_kv == h:
            q, k, v = qkv.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        else:
            q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
            q = q.reshape(B, N, h, d).transpose(1, 2)                    # (B, h, N, d)
            k = k.reshape(B, N, h_kv, d).transpose(1, 2)                 # (B, h_kv, N, d)
            v = v.reshape(B, N, h_kv, d).transpose(1, 2)                 # (B, h_kv, N, d)
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
        out = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                        dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.hook_out(out)                                         # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                       # (B, N, C)
        return self.proj_drop(self.proj(out))
