"""Multi-head attention pooling with a learned latent query: timm's `AttentionPoolLatent` (MAP head).

Paper: the pooling of a set by multi-head attention from learned seed vectors is Set
Transformer's PMA (Lee, Lee, Kim, Kosiorek, Choi, Teh, "Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks", ICML 2019, arXiv 1810.00825). This
file does not compute PMA's block (see Deviations); it computes timm's
`timm/layers/attention_pool.py::AttentionPoolLatent` (huggingface/pytorch-image-models, read at
timm 1.0.29), the "MAP" (multihead attention pooling) head of big_vision-style ViTs as timm
ports it: timm's SigLIP vision towers use it as `global_pool="map"`, and HF transformers'
`SiglipMultiheadAttentionPoolingHead` computes the same with one latent. It is the usual
"multi-head attentive probing" baseline: the Efficient Probing repository
(billpsomas/efficient-probing `probe_heads.py`, pooling "siglip") benchmarks a copy of this
timm class with its defaults. V-JEPA's attentive probe (`AttentivePooler`) is a relative, not
this: it layer-normalises the tokens before attention and adds the query back as a residual.

Computation, x (B, N, C), L = `latent_len` latents, h heads of d = C / h:
    x <- x + pos_embed                              (only with pos_embed="abs", N = feat_size)
    q = q_norm(latent W_q^T + b_q)                   (L, C) -> h heads (L, d)
    k, v = k_norm(x W_k^T + b_k), x W_v^T + b_v      (N, C) each; `kv` = [W_k; W_v], (2C, C)
    o = softmax(q k^T / sqrt(d)) v                   per head; heads concatenated, (L, C)
    y = o W_o^T + b_o                                `proj`, (L, C_out)
    y <- y + MLP(norm(y))                            MLP = fc2(act(fc1(.))), hidden mlp_ratio C_out
    out = y[0] (pool_type="token") or mean_L y ("avg")    (C_out,)
`out_features=0` is timm's pre-logits mode: no proj, norm or MLP, out = o pooled, width C.
The attention runs through `attnlab.ops.attention` (q (B, h, L, d), k and v (B, h, N, d)).

Status: timm's computation (official-code, source timm). x (B, N, C) -> (B, C_out).
Checkpoint key map: parameter names are timm's (`latent` (1, L, latent_dim), `q`, `kv`, `q_norm`,
`k_norm`, `proj`, `norm`, `mlp.fc1`, `mlp.fc2`, `pos_embed` (feat_size, C)), so
`load_state_dict(timm_module.state_dict())` works for the same options; in a timm ViT they sit
under `attn_pool.` (strip it); a timm SigLIP "map" head is `norm="layernorm", norm_eps=1e-6,
act="gelu_tanh"`. HF `SiglipMultiheadAttentionPoolingHead` (`vision_model.head.`): `probe` ->
`latent`; `attention.in_proj_weight` / `in_proj_bias` rows [0, C) -> `q`, rows [C, 3C) -> `kv`
(k then v, the order `kv` reshapes in); `attention.out_proj` -> `proj`; `layernorm` -> `norm`;
`mlp.fc1`, `mlp.fc2` unchanged; build with norm="layernorm", norm_eps=layer_norm_eps,
act="gelu_tanh", mlp_ratio=intermediate_size / hidden_size (checked once: 3.6e-15 in float64).
Deviations (from timm's class):
- `embed_dim` is always `dim` (timm's forward reshapes the heads back to the input width, so a
  different embed_dim does not run there either); `norm` is a name ("layernorm" or None, timm's
  default None = Identity) instead of a layer class, with `norm_eps` for every LayerNorm here
  (None: 1e-5, nn.LayerNorm's default, which timm's qk-norm gets when norm_layer is None);
  `act` is "gelu" (timm's default nn.GELU) or "gelu_tanh".
- `attn_mask` is the pool layout's (B, N) key-padding mask (bool True = token present, or float
  added to the scores), where timm passes any SDPA mask through; a sample with no valid token
  (or N = 0) outputs zeros here (timm's SDPA gives NaN); `pool_type=""` (no pooling, (B, L,
  C_out)) is refused: the pool layout returns (B, C_out).
- The latent query is projected once per call, not once per sample (same values); optional
  `attn_drop` (timm has none); `proj_drop` is timm's `drop`. Softmax in float32 (float64 for
  float64 input). Linear layers keep PyTorch's default init as timm's class does; `latent` and
  `pos_embed` get timm's truncated-normal init (std latent_dim^-1/2 and C^-1/2, cut at +-2 std).
- Not Set Transformer's PMA: PMA computes LN(H + rFF(H)) with H = LN(S + MHA(S, Z, Z)), a
  residual from the seeds S and post-norms; this head has no residual from the latent and a
  pre-norm on the MLP branch only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_positive_int, \
    check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "attention_pool_latent"
_ACTS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
_POOLS = ("token", "avg")


@register(MechanismSpec(
    name=NAME, paper="Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks",
    year=2019, family="softmax", layout="pool", time="O(N C^2 + N L C)", memory="O(N C + L N h)",
    exact=False, causal=False, attn_mask=True, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/1810.00825",
    provenance="official-code",
    source=("huggingface/pytorch-image-models timm/layers/attention_pool.py::AttentionPoolLatent "
            "(timm 1.0.29; the MAP head of timm's ViTs, global_pool='map'), not Set Transformer's PMA "
            "block (no seed residual, no post-norms); embed_dim = dim"),
    test_kwargs=dict(latent_len=2, pool_type="avg", norm="layernorm", mlp_ratio=2.0),
    test_configs=(dict(qk_norm=True, out_features=24, act="gelu_tanh", norm="layernorm", norm_eps=1e-6),
                  dict(out_features=0, q_proj=False, qkv_bias=False),
                  dict(pos_embed="abs", feat_size=8, latent_dim=12))))
class AttentionPoolLatent(nn.Module):
    """x (B, N, C) -> (B, C_out), C_out = `out_features` (default C; 0: pre-logits mode, C).

    Parameters (timm names): `latent` (1, L, latent_dim), `q` = Linear(latent_dim, C) (Identity
    with q_proj=False), `kv` = Linear(C, 2C) [k | v], `q_norm` / `k_norm` LayerNorm(d) with
    qk_norm, `proj` = Linear(C, C_out), `norm`, `mlp.fc1` / `mlp.fc2`, `pos_embed` (feat_size, C).
    Hooks (attnlab.hooks): scores and probs (B, h, L, N) on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, out_features: int | None = None,
                 mlp_ratio: float = 4.0, q_proj: bool = True, latent_len: int = 1, latent_dim: int | None = None,
                 pos_embed: str = "", feat_size: int | None = None, pool_type: str = "token",
                 norm: str | None = None, norm_eps: float | None = None, act: str = "gelu",
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        out_features = dim if out_features is None else check_positive_int(NAME, "out_features", out_features,
                                                                            allow_zero=True)
        check_positive(NAME, "mlp_ratio", mlp_ratio)
        check_positive_int(NAME, "latent_len", latent_len)
        latent_dim = dim if latent_dim is None else check_positive_int(NAME, "latent_dim", latent_dim)
        if not q_proj and latent_dim != dim:
            raise ValueError(f"{NAME}: q_proj=False uses the latent as the query, so latent_dim must equal "
                             f"dim ({dim}), got {latent_dim}")
        if pos_embed not in ("", "abs"):
            raise ValueError(f"{NAME}: pos_embed must be '' or 'abs', got {pos_embed!r}")
        if pos_embed == "abs":
            if feat_size is None:
                raise ValueError(f"{NAME}: pos_embed='abs' needs feat_size (the number of tokens), got None")
            check_positive_int(NAME, "feat_size", feat_size)
        if pool_type not in _POOLS:
            raise ValueError(f"{NAME}: pool_type must be one of {_POOLS} (the pool layout returns (B, C_out)), "
                             f"got {pool_type!r}")
        if norm not in (None, "layernorm"):
            raise ValueError(f"{NAME}: norm must be None or 'layernorm', got {norm!r}")
        norm_eps = 1e-5 if norm_eps is None else check_positive(NAME, "norm_eps", norm_eps)
        if act not in _ACTS:
            raise ValueError(f"{NAME}: act must be one of {sorted(_ACTS)}, got {act!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.latent_len, self.latent_dim = latent_len, latent_dim
        self.feat_size = feat_size
        self.pool = pool_type
        self.attn_drop = attn_drop
        self.backend = backend

        self.pos_embed = (nn.Parameter(_trunc_normal(torch.empty(feat_size, dim, **factory), dim ** -0.5))
                          if pos_embed == "abs" else None)
        self.latent = nn.Parameter(_trunc_normal(torch.empty(1, latent_len, latent_dim, **factory),
                                                 latent_dim ** -0.5))
        self.q = nn.Linear(latent_dim, dim, bias=qkv_bias, **factory) if q_proj else nn.Identity()
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **factory)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, **factory) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps, **factory) if qk_norm else nn.Identity()
        if out_features > 0:
            hidden = int(out_features * mlp_ratio)
            self.proj = nn.Linear(dim, out_features, **factory)
            self.norm = nn.LayerNorm(out_features, eps=norm_eps, **factory) if norm else nn.Identity()
            self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(out_features, hidden, **factory), act=_ACTS[act](),
                                                 fc2=nn.Linear(hidden, out_features, **factory)))
        else:   # timm's pre-logits mode
            self.proj, self.norm, self.mlp = nn.Identity(), nn.Identity(), None
            out_features = dim
        self.proj_drop = nn.Dropout(proj_drop)
        self.out_features = out_features

        self.hook_q = HookPoint()       # (B, h, L, d), after q_norm
        self.hook_k = HookPoint()       # (B, h, N, d), after k_norm
        self.hook_v = HookPoint()       # (B, h, N, d)
        self.hook_scores = HookPoint()  # (B, h, L, N), the softmax input (eager path only)
        self.hook_probs = HookPoint()   # (B, h, L, N), the pooling weights (eager path only)
        self.hook_out = HookPoint()     # (B, h, L, d), per-head pooled vectors before proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, latent_len={self.latent_len}, "
                f"out_features={self.out_features}, pool_type={self.pool!r}")

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_features(self, is_causal=is_causal, cache=cache)   # a pooled summary has neither
        check_tokens(NAME, x, self.dim)
        B, N, C = x.shape
        L, h, d = self.latent_len, self.num_heads, self.head_dim
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"{NAME}: attn_mask must be a (B, N) torch.Tensor, got {type(attn_mask).__name__}")
            if attn_mask.dim() != 2 or attn_mask.shape[0] not in (B, 1) or attn_mask.shape[1] != N:
                raise ValueError(f"{NAME}: attn_mask is a key-padding mask of shape (B, N) = ({B}, {N}), "
                                 f"got {tuple(attn_mask.shape)}")
        if self.pos_embed is not None:
            if N != self.feat_size:
                raise ValueError(f"{NAME}: pos_embed='abs' was built for N = feat_size = {self.feat_size} "
                                 f"tokens, got N={N} (shape {tuple(x.shape)})")
            x = x + self.pos_embed.to(x.dtype)                                # (B, N, C)
        q = self.q(self.latent).reshape(1, L, h, d).transpose(1, 2)           # (1, h, L, d)
        kv = self.kv(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)         # (2, B, h, N, d)
        k, v = kv.unbind(0)                                                   # (B, h, N, d) each
        q, k = self.q_norm(q).expand(B, -1, -1, -1), self.k_norm(k)           # q: (B, h, L, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                        attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0,
                        backend=self.backend)                                 # scale d^-1/2
        out = self.hook_out(out)                                              # (B, h, L, d)
        out = out.transpose(1, 2).reshape(B, L, C)                            # (B, L, C)
        out = self.proj_drop(self.proj(out))                                  # (B, L, C_out)
        if self.mlp is not None:
            out = out + self.mlp(self.norm(out))
        empty = self._empty_rows(attn_mask, N, x.device)                      # (B|1, 1, 1) or None
        if empty is not None:   # no token to pool: zeros, not proj's bias through the MLP
            out = out.masked_fill(empty, 0.0)
        return out[:, 0] if self.pool == "token" else out.mean(1)             # (B, C_out)

    @staticmethod
    def _empty_rows(attn_mask: Tensor | None, N: int, device) -> Tensor | None:
        """(B|1, 1, 1) bool: samples with no token to pool (all padded, or N == 0)."""
        if N == 0:
            return torch.ones(1, 1, 1, dtype=torch.bool, device=device)
        if attn_mask is None:
            return None
        valid = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        return ~valid.any(-1)[:, None, None]

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds of the matrix products, for N = seq_len tokens.

        Forward: kv 2 N C 2C, scores and weighted sums 4 L N C (h heads of d), proj 2 L C C_out,
        MLP 4 L C_out H (H = mlp_ratio C_out), per sample; the latent's q projection 2 L
        latent_dim C once per call (this module projects it once). Norms, biases and the
        activation are not counted. Backward: twice the forward. The module's own dim and heads
        are used (the bench's must agree).
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C, L, Co = batch, seq_len, self.dim, self.latent_len, self.out_features
        per_sample = 2 * N * C * 2 * C + 4 * L * N * C
        if self.mlp is not None:
            per_sample += 2 * L * C * Co + 4 * L * Co * self.mlp.fc1.out_features
        q_proj = 2 * L * self.latent_dim * C if isinstance(self.q, nn.Linear) else 0
        fwd = B * per_sample + q_proj
        return fwd, 2 * fwd


def _trunc_normal(t: Tensor, std: float) -> Tensor:
    """timm's trunc_normal_tf_: a standard normal cut at +-2, then scaled by std."""
    with torch.no_grad():
        nn.init.trunc_normal_(t, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return t.mul_(std)
