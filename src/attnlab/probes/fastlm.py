"""Faster inference inside a HuggingFace causal LM: per-layer attention rules run through SDPA, and
the measurement of what they cost and what they save.

    plan = Plan({l: Full() for l in range(L)})          # or HyLRA's / Flux's plans
    plan.rules[12] = Streaming(sink=64, window=512)
    with fast_attention(model, plan):
        out = model(ids, use_cache=True)                 # prefill, then decode steps as usual

    report = measure(model, plan, prefix, continuation)  # prefill s, decode tok/s, KV bytes, NLL, agreement

How it hooks in: a function registered with transformers' `AttentionInterface` under the name
"attnlab_fast" receives each layer's query (B, Hq, q, D, after RoPE) and the layer's whole key and
value (B, Hkv, kv, D, after the cache update, KV heads not repeated) and hands them to the layer's
rule. The mask side registers transformers' own `sdpa_mask` under the same name, so a causal model
stays causal on every path a rule does not handle itself (without it the mask arrives as None).
The rules assume sequences without padding (a batch of equal-length rows, the benchmark case) and
raise on a padded mask rather than silently attend to padding.

Rules (each computes exactly the attention over its chosen keys, in float32 through SDPA; nothing
of size q x kv is built for the sparse ones):
    Full()                    every key; SDPA with is_causal (prefill) or plain (decode), GQA in SDPA
    Streaming(sink, window)   the first `sink` tokens and the last `window` before each query (the
                              sliding window + sinks of StreamingLLM, Flux's "streaming" type)
    BlockTopK(...)            HyLRA's fresh top-k: key blocks of `block` tokens scored against the
                              group-mean query, the top `k_blocks` (sink and recent blocks forced),
                              shared by every head; the chosen blocks are kept in `Plan.state` so that
                              a later `Reuse()` layer attends to the same blocks without scoring
    Reuse()                   the most recent BlockTopK layer's blocks

At prefill a sparse rule attends block-wise: queries in blocks of `block` tokens, each block against
its own gathered key blocks (one SDPA call over a (B*Hkv, nQ, g*block, kb*block) batch, the mask
only (nQ, g*block, kb*block)); at decode (q == 1) it gathers the chosen key tokens and calls SDPA.
`Plan.timings` accumulates the seconds spent inside the attention function per layer, so that a
report can show where the time went (the issue's "time breakdown").
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLEMENTATION = "attnlab_fast"


# --------------------------------------------------------------------------- kernels

def _gqa_groups(q: Tensor, k: Tensor) -> int:
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    return Hq // Hkv


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
    """Causal attention of the last q.shape[2] positions over every key: (B, Hq, q, D).

    q (B, Hq, q, D), k and v (B, Hkv, kv, D), kv >= q (the queries are the last q positions)."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = _gqa_groups(q, k) > 1
    if nq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=True, enable_gqa=gqa)
    i = torch.arange(nk - nq, nk, device=q.device).view(-1, 1)
    j = torch.arange(nk, device=q.device).view(1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i, scale=scaling, enable_gqa=gqa)


