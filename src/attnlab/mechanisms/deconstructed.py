"""Deconstructed attention: the controlled variants that each relax one principle of attention.

Paper: Deconstructing Attention: Investigating Design Principles for Effective Language Modeling
(Xue, Moosavi, Aletras, 2025), arXiv:2510.11602.
Status: every variant of the paper's section 3, as one module with a `variant` option
(`attnlab.create("deconstructed:non_approximate", dim, h)`), plus `hybrid_variants()`, which
writes out the paper's per-layer configurations (uniform, even/odd hybrids, Table 11):

| variant           | paper (section, equations)            | principle relaxed      |
|-------------------|---------------------------------------|------------------------|
| `standard`        | Standard, 3.1, Eq. 1-3                | none (the baseline)    |
| `mlp`             | MLP, 3.2, Eq. 4-5                     | token mixing           |
| `approximate`     | Approximate, 3.3, Eq. 6               | mathematical form      |
| `non_approximate` | Non-approximate, 3.3, Eq. 7-8         | mathematical form      |
| `rnd_emb_qk`      | Random-fixed (RndEmbQK), 3.4, Eq. 9-10 | sequence dependency   |
| `fixed_seq_qk`    | Text-fixed (FixedSeqQK), 3.4, Eq. 11-12 | sequence dependency  |
| `static_emb_qk`   | StaticEmbQK, 3.5, Eq. 13              | current-layer Q and K  |
| `fixed`           | not in the paper (see below)          | sequence dependency    |

Every variant honours `is_causal`, `attn_mask` (bool or float, key padding or full pattern) and
a `KVCache`, with attnlab's conventions (a query with no allowed key outputs zeros). Parameter
counts match standard attention (4 C^2) as in the paper (mlp up to rounding of its hidden
width), except `fixed` (h N_max^2 + 2 C^2: 16.8M per layer at h=4 and the default N_max=2048).

Deviations and readings:
- Approximate (Eq. 6): A_ij = T(s_ij) / sum_j' T(s_ij'), T(s) = 1 + s + s^2/2, s = q.k/sqrt(d),
  as in Based (Arora et al., 2024), which the paper follows. Appendix I (Eq. 14-17) writes the
  recurrent form as a sum of three terms that each carry their own denominator; read literally
  that is a different model, so we take it as notation for the single-normaliser form above
  (which Eq. 6 and Based define). Computed in its quadratic form; T(s) >= 1/2, so no row divides
  by zero. A float mask m multiplies the weights by exp(m) (what adding m to the scores does for
  softmax), so -inf removes a key and bool and float masks agree.
- Non-approximate (Eq. 7-8, 18): the score of key j is its own s_j = SiLU(q_j).k_j / sqrt(d), and
  query i averages the values of its visible keys with weights softmax_j(s_j). Checked against
  the paper's text (arXiv 2510.11602v1, Sec. 3.3 and App. I): Eq. 7 is A = Softmax((Q o K) 1^T
  / sqrt(d_h)), "element-wise self-gating, multiplying Q and K derived from the same hidden
  state, and normalizes the result across time steps", Q = SiLU(H W_Q) (Eq. 8), and Eq. 18
  writes o_i = (sum_{j<i} e^{q_j k_j} v_j + e^{q_i k_i} v_i) / (sum_{j<i} e^{q_j k_j} + e^{q_i k_i}),
  whose denominator "strictly increases with the index i". The weights depend on the key
  alone by design; the paper only trains causal LMs. Without a causal mask every query row sees
  the same keys and gets the same output; that is the formula, not a misreading.
- MLP (Eq. 4-5): "each token ... only attending to itself": the attention matrix is the
  identity, so the output of token i is GatedMLP(x_i) when token i may attend to itself
  (key i allowed for query i, per head slice of the output), and zero otherwise. Hidden width
  round(4 C / 3) matches 4 C^2 parameters (three C x m matrices), as the paper matches counts.
- RndEmbQK / FixedSeqQK (Eq. 9-12): Q and K come from a fixed sequence X (N_max, C) rather
  than the input, so the attention map is the same for every input. In the paper X is the
  fixed sequence after the Transformer blocks below layer l (random embeddings eps ~ N(0,
  sigma^2 I), or the embedded first 2048 tokens of FineWeb). A single layer cannot run the
  stack, so the module holds X itself: eps drawn once (`seed`, `fixed_std` = sigma) for
  `rnd_emb_qk`, or the caller's `fixed_states` (e.g. Emb(t_s)) for `fixed_seq_qk`, which is the
  paper's layer-1 case. A stack that reproduces Eq. 9/11 exactly passes its layer-l hidden
  states of the fixed sequence as `forward(..., fixed_states=X_l)`. Query i (absolute position
  p, counting cached tokens) uses row p of X; the longest sequence is `max_seq_len`.
- StaticEmbQK (Eq. 13): Q, K = e W_Q, e W_K with e the layer-0 input embeddings, passed as
  `embeddings=` (see the class docstring); V comes from the current hidden state.
- `fixed` (attnlab's extension, not one of the paper's variants): a learned
  (h, N_max, N_max) logit table per layer, softmax over the allowed keys. This is the MLP-Mixer
  style map whose parameter count grows with N_max, which the paper cites as inspiration and
  avoids (section 3.4); it is here as the "learned, input-independent weights" reference point.
- Hybrid layouts (`hybrid_variants`) follow Table 11 where the text differs: the text calls
  "bottom" the initial layers 1-6, the table keeps standard attention in 13-24 (so 1-12 use the
  variant); we follow the table. Other sizes than 24 layers scale the same halves and quarters.
- The paper's models are Qwen2.5 blocks (RMSNorm, RoPE, MHA); RoPE is not part of this module.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.masks import allowed_and_bias, check_attn_mask
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

VARIANTS = ("standard", "mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk",
            "static_emb_qk", "fixed")
_QK_VARIANTS = ("standard", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk")
_FIXED_STATE_VARIANTS = ("rnd_emb_qk", "fixed_seq_qk")
_POSITIONAL_VARIANTS = ("rnd_emb_qk", "fixed_seq_qk", "fixed")
_SOFTMAX_VARIANTS = ("standard", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk", "fixed")
DEFAULT_MAX_SEQ_LEN = 2048          # the paper's training length

# Table 11 (and section 4.2): which 1-based layers keep standard attention, for L layers.
HYBRID_CONFIGS = ("uniform", "all", "even", "odd", "top", "middle", "bottom", "quarter", "first", "last",
                  "bilateral")


def _standard_layer_ids(num_layers: int, config: str) -> set[int]:
    L = num_layers
    table = {
        "uniform": set(),                                    # every layer uses the variant
        "all": set(range(1, L + 1)),                         # every layer standard (the baseline)
        "even": set(range(2, L + 1, 2)),                     # the paper's main hybrid (section 4.2)
        "odd": set(range(1, L + 1, 2)),
        "top": set(range(1, L // 2 + 1)),                    # upper half uses the variant
        "middle": set(range(1, L // 4 + 1)) | set(range(L - L // 4 + 1, L + 1)),
        "bottom": set(range(L // 2 + 1, L + 1)),             # lower half uses the variant (Table 11)
        "quarter": set(range(4, L + 1, 4)),                  # "25%": every fourth layer standard
        "first": {1},
        "last": {L},
        "bilateral": {1, L},
    }
    return table[config]


def hybrid_variants(num_layers: int, variant: str, standard_layers: str | Iterable[int] = "even") -> list[str]:
    """Per-layer mechanism names for a stack: "deconstructed:standard" where standard attention
    is kept, "deconstructed:<variant>" elsewhere.

    `standard_layers` is one of HYBRID_CONFIGS (Table 11 of the paper, generalised from 24 layers
    to `num_layers`; "uniform" = no standard layer, "quarter" = the paper's "25%") or an iterable
    of 1-based layer ids. The paper's main hybrid keeps standard attention in even layers.

        attnlab.Transformer(dim, h, layers=hybrid_variants(24, "rnd_emb_qk", "even"))

    Layers that need options (max_seq_len, fixed_states) can be given as (name, options) pairs
    by mapping over the returned names.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"hybrid_variants: num_layers must be a positive int, got {num_layers!r}")
    if variant not in VARIANTS:
        raise ValueError(f"hybrid_variants: unknown variant {variant!r}; expected one of {VARIANTS}")
    if isinstance(standard_layers, str):
        if standard_layers not in HYBRID_CONFIGS:
            raise ValueError(f"hybrid_variants: unknown configuration {standard_layers!r}; expected one of "
                             f"{HYBRID_CONFIGS} or an iterable of 1-based layer ids")
        keep = _standard_layer_ids(num_layers, standard_layers)
    else:
        keep = set(standard_layers)
        bad = sorted(i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= num_layers)
        if bad:
            raise ValueError(f"hybrid_variants: standard layer ids must be ints in [1, {num_layers}], got {bad}")
    return [f"deconstructed:{'standard' if i in keep else variant}" for i in range(1, num_layers + 1)]