def block_sparse_prefill(q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, block: int, scaling: float) -> Tensor:
    """Causal block-sparse attention of N queries over the same N keys: (B, Hq, N, D).

    blocks: (nQ, kb) int64, for each query block the key blocks it attends to (-1 = none; a block
    after the query block is ignored, so is a repeated one); every query block must list itself
    (its causal diagonal). Shared by the batch and the heads (HyLRA selects one set for all heads).
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    nb = math.ceil(N / block)
    if blocks.shape[0] != nb:
        raise ValueError(f"blocks: expected {nb} query blocks of {block} for N = {N}, got {tuple(blocks.shape)}")
    pad = nb * block - N
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    kb = blocks.shape[1]
    qi = torch.arange(nb, device=q.device).view(-1, 1)
    valid = (blocks >= 0) & (blocks <= qi)
    # a block listed twice would count twice in the softmax: keep its first occurrence only
    same = (blocks.unsqueeze(2) == blocks.unsqueeze(1)) & torch.ones(kb, kb, dtype=torch.bool,
                                                                        device=q.device).tril(-1)
    valid &= ~same.any(2)
    idx = blocks.clamp_min(0)
    # 4-D for SDPA's fused CPU kernel (batch B*Hkv, the query blocks as its "heads"); a 5-D batch
    # falls back to the unfused path and was 3x slower
    kg = k.view(B, Hkv, nb, block, D)[:, :, idx].reshape(B * Hkv, nb, kb * block, D)    # (B*Hkv, nQ, kb*bs, D)
    vg = v.view(B, Hkv, nb, block, D)[:, :, idx].reshape(B * Hkv, nb, kb * block, D)
    qg = q.view(B, Hkv, g, nb, block, D).permute(0, 1, 3, 2, 4, 5).reshape(B * Hkv, nb, g * block, D)
    qpos = (qi * block + torch.arange(block, device=q.device).view(1, -1)).repeat(1, g)            # (nQ, g*bs)
    kpos = (idx.unsqueeze(-1) * block + torch.arange(block, device=q.device)).reshape(nb, kb * block)
    kvalid = valid.repeat_interleave(block, dim=1) & (kpos < N)                                     # (nQ, kb*bs)
    mask = kvalid.unsqueeze(1) & (kpos.unsqueeze(1) <= qpos.unsqueeze(2))                          # (nQ, g*bs, kb*bs)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask.unsqueeze(0), scale=scaling)  # (B*Hkv, nQ, g*bs, D)
    out = out.view(B, Hkv, nb, g, block, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, nb * block, D)
    return out[:, :, :N]


def gathered_decode(q: Tensor, k: Tensor, v: Tensor, tokens: Tensor, scaling: float) -> Tensor:
    """Attention of the last position(s) over the key tokens `tokens` (1-D, sorted, all before or at
    the queries): (B, Hq, q, D). With q > 1 the queries are the last q positions and causal among
    themselves; `tokens` must then include them."""
    nq, nk = q.shape[2], k.shape[2]
    ks, vs = k.index_select(2, tokens), v.index_select(2, tokens)     # 1.7x faster than k[:, :, tokens] on CPU
    gqa = _gqa_groups(q, k) > 1
    if nq == 1:
        return F.scaled_dot_product_attention(q, ks, vs, scale=scaling, enable_gqa=gqa)
    qpos = torch.arange(nk - nq, nk, device=q.device).view(-1, 1)
    return F.scaled_dot_product_attention(q, ks, vs, attn_mask=tokens.view(1, -1) <= qpos, scale=scaling,
                                          enable_gqa=gqa)


# --------------------------------------------------------------------------- rules

class Rule:
    """How one layer attends. `__call__(q, k, v, scaling, plan, layer)` -> (B, Hq, q, D)."""

    kind = "rule"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scaling: float, plan: "Plan", layer: int) -> Tensor:
        raise NotImplementedError

    def key_fraction(self, nq: int, nk: int) -> float:
        """The fraction of the causal (query, key) pairs this rule computes, for FLOP accounting."""
        return 1.0

    def to_json(self) -> dict:
        return {"kind": self.kind}


class Full(Rule):
    kind = "full"

    def __call__(self, q, k, v, scaling, plan, layer):
        return dense_attention(q, k, v, scaling)


def _causal_pairs(nq: int, nk: int) -> float:
    """(query, key) pairs of causal attention of the last nq positions over nk keys."""
    return nq * (nk - nq) + nq * (nq + 1) / 2


@dataclass
class Streaming(Rule):
    """The first `sink` tokens and the `window` most recent ones (the query included)."""

    sink: int = 64
    window: int = 512
    block: int = 64
    kind = "streaming"

    def __post_init__(self):
        for name in ("sink", "window", "block"):
            if int(getattr(self, name)) < (1 if name != "sink" else 0):
                raise ValueError(f"Streaming: {name} must be positive, got {getattr(self, name)}")

    def __call__(self, q, k, v, scaling, plan, layer):
        nq, nk = q.shape[2], k.shape[2]
        if nq > 1 and nq == nk:
            if nk <= self.sink + self.window:
                return dense_attention(q, k, v, scaling)
            return block_sparse_prefill(q, k, v, streaming_blocks(nk, self.block, self.sink, self.window,
                                                                  device=q.device), self.block, scaling)
        if nq > 1:
            # a chunk after a cache: exact per-query windows need a mask; keep it simple and exact
            i = torch.arange(nk - nq, nk, device=q.device).view(-1, 1)
            j = torch.arange(nk, device=q.device).view(1, -1)
            mask = (j <= i) & ((j < self.sink) | (j > i - self.window))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                  enable_gqa=_gqa_groups(q, k) > 1)
        lo = nk - self.window
        if lo <= self.sink:
            return dense_attention(q, k, v, scaling)                 # everything is in sink + window
        # two contiguous slices: a copy of sink + window tokens, cheaper than an index gather
        ks = torch.cat([k[:, :, :self.sink], k[:, :, lo:]], 2)
        vs = torch.cat([v[:, :, :self.sink], v[:, :, lo:]], 2)
        return F.scaled_dot_product_attention(q, ks, vs, scale=scaling, enable_gqa=_gqa_groups(q, k) > 1)

    def key_fraction(self, nq, nk):
        keep = sum(min(i + 1, self.sink + self.window) for i in range(nk - nq, nk))
        return keep / _causal_pairs(nq, nk)

    def to_json(self):
        return {"kind": self.kind, "sink": self.sink, "window": self.window, "block": self.block}


def streaming_blocks(n: int, block: int, sink: int, window: int, *, device=None) -> Tensor:
    """(nQ, kb) key blocks covering the sink tokens and each query block's window, at block granularity
    (a query block attends to whole blocks: up to block - 1 more keys than the token-exact window)."""
    nb = math.ceil(n / block)
    sink_b = math.ceil(sink / block)
    win_b = math.ceil(window / block)
    i = torch.arange(nb, device=device).view(-1, 1)
    local = i - torch.arange(win_b, device=device).view(1, -1)                  # (nQ, win_b): i, i-1, ...
    sinks = torch.arange(sink_b, device=device).view(1, -1).expand(nb, -1)
    blocks = torch.cat([sinks, local], 1)
    return torch.where(blocks >= 0, blocks, torch.full_like(blocks, -1))


@dataclass
class BlockTopK(Rule):
    """Fresh top-k key blocks (HyLRA's "hamming layer", here with exact scores, see attnlab.probes.hylra).

    Scores: the query averaged over its GQA group (and at prefill over the query block) dotted with
    every key; a key block's score is its best token's, maximised over the KV heads (the official
    code takes the best-matching token and the best KV head, with Hamming distances of sign hashes
    instead of dot products). Kept: `k_blocks` blocks including `sink_blocks` first and
    `recent_blocks` last (at prefill: the query block and the ones before it), one set for all heads.
    """

    k_blocks: int = 8
    block: int = 64
    sink_blocks: int = 1
    recent_blocks: int = 4
    prefill: str = "sparse"                 # "sparse": block top-k at prefill too; "full": as the official code
    kind = "topk"

    def __post_init__(self):
        if self.k_blocks < self.sink_blocks + self.recent_blocks:
            raise ValueError(f"BlockTopK: k_blocks ({self.k_blocks}) must cover sink_blocks + recent_blocks "
                             f"({self.sink_blocks} + {self.recent_blocks})")
        if self.prefill not in ("sparse", "full"):
            raise ValueError(f"BlockTopK: prefill must be 'sparse' or 'full', got {self.prefill!r}")

    def select_decode(self, q: Tensor, k: Tensor) -> Tensor:
        """(kb,) the chosen key blocks (sorted) for the last query."""
        B, Hq, _, D = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        nb = math.ceil(nk / self.block)
        if nb <= self.k_blocks:
            return torch.arange(nb, device=q.device)
        qbar = q[:, :, -1].reshape(B, Hkv, Hq // Hkv, D).mean(2, keepdim=True)    # (B, Hkv, 1, D)
        s = (qbar @ k.transpose(-1, -2)).view(B * Hkv, nk).amax(0)                   # (nk,) best over heads
        s = F.pad(s, (0, nb * self.block - nk), value=float("-inf"))
        score = s.view(nb, self.block).amax(-1)                                     # (nb,)
        score[: self.sink_blocks] = float("inf")
        score[nb - self.recent_blocks:] = float("inf")
        return score.topk(self.k_blocks).indices.sort().values

    def select_prefill(self, q: Tensor, k: Tensor) -> Tensor:
        """(nQ, kb) the chosen key blocks per query block (-1 where a block has fewer candidates)."""
        B, Hq, N, D = q.shape
        Hkv = k.shape[1]
        bs, nb = self.block, math.ceil(N / self.block)
        pad = nb * bs - N
        qp = F.pad(q, (0, 0, 0, pad)) if pad else q
        qbar = qp.view(B, Hkv, Hq // Hkv, nb, bs, D).mean((2, 4))                  # (B, Hkv, nQ, D)
        s = torch.einsum("bhqd,bhnd->bhqn", qbar, k)                                # (B, Hkv, nQ, N)
        s = F.pad(s, (0, pad), value=float("-inf"))
        score = s.view(B, Hkv, nb, nb, bs).amax(-1).amax(1).amax(0)                 # (nQ, nK)
        i = torch.arange(nb, device=q.device).view(-1, 1)
        j = torch.arange(nb, device=q.device).view(1, -1)
        forced = (j < self.sink_blocks) | ((i - j >= 0) & (i - j < self.recent_blocks))
        score = torch.where(forced, torch.full_like(score, float("inf")), score)
        score = torch.where(j > i, torch.full_like(score, float("-inf")), score)
        kb = min(self.k_blocks, nb)
        top = score.topk(kb, dim=1)
        return torch.where(torch.isneginf(top.values), torch.full_like(top.indices, -1), top.indices)

    def __call__(self, q, k, v, scaling, plan, layer):
        nq, nk = q.shape[2], k.shape[2]
        if nq > 1 and nq == nk:
            if self.prefill == "full" or math.ceil(nk / self.block) <= self.k_blocks:
                plan.state["blocks"] = None
                return dense_attention(q, k, v, scaling)
            blocks = self.select_prefill(q, k)
            plan.state["blocks"] = ("prefill", nk, blocks)
            return block_sparse_prefill(q, k, v, blocks, self.block, scaling)
        if nq > 1:
            plan.state["blocks"] = None
            return dense_attention(q, k, v, scaling)
        chosen = self.select_decode(q, k)
        plan.state["blocks"] = ("decode", nk, chosen)
        return _attend_blocks(q, k, v, chosen, self.block, scaling)

    def key_fraction(self, nq, nk):
        nb = math.ceil(nk / self.block)
        if nq == 1:
            return min(1.0, self.k_blocks * self.block / nk)
        if self.prefill == "full" or nb <= self.k_blocks:
            return 1.0
        keys = sum(min(i // self.block + 1, self.k_blocks) * self.block for i in range(nk))
        return min(1.0, keys / _causal_pairs(nq, nk))

    def to_json(self):
        return {"kind": self.kind, "k_blocks": self.k_blocks, "block": self.block, "sink_blocks": self.sink_blocks,
                "recent_blocks": self.recent_blocks, "prefill": self.prefill}


def _attend_blocks(q, k, v, chosen: Tensor, block: int, scaling: float) -> Tensor:
    nk = k.shape[2]
    tokens = (chosen.view(-1, 1) * block + torch.arange(block, device=q.device)).view(-1)
    short = int(chosen[-1]) * block + block - nk            # chosen is sorted: only its last block can run past nk
    return gathered_decode(q, k, v, tokens[: tokens.numel() - short] if short > 0 else tokens, scaling)


class Reuse(Rule):
    """The blocks the most recent BlockTopK layer chose in this forward (HyLRA's "skip layer")."""

    kind = "reuse"

    def __call__(self, q, k, v, scaling, plan, layer):
        nk = k.shape[2]
        found = plan.state.get("blocks")
        if found is None:
            return dense_attention(q, k, v, scaling)
        phase, n, blocks = found
        if n != nk:
            raise RuntimeError(f"Reuse at layer {layer}: the reused blocks were chosen for {n} keys, this layer "
                               f"has {nk} (a layer with another cache length in between)")
        if phase == "prefill":
            return block_sparse_prefill(q, k, v, blocks, _block_of(plan, layer), scaling)
        return _attend_blocks(q, k, v, blocks, _block_of(plan, layer), scaling)

    def key_fraction(self, nq, nk):
        return math.nan                                           # that of the layer it reuses


def _block_of(plan: "Plan", layer: int) -> int:
    for l in range(layer - 1, -1, -1):
        rule = plan.rules.get(l)
        if isinstance(rule, BlockTopK):
            return rule.block
    raise RuntimeError(f"Reuse at layer {layer}: no BlockTopK layer before it")


RULES = {"full": Full, "streaming": Streaming, "topk": BlockTopK, "reuse": Reuse}


def rule_from_json(obj: dict) -> Rule:
    kind = obj.get("kind")
    if kind not in RULES:
        raise ValueError(f"unknown rule kind {kind!r}; expected one of {sorted(RULES)}")
    args = {k: v for k, v in obj.items() if k != "kind"}
    return RULES[kind](**args)


@dataclass
class Plan:
    """Per-layer rules (missing layers attend fully), the state rules share within a forward, timings."""

    rules: dict[int, Rule] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    timings: dict[int, float] = field(default_factory=dict)
    calls: int = 0

    def rule(self, layer: int) -> Rule:
        return self.rules.get(layer) or _FULL

    def reset_timings(self) -> None:
        self.timings.clear()
        self.calls = 0

    def attention_seconds(self) -> float:
        return float(sum(self.timings.values()))

    def validate(self, num_layers: int) -> None:
        bad = sorted(l for l in self.rules if not 0 <= l < num_layers)
        if bad:
            raise ValueError(f"plan: layers {bad} do not exist in a model of {num_layers} layers")
        for l, rule in sorted(self.rules.items()):
            if isinstance(rule, Reuse) and not any(isinstance(self.rules.get(j), BlockTopK) for j in range(l)):
                raise ValueError(f"plan: layer {l} reuses blocks but no BlockTopK layer comes before it")

    def to_json(self) -> dict:
        return {"rules": {str(l): r.to_json() for l, r in sorted(self.rules.items())}}

    @classmethod
    def from_json(cls, obj: dict) -> "Plan":
        rules = obj.get("rules")
        if not isinstance(rules, dict):
            raise ValueError(f"plan JSON: expected {{'rules': {{layer: rule}}}}, got keys {sorted(obj)}")
        return cls({int(l): rule_from_json(r) for l, r in rules.items()})

    def describe(self, num_layers: int) -> str:
        return " ".join(self.rule(l).kind[0].upper() if not isinstance(self.rule(l), Reuse) else "r"
                        for l in range(num_layers))


_FULL = Full()


# --------------------------------------------------------------------------- the HF hook

def _fast_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    plan: Plan | None = getattr(module, "_attnlab_plan", None)
    if plan is None:
        raise RuntimeError("attnlab_fast attention called outside fast_attention(model, plan)")
    if dropout:
        raise ValueError("attnlab_fast: attention dropout is not supported (use model.eval())")
    if kwargs.get("softcap") is not None or getattr(module, "sliding_window", None):
        raise ValueError("attnlab_fast: soft-capped or sliding-window attention layers are not supported "
                         "(a Llama-style model is expected)")
    if attention_mask is not None:
        m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if not bool(m[..., -1, :].all()):
            raise ValueError("attnlab_fast: padded batches are not supported (the last query must see every key)")
    t0 = time.perf_counter()
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = plan.rule(layer)(query, key, value, scale, plan, layer)
    plan.timings[layer] = plan.timings.get(layer, 0.0) + time.perf_counter() - t0
    plan.calls += 1
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(IMPLEMENTATION, _fast_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def attention_modules(model) -> list:
    """The model's attention modules (those with a layer_idx), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention module with layer_idx found (a HuggingFace "
                         "Llama-style causal LM is expected)")
    return sorted(mods, key=lambda m: m.layer_idx)


@contextmanager
def fast_attention(model, plan: Plan) -> Iterator[Plan]:
    """Run `model`'s attention through `plan` inside the context; restores the implementation after."""
    from attnlab._extras import require
    require("hf", "transformers", what="attnlab.probes.fastlm")
    register()
    mods = attention_modules(model)
    plan.validate(len(mods))
    saved = model.config._attn_implementation
    for m in mods:
        m._attnlab_plan = plan
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield plan
    finally:
        model.set_attn_implementation(saved)
        for m in mods:
            m.__dict__.pop("_attnlab_plan", None)


# --------------------------------------------------------------------------- measurement

def kv_bytes(cache) -> int:
    """Bytes held by a DynamicCache's keys and values over all layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def prefill(model, ids: Tensor, *, keep_logits: int = 1):
    """(logits of the last keep_logits positions, the DynamicCache) after one forward over ids (1, N)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep_logits)
    return out.logits, cache


@torch.no_grad()
def decode_step(model, token: Tensor, cache, position: int) -> Tensor:
    """Logits (1, V) of one token (1, 1) at absolute `position` on top of `cache`."""
    pos = torch.tensor([[position]], device=token.device)
    return model(input_ids=token, cache=cache, use_cache=True, position_ids=pos,
                 logits_to_keep=1).logits[:, -1]


@dataclass
class Measured:
    """One run of a model (under a plan, or plain) on one prefix."""

    prefill_s: float
    decode_s_per_token: float
    kv_bytes: int
    nll: float                              # mean next-token NLL of the continuation, teacher-forced
    greedy: list[int]
    attention_prefill_s: float = math.nan   # seconds inside the attention function at prefill
    attention_decode_s: float = math.nan

    def to_json(self) -> dict:
        return dict(self.__dict__)


def run_once(model, ids: Tensor, continuation: Tensor, *, greedy_tokens: int = 32, plan: Plan | None = None,
             model_hooks=None) -> Measured:
    """Prefill `ids` (1, N), then teacher-force `continuation` (1, M) one token at a time (the NLL of
    each next token, decode timing) and, from a fresh prefill, generate `greedy_tokens` greedily.
    The prefill time (and its attention seconds) is the faster of the two prefills.

    plan: None = the model as loaded; else run inside fast_attention(model, plan). model_hooks: a
    context-manager factory applied around every forward (e.g. ADSC's token downsampling)."""
    from contextlib import nullcontext
    ctx = (lambda: fast_attention(model, plan)) if plan is not None else nullcontext
    hooks = model_hooks or nullcontext
    N = ids.shape[1]
    with ctx(), hooks():
        if plan is not None:
            plan.reset_timings()
        t0 = time.perf_counter()
        logits, cache = prefill(model, ids)
        t_prefill = time.perf_counter() - t0
        att_prefill = plan.attention_seconds() if plan is not None else math.nan
        kv = kv_bytes(cache)
        nll = [float(F.cross_entropy(logits[:, -1].float(), continuation[:, 0]))]
        if plan is not None:
            plan.reset_timings()
        t0 = time.perf_counter()
        M = continuation.shape[1]
        for t in range(M - 1):
            step = decode_step(model, continuation[:, t:t + 1], cache, N + t)
            nll.append(float(F.cross_entropy(step.float(), continuation[:, t + 1])))
        t_decode = (time.perf_counter() - t0) / max(1, M - 1)
        att_decode = plan.attention_seconds() / max(1, M - 1) if plan is not None else math.nan
        if plan is not None:
            plan.reset_timings()
        t0 = time.perf_counter()
        logits, cache = prefill(model, ids)
        again = time.perf_counter() - t0
        if again < t_prefill:                      # the faster of the two identical prefills
            t_prefill = again
            att_prefill = plan.attention_seconds() if plan is not None else math.nan
        tokens = []
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for t in range(greedy_tokens):
            tokens.append(int(nxt))
            if t + 1 < greedy_tokens:
                nxt = decode_step(model, nxt, cache, N + t).argmax(-1, keepdim=True)
    return Measured(t_prefill, t_decode, kv, sum(nll) / len(nll), tokens, att_prefill, att_decode)


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> tuple[float, int]:
    """(fraction of positions equal to the reference, length of the common prefix) of two greedy runs."""
    n = min(len(tokens), len(reference))
    same = sum(a == b for a, b in zip(tokens[:n], reference[:n]))
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return same / max(1, n), prefix


# --------------------------------------------------------------------------- where the time goes

PARTS = ("attention kernel", "projections, RoPE, cache", "MLP", "LM head", "embeddings, norms, rest")


def _decoder_parts(model) -> tuple[list, list, Any]:
    """(attention modules, MLP modules, LM head) of a Llama-style HF causal LM."""
    attn = attention_modules(model)
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in (layers or [])]
    head = getattr(model, "lm_head", None)
    if not mlps or any(m is None for m in mlps) or head is None:
        raise ValueError(f"{type(model).__name__}: expected model.model.layers[i].mlp and model.lm_head "
                         "(a HuggingFace Llama-style causal LM)")
    return attn, mlps, head


@contextmanager
def _module_clock(modules, seconds: list) -> Iterator[None]:
    """Add the wall seconds spent inside any of `modules`' forwards to seconds[0]."""
    start: dict[int, float] = {}

    def pre(mod, args):
        start[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        seconds[0] += time.perf_counter() - start.pop(id(mod))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def breakdown(model, ids: Tensor, *, decode_tokens: int = 16, repeats: int = 2) -> dict[str, dict[str, float]]:
    """Where a dense forward's time goes: {"prefill": {part: s}, "decode": {part: s per token}} with
    the parts of PARTS plus "total". The attention kernel is the SDPA call alone (through Full rules,
    which equal the unmodified model); the rest of each attention module (q/k/v/o projections, RoPE,
    the cache update) is the second part; "rest" is the total minus the timed modules. Each number
    is the fastest of `repeats` runs. It bounds what any attention sparsity can save: at most the
    kernel's share."""
    attn, mlps, head = _decoder_parts(model)
    plan = Plan({l: Full() for l in range(len(attn))})
    best: dict[str, dict[str, float]] = {}
    N = ids.shape[1]
    for _ in range(max(1, repeats)):
        clocks = {name: [0.0] for name in ("attn", "mlp", "head")}
        with fast_attention(model, plan), _module_clock(attn, clocks["attn"]), \
                _module_clock(mlps, clocks["mlp"]), _module_clock([head], clocks["head"]):
            runs = {}
            plan.reset_timings()
            t0 = time.perf_counter()
            logits, cache = prefill(model, ids)
            total = time.perf_counter() - t0
            runs["prefill"] = (total, plan.attention_seconds(), *(c[0] for c in clocks.values()), 1)
            for c in clocks.values():
                c[0] = 0.0
            plan.reset_timings()
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for t in range(decode_tokens):
                nxt = decode_step(model, nxt, cache, N + t).argmax(-1, keepdim=True)
            total = time.perf_counter() - t0
            runs["decode"] = (total, plan.attention_seconds(), *(c[0] for c in clocks.values()), max(1, decode_tokens))
        for phase, (total, kernel, a, m, h, n) in runs.items():
            parts = {"attention kernel": kernel / n, "projections, RoPE, cache": (a - kernel) / n, "MLP": m / n,
                     "LM head": h / n, "embeddings, norms, rest": (total - a - m - h) / n, "total": total / n}
            if phase not in best or parts["total"] < best[phase]["total"]:
                best[phase] = parts
    return best


def run_breakdown(model_name_or_model="smollm2", *, out, tokenizer=None, tokens: Sequence[int] = (512, 2048),
                  decode_tokens: int = 16, repeats: int = 2, text_path=None, progress=None) -> dict:
    """`attnlab probe timing`: `breakdown` of the dense model at each context length, as timing.md and
    timing.json in `out` (ms per part for the prefill, ms per token for decode, and shares)."""
    import json
    from pathlib import Path

    from attnlab._io import write_text
    from attnlab.probes.inputs import read_text, token_window
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from attnlab.probes.assets import causal_lm
    model, tokenizer, name, bos = causal_lm(model_name_or_model, tokenizer, what="run_breakdown")
    text = read_text(text_path)
    top = max(tokens)
    ids = token_window(tokenizer, text[: 12 * top], top, bos=bos, what="run_breakdown")
    results = {}
    for n in sorted(tokens):
        if progress is not None:
            progress(f"{n} tokens")
        results[n] = breakdown(model, ids[:, :n], decode_tokens=decode_tokens, repeats=repeats)
    lines = [f"# Where {name}'s time goes (dense, SDPA, float32, {torch.get_num_threads()} threads)", "",
             f"Prefill of N tokens (ms) and decode after it (ms per token, {decode_tokens} greedy tokens); the fastest "
             f"of {repeats} runs. Any attention sparsity saves at most the attention kernel's share.", "",
             "| N | phase | " + " | ".join(PARTS) + " | total |", "|" + " --- |" * (len(PARTS) + 3)]
    for n, phases in results.items():
        for phase, parts in phases.items():
            cells = [f"{1000 * parts[p]:.1f} ({100 * parts[p] / parts['total']:.0f}%)" for p in PARTS]
            lines.append(f"| {n} | {phase} | " + " | ".join(cells) + f" | {1000 * parts['total']:.1f} |")
    doc = {"probe": "timing", "model": name, "threads": torch.get_num_threads(), "decode_tokens": decode_tokens,
           "results": {str(n): v for n, v in results.items()}, "seconds": time.perf_counter() - t0}
    write_text(out / "timing.json", json.dumps(doc, indent=1) + "\n")
    write_text(out / "timing.md", "\n".join(lines + [""]))
    doc["files"] = [str(out / "timing.md"), str(out / "timing.json")]
    return doc


__all__ = ["IMPLEMENTATION", "Rule", "Full", "Streaming", "BlockTopK", "Reuse", "Plan", "RULES", "rule_from_json",
           "dense_attention", "block_sparse_prefill", "gathered_decode", "streaming_blocks", "register",
           "attention_modules", "fast_attention", "kv_bytes", "prefill", "decode_step", "Measured", "run_once",
           "agreement", "PARTS", "breakdown", "run_breakdown"]