def _taylor_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None, scale: float,
                      dropout_p: float, hook_scores=None, hook_probs=None) -> Tensor:
    """Eq. 6: A_ij = T(s_ij) / sum_j T(s_ij) with T(s) = 1 + s + s^2 / 2 and s = q.k * scale.

    q (B, h, N, d), k and v (B, h, M, d) -> (B, h, N, d). Float32 (float64 for float64 input).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(compute), k.to(compute)) * scale   # (B, h, N, M)
    if hook_scores is not None:
        scores = hook_scores(scores)
    weights = 1.0 + scores + 0.5 * scores * scores        # second-order Taylor of exp, >= 1/2
    row_valid = allowed.any(-1, keepdim=True)             # (B|1, h|1, N, 1)
    if bias is not None:   # a float mask m scales the weight by exp(m), as it does for softmax
        bias = bias.to(compute).masked_fill(~allowed, float("-inf"))
        row_max = bias.amax(-1, keepdim=True).masked_fill(~row_valid, 0.0)
        weights = weights * torch.exp(bias - row_max)
    weights = torch.where(allowed, weights, weights.new_zeros(()))
    denom = torch.where(row_valid, weights.sum(-1, keepdim=True), weights.new_ones(()))
    probs = weights / denom                               # (B, h, N, M); empty rows are 0
    if hook_probs is not None:
        probs = hook_probs(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v.to(compute))                        # (B, h, N, d)
    return out.to(q.dtype)


@register(MechanismSpec(
    name="deconstructed",
    paper="Deconstructing Attention: Investigating Design Principles for Effective Language Modeling",
    year=2025, family="ablation", layout="seq", time="O(N^2 d)",
    memory="O(N^2) (O(N) on SDPA for the softmax variants)",
    exact=False, causal=True, attn_mask=True, kv_cache=True, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2510.11602", variants=VARIANTS,
    provenance="paper",
    source=("arXiv 2510.11602v1: Sec. 3, Eqs. 1-3 (standard), 4-5 (mlp), 6 (approximate), 7-8 "
            "(non_approximate, key-only self-gated scores; recurrent form Eq. 18, App. I), 9-12 "
            "(rnd_emb_qk, fixed_seq_qk), 13 (static_emb_qk); hybrids from Table 11. `fixed` is "
            "attnlab's extension, not in the paper. The authors' code (HUIYINXUE/DeconAttn) was "
            "not reachable"),
    test_kwargs=dict(variant="rnd_emb_qk", max_seq_len=16, seed=0),
    test_configs=(dict(variant="standard"), dict(variant="approximate"), dict(variant="non_approximate"),
                  dict(variant="fixed", max_seq_len=16), dict(variant="mlp"))))
class DeconstructedAttention(nn.Module):
    """x (B, N, C) -> (B, N, C), one of the paper's attention variants (see the module docstring).

    Contract with a Transformer stack (attnlab.models.Block follows it):
    - `variant="static_emb_qk"` sets `needs_embeddings = True`; the stack then passes
      `embeddings=` (B, N, C), the layer-0 input of the stack (token + position embeddings) at
      the same positions as x (with a KV cache: the new tokens only). Queries and keys are
      computed from it, values from x. Other variants have `needs_embeddings = False` and refuse
      `embeddings=`.
    - `rnd_emb_qk` / `fixed_seq_qk` optionally take `fixed_states=` (L, C) or (1|B, L, C): the
      layer's view of the fixed sequence (rows = absolute positions, L >= cached + N). Without
      it the module's own `fixed_states` buffer (N_max, C) is used.
    - "Hybrid" stacks are lists of variants; `hybrid_variants()` writes the paper's layouts.

    Options: `variant` (default "rnd_emb_qk"), `max_seq_len` (N_max for the input-independent
    variants, default 2048, the paper's training length), `seed` and `fixed_std` (the random
    embeddings of rnd_emb_qk), `fixed_states` (the fixed sequence, required by fixed_seq_qk),
    `mlp_hidden` (mlp variant), `scale` (default 1/sqrt(d)), `backend` (softmax variants only).
    In the mlp variant qkv_bias goes to the gate/up projections and proj_bias to the down one.
    Options that a variant does not use (max_seq_len where nothing is indexed by position,
    attn_drop for mlp, ...) raise ValueError rather than being ignored.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, variant: str = "rnd_emb_qk", max_seq_len: int | None = None,
                 seed: int | None = None, fixed_std: float | None = None, fixed_states: Tensor | None = None,
                 mlp_hidden: int | None = None, proj_bias: bool = True, scale: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        name = "deconstructed"
        self.head_dim = check_dims(name, dim, num_heads)
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"{name}: unknown variant {variant!r}; expected one of {VARIANTS}")
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        if scale is not None:
            check_positive(name, "scale", scale)
        if backend is not None and variant not in _SOFTMAX_VARIANTS:
            raise ValueError(f"{name}: variant {variant!r} does not run through attnlab.ops.attention, so "
                             f"backend={backend!r} cannot apply; backends serve {_SOFTMAX_VARIANTS}")
        unused = [opt for opt, value, users in (
            ("seed", seed, ("rnd_emb_qk",)), ("fixed_std", fixed_std, ("rnd_emb_qk",)),
            ("fixed_states", fixed_states, _FIXED_STATE_VARIANTS), ("mlp_hidden", mlp_hidden, ("mlp",)))
            if value is not None and variant not in users]
        if max_seq_len is not None and variant not in _POSITIONAL_VARIANTS:
            unused.append("max_seq_len")
        if attn_drop and variant == "mlp":
            unused.append("attn_drop")
        if unused:
            raise ValueError(f"{name}: option(s) {unused} do not apply to variant {variant!r}")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len <= 0):
            raise ValueError(f"{name}: max_seq_len must be a positive int, got {max_seq_len!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.variant = dim, num_heads, variant
        self.scale = scale
        self.backend = backend
        self.attn_drop = attn_drop
        self.needs_embeddings = variant == "static_emb_qk"
        self.max_seq_len = None

        if variant in _QK_VARIANTS:
            self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias, **factory)     # [q heads | k heads]
        if variant != "mlp":
            self.v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
            self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        else:   # Eq. 5: FC_Dn(SiLU(FC_Gt(H)) * FC_Up(H)), hidden width matched to 4 C^2 parameters
            hidden = max(1, round(4 * dim / 3)) if mlp_hidden is None else mlp_hidden
            if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
                raise ValueError(f"{name}: mlp_hidden must be a positive int, got {mlp_hidden!r}")
            # input projections take qkv_bias, the output projection proj_bias, as in attention
            self.gate = nn.Linear(dim, hidden, bias=qkv_bias, **factory)
            self.up = nn.Linear(dim, hidden, bias=qkv_bias, **factory)
            self.down = nn.Linear(hidden, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

        if variant in _FIXED_STATE_VARIANTS:
            if fixed_states is not None:
                states = self._check_fixed_states(fixed_states, what="fixed_states")
                if states.shape[0] != 1:
                    raise ValueError(f"{name}: the fixed_states option must be (L, C) or (1, L, C), "
                                     f"got {tuple(fixed_states.shape)}")
                states = states[0].detach().clone()
                if max_seq_len is not None and max_seq_len != states.shape[0]:
                    raise ValueError(f"{name}: max_seq_len={max_seq_len} disagrees with fixed_states of "
                                     f"{states.shape[0]} positions")
            elif variant == "fixed_seq_qk":
                raise ValueError(f"{name}: variant 'fixed_seq_qk' needs fixed_states= (L, C), the embedded "
                                 "fixed text Emb(t_s) (Eq. 11); use 'rnd_emb_qk' for random embeddings")
            else:   # Eq. 9: eps ~ N(0, sigma^2 I), drawn once, reproducible with `seed`
                std = 1.0 if fixed_std is None else fixed_std
                if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0 or math.isinf(std):
                    raise ValueError(f"{name}: fixed_std must be a positive finite number, got {fixed_std!r}")
                if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                    raise TypeError(f"{name}: seed must be an int or None, got {type(seed).__name__}")
                gen = None
                if seed is not None:
                    gen = torch.Generator().manual_seed(seed)
                length = DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len
                states = torch.randn(length, dim, generator=gen, dtype=torch.float64) * std
            # A buffer, not a parameter: the fixed sequence is not trained (Eq. 9, 11).
            self.register_buffer("fixed_states", states.to(device=device, dtype=dtype or torch.get_default_dtype()))
            self.max_seq_len = self.fixed_states.shape[0]
        elif variant == "fixed":
            length = DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len
            self.logits = nn.Parameter(torch.empty(num_heads, length, length, **factory))   # (h, N_max, N_max)
            nn.init.trunc_normal_(self.logits, std=0.02)
            self.max_seq_len = length

        # Identity hook points for probes: shapes in comments.
        # non_approximate: hook_k sees the per-key scores s_j (B, h, M, 1) and hook_q ones (B, h, N, 1);
        # fixed: both are zeros (B, h, ., 1), the logits enter as a float mask.
        self.hook_q = HookPoint()    # (B, h, N, d)
        self.hook_k = HookPoint()    # (B, h, M, d) after the cache
        self.hook_v = HookPoint()    # (B, h, M, d) after the cache
        # Scores and probs fire on the eager path: backend="reference" for the softmax variants,
        # always for approximate (s_ij and Eq. 6's A_ij). fixed: the scores are the logits.
        self.hook_scores = HookPoint()  # (B, h, N, M), the softmax (Taylor) input
        self.hook_probs = HookPoint()   # (B, h, N, M), the attention weights
        self.hook_out = HookPoint()  # (B, h, N, d) per-head outputs before proj; mlp: (B, N, C) the MLP output
        # mlp has no q, k, v or attention matrix: only hook_out fires.
        qkv_hooks = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs")
        self.hook_names = ("hook_out",) if variant == "mlp" else (*qkv_hooks, "hook_out")
        self.optional_hook_names = qkv_hooks if variant == "mlp" else ()
        self.eager_hook_names = ("hook_scores", "hook_probs") if variant in _SOFTMAX_VARIANTS else ()

    def extra_repr(self) -> str:
        extra = f", max_seq_len={self.max_seq_len}" if self.max_seq_len is not None else ""
        return f"dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}{extra}"

    # --- inputs --------------------------------------------------------------------------------

    def _check_fixed_states(self, states, *, what: str, batch: int | None = None) -> Tensor:
        """(L, C) or (1|B, L, C) floating -> (1|B, L, C)."""
        if not isinstance(states, Tensor) or not states.is_floating_point():
            got = type(states).__name__ if not isinstance(states, Tensor) else states.dtype
            raise TypeError(f"deconstructed: {what} must be a floating point tensor (L, C={self.dim}), got {got}")
        shape = tuple(states.shape)
        if states.dim() == 2:
            states = states[None]
        if states.dim() != 3 or states.shape[-1] != self.dim or states.shape[1] == 0 \
                or (batch is not None and states.shape[0] not in (1, batch)):
            want = f"(L, {self.dim}) or (1{'' if batch is None else f'|{batch}'}, L, {self.dim})"
            raise ValueError(f"deconstructed: {what} must be {want}, got {shape}")
        return states

    def _check_embeddings(self, embeddings, x: Tensor) -> Tensor:
        if not self.needs_embeddings:
            if embeddings is not None:
                raise ValueError(f"deconstructed: variant {self.variant!r} takes no embeddings= (only "
                                 "'static_emb_qk' computes queries and keys from the input embeddings)")
            return None
        if embeddings is None:
            raise ValueError("deconstructed: variant 'static_emb_qk' needs embeddings= (B, N, C), the stack's "
                             f"layer-0 input at the positions of x {tuple(x.shape)} (Eq. 13)")
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"deconstructed: embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.shape != x.shape:
            raise ValueError(f"deconstructed: embeddings must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(embeddings.shape)}")
        if embeddings.dtype != x.dtype:
            raise TypeError(f"deconstructed: embeddings must have the dtype of x ({x.dtype}), got {embeddings.dtype}")
        return embeddings

    def _heads(self, t: Tensor) -> Tensor:
        """(B, n, C) -> (B, h, n, d)."""
        B, n, _ = t.shape
        return t.reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2)

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, embeddings: Tensor | None = None,
                fixed_states: Tensor | None = None) -> Tensor:
        check_tokens("deconstructed", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        embeddings = self._check_embeddings(embeddings, x)
        if fixed_states is not None and self.variant not in _FIXED_STATE_VARIANTS:
            raise ValueError(f"deconstructed: variant {self.variant!r} takes no fixed_states= "
                             f"(only {_FIXED_STATE_VARIANTS})")
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        start = len(cache) if cache is not None else 0       # absolute position of x[:, 0]
        end = start + N
        if self.max_seq_len is not None and fixed_states is None and end > self.max_seq_len:
            raise ValueError(f"deconstructed: variant {self.variant!r} holds {self.max_seq_len} positions "
                             f"(max_seq_len), got a sequence reaching position {end}")
        scale = 1.0 / math.sqrt(d) if self.scale is None else float(self.scale)
        dropout_p = self.attn_drop if self.training else 0.0

        if self.variant == "mlp":
            return self._forward_mlp(x, attn_mask, is_causal, cache)

        v = self._heads(self.v(x))                                           # (B, h, N, d)
        if self.variant == "fixed":
            # Scores are the learned logits: all-zero q/k (B, h, ., 1) make q.k^T = 0 and the logits
            # enter as a float mask, so ops.attention does the masking, softmax and empty-row zeroing.
            q = x.new_zeros(B, h, N, 1)
            k = x.new_zeros(B, h, N, 1)
        elif self.variant in _FIXED_STATE_VARIANTS:
            states = self.fixed_states if fixed_states is None else fixed_states
            states = self._check_fixed_states(states, what="fixed_states", batch=B)
            if end > states.shape[1]:
                raise ValueError(f"deconstructed: fixed_states holds {states.shape[1]} positions, "
                                 f"the sequence reaches position {end}")
            if states.dtype != x.dtype:
                raise TypeError(f"deconstructed: fixed_states dtype {states.dtype} differs from x ({x.dtype})")
            q, k = self.qk(states[:, start:end]).chunk(2, dim=-1)           # (1|B, N, C) each (Eq. 10, 12)
            q = self._heads(q).expand(B, h, N, d)                            # (B, h, N, d), same for all inputs
            k = self._heads(k).expand(B, h, N, d)
        else:
            source = embeddings if self.variant == "static_emb_qk" else x  # Eq. 13 vs Eq. 3
            q, k = (self._heads(t) for t in self.qk(source).chunk(2, dim=-1))  # (B, h, N, d) each
            if self.variant == "non_approximate":
                q = F.silu(q)                                                # Eq. 8
                # Eq. 7: each key's own score s_j = SiLU(q_j).k_j * scale, (B, h, N, 1)
                k = (q * k).sum(-1, keepdim=True) * scale
                q = torch.ones_like(k)                                       # scores_ij = 1 * s_j

        if cache is not None:
            k, v = cache.update(k, v)                                        # (B, h, M, .), M = start + N
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        M = k.shape[2]

        if self.variant == "approximate":
            allowed, bias = allowed_and_bias(attn_mask, is_causal, B, h, N, M, x.device)
            out = _taylor_attention(q, k, v, allowed, bias, scale, dropout_p, self.hook_scores, self.hook_probs)
        elif self.variant == "fixed":
            logits = self.logits[:, start:end, :M].to(x.dtype)[None]         # (1, h, N, M)
            if attn_mask is not None:
                mask = check_attn_mask(attn_mask, B, h, N, M).to(x.device)
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
                logits = logits + mask.to(x.dtype)                           # (B|1, h, N, M)
            out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                            attn_mask=logits, is_causal=is_causal, scale=1.0,
                            dropout_p=dropout_p, backend=self.backend)
        else:
            out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                            attn_mask=attn_mask, is_causal=is_causal,
                            scale=1.0 if self.variant == "non_approximate" else scale,
                            dropout_p=dropout_p, backend=self.backend)
        out = self.hook_out(out)                                             # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                           # (B, N, C)
        return self.proj_drop(self.proj(out))

    def _forward_mlp(self, x: Tensor, attn_mask, is_causal: bool, cache: KVCache | None) -> Tensor:
        """Eq. 4-5 with the identity attention matrix: token i keeps GatedMLP(x_i) if it may attend
        to itself (per head slice of the output), else outputs zero."""
        B, N, C = x.shape
        h = self.num_heads
        if cache is not None:   # nothing to remember but the length (positions for the mask)
            cache.update(x.new_zeros(B, h, N, 0), x.new_zeros(B, h, N, 0))
        M = (len(cache) if cache is not None else N)
        out = self.down(F.silu(self.gate(x)) * self.up(x))                  # (B, N, C)
        if attn_mask is not None or is_causal:
            allowed, _ = allowed_and_bias(attn_mask, is_causal, B, h, N, M, x.device)
            idx = torch.arange(N, device=x.device)
            self_allowed = allowed[..., idx, idx + (M - N)]                  # (B|1, h|1, N): key i for query i
            out = self._heads(out) * self_allowed[..., None].to(out.dtype)  # (B, h, N, d)
            out = out.transpose(1, 2).reshape(B, N, C)                       # (B, N, C)
        return self.proj_drop(self.hook_out(out))
