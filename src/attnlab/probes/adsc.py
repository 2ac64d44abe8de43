"""ADSC: uniform token downsampling at chosen layers, run inside a pretrained HuggingFace model.

Paper: Deniz, Mao, Li, Tian & Khan, "Vision Token Reduction via Attention-Driven Self-Compression
for Efficient MLLMs" (arXiv 2602.12618, 2026). No released code was found; what is known comes
from the abstract and TL;DR only (the method section could not be read).

Status: the MECHANISM only, training-free, on stand-in models. This is NOT a reproduction of the
paper. The paper compresses the vision tokens of an MLLM (LLaVA-1.5-7B) and then fine-tunes the
model with LoRA and a reverse curriculum over pruning ratios, so that its own attention learns to
push information into the kept tokens. We do no training at all, and we have no MLLM: we thin the
context tokens of a text LM (SmolLM2-135M) and the patch tokens of a vision encoder (DINOv2-S/14)
with the weights as released. Numbers from here measure what an untrained model loses when its
tokens are thinned. They cannot confirm or refute the paper's headline (FLOPs -53.7%, peak KV
cache -56.7%, 98.2% of the original score at a 66.7% vision-token budget).

| what                                  | source                                                     |
|---------------------------------------|------------------------------------------------------------|
| uniform downsampling at chosen layers,| paper (abstract): "uniform token downsampling", "selected  |
| one fixed ratio, no scoring module,   | layers", "fixed ratio"; no auxiliary module, attention     |
| attention unchanged                   | unchanged (FlashAttention-compatible)                      |
| dropped tokens have no K/V in later   | implied by the paper's peak-KV figure                      |
| layers (the cache shrinks per layer)  |                                                            |
| which layers, r, which tokens survive,| NOT in what we could read; ours (infer17.md's proposal):   |
| position ids                          | keep every r-th span token counting from the span end (the |
|                                       | most recent survives); kept tokens keep their original     |
|                                       | RoPE positions; decode continues at original_len + t       |
| span = the context (BOS/sink and the  | ours: the text stand-in for "vision tokens"                |
| last `keep_last` tokens never dropped)|                                                            |
| LoRA + reverse-curriculum SFT         | paper; NOT done here                                       |
| DINOv2 variant (CLS kept, every r-th  | ours: the same thinning on a ViT encoder's patch tokens    |
| patch in raster order, or a 2-D grid) |                                                            |

    with downsample(model, layers=[8, 16, 24], ratio=2) as ds:   # a LlamaForCausalLM (SmolLM2)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        ds.kept_positions()          # original positions of the rows that reach the final norm
    run_once(model, ids, cont, model_hooks=lambda: downsample(model, layers=[8, 16, 24], ratio=2))

How (a Llama-style decoder, transformers 5.24): forward pre-hooks (with_kwargs) on the decoder
layers model.model.layers[l] for every l >= the first chosen layer. At a chosen layer s the hook
gathers the hidden states (B, n, C) -> (B, n', C) of the kept tokens; at every hooked layer it
gathers the loop's full-length position_embeddings (cos, sin: (1|B, N, D)) and position_ids with
the current kept original positions, so RoPE sees each kept token's own position. The causal mask
the model built once for the full length at layer 0 is passed through when it is None (SDPA
prefill without padding: is_causal on the shorter sequence is exact, the kept tokens being in
order) or gathered on both axes (eager's float mask). A pre-hook on model.model refuses padding,
tells a prefill (empty cache) from a continuation, and resets the kept sets at each prefill. The
cache of layer l >= s then holds only the tokens kept at l (DynamicCache.layers[l].keys); layer 0
is never thinned, because transformers sizes masks and default position ids from layer 0's cache.
A continuation (decode, q = 1, or a chunk) on that cache is passed through unthinned: its queries
attend to each layer's shorter cache; a mask sized for layer 0 has its key axis gathered to the
layer's cached positions (eager adds the mask to the scores unsliced, so this is required there;
SDPA gets None at q = 1). Logits exist only for kept rows: logits_to_keep=1 (the last token, never
thinned) is what fastlm.prefill uses.

    flops_fraction(...), decode_flops_fraction(...), kv_fraction(...), token_budget(...)
                                 analytic accounting (linear layers + attention, no embeddings or
                                 LM head); the measured KV bytes come from fastlm.kv_bytes
    downsample_vit(model, ...)   the DINOv2 variant (transformers' Dinov2Model), `vit_flops_fraction`
    sweep(...), sweep_dinov2(...) the measurement rows (SmolLM2 on tinyshakespeare; DINOv2 on the
                                 sample photographs)

Deviations and limits: training-free (above); text context instead of vision tokens; layers must be
>= 1 on the LM; DynamicCache only (a StaticCache writes at cumulative positions), no padding,
every row of a batch thins the same positions; the kept sets are those of the most recent prefill
inside the context (one sequence/cache at a time).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

DEFAULT_KEEP_LAST = 32


# --------------------------------------------------------------------------- which tokens survive

def _check_ratio(ratio) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio: expected an int >= 1 (keep every ratio-th token), got {ratio!r}")
    return ratio


def _check_layers(layers, num_layers: int, *, lowest: int) -> tuple[int, ...]:
    try:
        got = [int(l) for l in layers]
    except TypeError:
        raise TypeError(f"layers: expected a sequence of layer indices, got {type(layers).__name__}") from None
    if any(isinstance(l, bool) for l in layers):
        raise TypeError(f"layers: expected ints, got {list(layers)!r}")
    if len(set(got)) != len(got):
        raise ValueError(f"layers: each layer at most once, got {got}")
    bad = [l for l in got if not lowest <= l < num_layers]
    if bad:
        why = (" (layer 0 stays whole: transformers sizes masks and default positions from layer 0's cache)"
               if lowest == 1 and 0 in bad else "")
        raise ValueError(f"layers: expected indices in [{lowest}, {num_layers - 1}] for a model of {num_layers} "
                         f"layers, got {bad}{why}")
    return tuple(sorted(got))


def resolve_span(n: int, span: tuple[int, int] | None, keep_last: int) -> tuple[int, int]:
    """[lo, hi) in original positions of the tokens that may be dropped, for a prompt of n tokens.

    None: everything after the first token (BOS/sink) and before the last `keep_last`. An explicit
    (lo, hi) may give hi < 0 (counted from the end, as in a slice); keep_last is then unused."""
    if span is None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last: expected an int >= 0, got {keep_last!r}")
        return 1, max(1, n - keep_last)
    try:
        lo, hi = (int(x) for x in span)
    except (TypeError, ValueError):
        raise TypeError(f"span: expected (start, end), got {span!r}") from None
    hi = n + hi if hi < 0 else hi
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"span: expected 0 <= start <= end <= {n} (the prompt length), got {tuple(span)} -> "
                         f"[{lo}, {hi})")
    return lo, hi


def _check_span(span) -> None:
    """What can be checked before the prompt length is known (resolve_span checks the rest)."""
    if span is None:
        return
    if (not isinstance(span, (tuple, list)) or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
        raise TypeError(f"span: expected (start, end) ints, got {span!r}")
    lo, hi = span
    if lo < 0 or (hi >= 0 and hi < lo):
        raise ValueError(f"span: expected 0 <= start <= end (end < 0 counts from the prompt's end), got {tuple(span)}")


def thin(current: Tensor, ratio: int, lo: int, hi: int) -> Tensor:
    """Of the original positions `current` (1-D, increasing), keep those outside [lo, hi) and every
    ratio-th one inside, counting from the last one inside (which survives)."""
    inside = (current >= lo) & (current < hi)
    j = torch.cumsum(inside, 0) - 1                              # rank among the inside ones
    m = int(inside.sum())
    keep = ~inside | ((m - 1 - j) % ratio == 0)
    return current[keep]


def keep_schedule(n: int, num_layers: int, layers: Sequence[int], ratio: int, lo: int, hi: int,
                  *, device=None) -> list[Tensor]:
    """kept[l] = the original positions of the rows entering layer l (l = 0..L; kept[L] = output)."""
    chosen = set(layers)
    cur = torch.arange(n, device=device)
    out = []
    for l in range(num_layers):
        if l in chosen:
            cur = thin(cur, ratio, lo, hi)
        out.append(cur)
    out.append(cur)
    return out


def kept_counts(num_layers: int, layers: Sequence[int], ratio: int, n: int, *, span=None,
                keep_last: int = DEFAULT_KEEP_LAST) -> list[int]:
    """Tokens each layer processes (and caches) at a prefill of n tokens."""
    ratio = _check_ratio(ratio)
    layers = _check_layers(layers, num_layers, lowest=0)
    lo, hi = resolve_span(n, span, keep_last)
    return [len(k) for k in keep_schedule(n, num_layers, layers, ratio, lo, hi)[:num_layers]]


# --------------------------------------------------------------------------- accounting

@dataclass(frozen=True)
class Dims:
    """A Llama-style decoder layer's sizes (defaults: SmolLM2-135M)."""

    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64

    @classmethod
    def from_config(cls, config) -> "Dims":
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, hd)

    def linear_flops(self, m: int) -> float:
        """q, k, v, o projections and the gated MLP (3 matrices) for m tokens: 2 FLOPs per MAC."""
        H, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2.0 * m * (2 * H * qd + 2 * H * kvd + 3 * H * self.intermediate)

    def attention_flops(self, pairs: float) -> float:
        """QK^T and PV over `pairs` (query, key) pairs."""
        return 4.0 * self.heads * self.head_dim * pairs


def _dims(dims: Dims | None, config) -> Dims:
    if dims is not None and config is not None:
        raise ValueError("give dims= or config=, not both")
    return Dims.from_config(config) if config is not None else (dims or Dims())


def flops_fraction(num_layers: int, layers: Sequence[int], ratio: int, n: int, *, span=None,
                   keep_last: int = DEFAULT_KEEP_LAST, dims: Dims | None = None, config=None) -> float:
    """Prefill FLOPs of the decoder layers with downsampling / without, for a prompt of n tokens.

    Per layer with m tokens: linear_flops(m) + attention over m(m+1)/2 causal pairs (the kept
    tokens are in order, so the thinned sequence is causal among itself). Embeddings and the LM
    head (one row with logits_to_keep=1) are left out."""
    d = _dims(dims, config)
    counts = kept_counts(num_layers, layers, ratio, n, span=span, keep_last=keep_last)
    cost = lambda m: d.linear_flops(m) + d.attention_flops(m * (m + 1) / 2)
    return sum(cost(m) for m in counts) / (num_layers * cost(n))


def decode_flops_fraction(num_layers: int, layers: Sequence[int], ratio: int, n: int, *, t: int = 0, span=None,
                          keep_last: int = DEFAULT_KEEP_LAST, dims: Dims | None = None, config=None) -> float:
    """FLOPs of the decode step after t earlier decode steps (the query attends to kept_l + t + 1 keys)."""
    d = _dims(dims, config)
    counts = kept_counts(num_layers, layers, ratio, n, span=span, keep_last=keep_last)
    step = lambda kv: d.linear_flops(1) + d.attention_flops(kv)
    return sum(step(m + t + 1) for m in counts) / (num_layers * step(n + t + 1))


def kv_fraction(num_layers: int, layers: Sequence[int], ratio: int, n: int, *, decode_tokens: int = 0, span=None,
                keep_last: int = DEFAULT_KEEP_LAST) -> float:
    """Cached tokens over all layers / the unmodified model's, after the prefill and `decode_tokens`
    decode steps (every layer caches the same K/V width, so this is also the bytes' ratio)."""
    counts = kept_counts(num_layers, layers, ratio, n, span=span, keep_last=keep_last)
    return (sum(counts) + num_layers * decode_tokens) / (num_layers * (n + decode_tokens))


def token_budget(num_layers: int, layers: Sequence[int], ratio: int, n: int, *, span=None,
                 keep_last: int = DEFAULT_KEEP_LAST) -> float:
    """Mean over layers of the fraction of the SPAN's tokens a layer processes (infer17.md's budget)."""
    lo, hi = resolve_span(n, span, keep_last)
    if hi == lo:
        return 1.0
    counts = kept_counts(num_layers, layers, ratio, n, span=span, keep_last=keep_last)
    outside = n - (hi - lo)
    return sum((m - outside) / (hi - lo) for m in counts) / num_layers


# --------------------------------------------------------------------------- the LM hooks

def _decoder(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(inner, "rotary_emb"):
        raise ValueError(f"downsample: expected a HuggingFace Llama-style causal LM (model.model.layers and "
                         f"model.model.rotary_emb), got {type(model).__name__}")
    return inner, layers


def _no_padding(mask, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise NotImplementedError(f"{what}: an attention mask of type {type(mask).__name__} is not supported")
    if not bool((mask != 0).all()):
        raise ValueError(f"{what}: padded batches are not supported (expected an attention_mask of all ones or "
                         f"None, got {int((mask == 0).sum())} padded positions)")


class Downsampler:
    """The state of one `downsample` context: the kept positions of the most recent prefill."""

    def __init__(self, model, layers: tuple[int, ...], ratio: int, span, keep_last: int):
        self.model = model
        self.inner, self.decoder_layers = _decoder(model)
        self.num_layers = len(self.decoder_layers)
        self.layers = layers
        self.ratio = ratio
        self.span = span
        self.keep_last = keep_last
        self.n: int | None = None                  # the prefill's length
        self.kept: list[Tensor] | None = None      # kept[l]: original positions entering layer l (l = 0..L)
        self.phase: str | None = None              # "prefill" or "continue" for the forward under way
        self._past = 0
        self._local: dict[int, Tensor] = {}        # at a chosen layer: rows of the previous kept set kept now
        self._handles: list = []

    # ---- accessors
    def kept_positions(self, layer: int | None = None) -> Tensor:
        """Original positions of the rows entering `layer` (None: the final rows, those the logits are of),
        i.e. of the tokens layer `layer` caches, for the most recent prefill."""
        if self.kept is None:
            raise RuntimeError("downsample: no prefill has run inside this context yet")
        if layer is None:
            return self.kept[self.num_layers]
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected 0..{self.num_layers - 1}, got {layer}")
        return self.kept[layer]

    def expected_cache_lengths(self) -> list[int]:
        """Tokens each layer's cache holds right after the most recent prefill."""
        return [len(self.kept_positions(l)) for l in range(self.num_layers)]

    # ---- hooks
    def _model_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            raise ValueError("downsample: expected input_ids or inputs_embeds")
        _no_padding(kwargs.get("attention_mask"), "downsample")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not hasattr(cache, "layers"):
            raise NotImplementedError(f"downsample: expected a DynamicCache, got {type(cache).__name__}")
        past = int(cache.get_seq_length(0)) if cache is not None else 0
        n = x.shape[1]
        self._past = past
        if past == 0:
            lo, hi = resolve_span(n, self.span, self.keep_last)
            self.kept = keep_schedule(n, self.num_layers, self.layers, self.ratio, lo, hi, device=x.device)
            self._local = {}
            for l in self.layers:
                prev, now = self.kept[l - 1], self.kept[l]
                self._local[l] = torch.searchsorted(prev, now)         # rows of `prev` that are in `now`
            self.n = n
            self.phase = "prefill"
        else:
            self.phase = "continue"
        return None

    def _layer_pre(self, module, args, kwargs):
        l = int(module.self_attn.layer_idx)
        if self.phase == "prefill":
            return self._prefill_layer(l, args, kwargs)
        if self.phase == "continue":
            return self._continue_layer(l, args, kwargs)
        return None

    @staticmethod
    def _hidden(args, kwargs) -> tuple[Tensor, bool]:
        if args:
            return args[0], True
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"], False
        raise ValueError("downsample: the decoder layer was called without hidden_states")

    def _prefill_layer(self, l: int, args, kwargs):
        kept = self.kept[l]                                               # (n_l,) original positions
        h, positional = self._hidden(args, kwargs)                        # (B, n_{l-1}, C)
        rows = len(self.kept[l - 1])
        if h.shape[1] != rows:
            raise RuntimeError(f"downsample: layer {l} received {h.shape[1]} tokens, expected {rows} (another hook "
                               "or a second cache in between?)")
        if l in self._local:
            h = h.index_select(1, self._local[l])                         # (B, n_l, C)
        pe = kwargs.get("position_embeddings")
        if not (isinstance(pe, tuple) and len(pe) == 2):
            raise NotImplementedError("downsample: the decoder layer must receive position_embeddings=(cos, sin)")
        cos, sin = pe
        if cos.shape[-2] != self.n:
            raise RuntimeError(f"downsample: position_embeddings cover {cos.shape[-2]} tokens, expected {self.n}")
        kwargs["position_embeddings"] = (cos.index_select(-2, kept), sin.index_select(-2, kept))   # (1|B, n_l, D)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, kept)             # (1|B, n_l)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):                                       # (B, 1, N, N) -> (B, 1, n_l, n_l)
            kwargs["attention_mask"] = mask.index_select(-2, kept).index_select(-1, kept)
        elif mask is not None:
            raise NotImplementedError(f"downsample: a mask of type {type(mask).__name__} cannot be gathered")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._check_layer_cache(cache, l)
        if positional:
            args = (h,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = h
        return args, kwargs

    def _check_layer_cache(self, cache, l: int) -> None:
        if cache is None:
            return
        from transformers.cache_utils import DynamicLayer
        layer = cache.layers[l] if l < len(cache.layers) else None
        if layer is not None and (type(layer) is not DynamicLayer):
            raise NotImplementedError(f"downsample: layer {l}'s cache is a {type(layer).__name__}; only "
                                      "DynamicCache's DynamicLayer can hold a shorter sequence per layer")

    def _continue_layer(self, l: int, args, kwargs):
        h, _ = self._hidden(args, kwargs)
        q = h.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._check_layer_cache(cache, l)
        have = int(cache.layers[l].get_seq_length()) if cache is not None and l < len(cache.layers) else 0
        if self.kept is None or self.n is None:
            if have != self._past:
                raise RuntimeError(f"downsample: layer {l}'s cache holds {have} tokens, layer 0's {self._past}, but "
                                   "no prefill ran inside this context (a cache thinned elsewhere?)")
            return None
        extra = self._past - self.n                                        # continuation tokens cached so far
        expect = len(self.kept[l]) + extra
        if have != expect:
            raise RuntimeError(f"downsample: layer {l}'s cache holds {have} tokens, expected {expect} (the most "
                               f"recent prefill kept {len(self.kept[l])} of {self.n} there, plus {extra} since); "
                               "one cache at a time per context")
        mask = kwargs.get("attention_mask")
        if mask is None:
            if q > 1 and have > 0:
                raise NotImplementedError("downsample: a chunk of several tokens on a thinned cache needs a mask "
                                          "(SDPA would crop the keys with is_causal); register sdpa_mask or decode "
                                          "one token at a time")
            return None
        if not isinstance(mask, Tensor):
            raise NotImplementedError(f"downsample: a mask of type {type(mask).__name__} cannot be gathered")
        kv0 = mask.shape[-1]                                               # layer 0's keys: past + q
        cols = torch.cat([self.kept[l], torch.arange(self.n, kv0, device=mask.device)])
        kwargs["attention_mask"] = mask.index_select(-1, cols)             # (B, 1, q, kept_l + extra + q)
        return args, kwargs

    def attach(self) -> None:
        self._handles.append(self.inner.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        if not self.layers:
            return
        for l in range(self.layers[0], self.num_layers):
            self._handles.append(self.decoder_layers[l].register_forward_pre_hook(self._layer_pre, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def downsample(model, *, layers: Sequence[int], ratio: int, span: tuple[int, int] | None = None,
               keep_last: int = DEFAULT_KEEP_LAST) -> Iterator[Downsampler]:
    """Inside the context, every prefill (a forward on an empty cache) of `model` keeps, at each
    layer s in `layers`, only every `ratio`-th token of the span (counted from the span's end),
    for layer s and all later layers; continuation forwards (decode) pass through and attend to
    each layer's shorter cache. Yields the Downsampler (`kept_positions`, `expected_cache_lengths`).

    model: a HuggingFace Llama-style causal LM (LlamaForCausalLM or its .model). layers: indices in
    [1, L-1]. span: [start, end) original positions that may be dropped (default: after the first
    token and before the last keep_last). ratio 1 or no layers: the unmodified model, exactly."""
    ratio = _check_ratio(ratio)
    _, decoder_layers = _decoder(model)
    layers = _check_layers(layers, len(decoder_layers), lowest=1)
    _check_span(span)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last: expected an int >= 0, got {keep_last!r}")
    ds = Downsampler(model, layers, ratio, span, keep_last)
    ds.attach()
    try:
        yield ds
    finally:
        ds.detach()


# --------------------------------------------------------------------------- the DINOv2 variant

def vit_schedule(h: int, w: int, num_layers: int, layers: Sequence[int], ratio: int, mode: str = "raster",
                 *, prefix: int = 1, device=None) -> list[Tensor]:
    """kept[l] = token indices (0..prefix-1 = CLS etc., then h*w patches in raster order) entering layer l.

    raster: keep every ratio-th remaining patch in raster order (the first survives); grid: keep
    the patches whose row and column ranks among the remaining rows/columns are multiples of
    ratio (a 2-D stride: ratio^2 fewer patches per step). Note: when the grid width is a multiple of
    ratio (DINOv2 at 224: 16 x 16), the first raster step keeps whole columns (every ratio-th one)."""
    if mode not in ("raster", "grid"):
        raise ValueError(f"mode: expected 'raster' or 'grid', got {mode!r}")
    chosen = set(layers)
    cur = torch.arange(prefix + h * w, device=device)
    out = []
    for l in range(num_layers):
        if l in chosen:
            patch = cur >= prefix
            if mode == "raster":
                rank = torch.cumsum(patch, 0) - 1
                keep = ~patch | (rank % ratio == 0)
            else:
                p = (cur - prefix).clamp_min(0)
                row, col = p // w, p % w
                rrank = torch.searchsorted(torch.unique(row[patch]), row)
                crank = torch.searchsorted(torch.unique(col[patch]), col)
                keep = ~patch | ((rrank % ratio == 0) & (crank % ratio == 0))
            cur = cur[keep]
        out.append(cur)
    out.append(cur)
    return out


class VitDownsampler:
    def __init__(self, model, layers, ratio, mode):
        self.model = model
        self.blocks = model.encoder.layer
        self.num_layers = len(self.blocks)
        self.layers, self.ratio, self.mode = layers, ratio, mode
        self.prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.grid: tuple[int, int] | None = None
        self.kept: list[Tensor] | None = None
        self._handles: list = []

    def kept_tokens(self, layer: int | None = None) -> Tensor:
        """Token indices (0 = CLS, then patches in raster order) of the rows entering `layer` (None: output)."""
        if self.kept is None:
            raise RuntimeError("downsample_vit: no forward has run inside this context yet")
        return self.kept[self.num_layers if layer is None else layer]

    def _model_pre(self, module, args, kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        if x is None:
            raise ValueError("downsample_vit: expected pixel_values")
        if kwargs.get("bool_masked_pos") is not None or kwargs.get("attention_mask") is not None:
            raise NotImplementedError("downsample_vit: bool_masked_pos / attention_mask are not supported")
        ps = self.model.config.patch_size
        ps = ps if isinstance(ps, int) else ps[0]
        h, w = x.shape[-2] // ps, x.shape[-1] // ps
        self.grid = (h, w)
        self.kept = vit_schedule(h, w, self.num_layers, self.layers, self.ratio, self.mode, prefix=self.prefix,
                                 device=x.device)
        return None

    def _layer_pre(self, l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]                 # (B, n_{l-1}, C)
            prev = self.kept[l - 1] if l > 0 else torch.arange(self.prefix + self.grid[0] * self.grid[1],
                                                                device=h.device)
            if h.shape[1] != len(prev):
                raise RuntimeError(f"downsample_vit: layer {l} received {h.shape[1]} tokens, expected {len(prev)}")
            if len(args) > 1 and args[1] is not None or kwargs.get("attention_mask") is not None:
                raise NotImplementedError("downsample_vit: an attention mask is not supported")
            h = h.index_select(1, torch.searchsorted(prev, self.kept[l]))      # (B, n_l, C)
            if args:
                return (h,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        return hook

    def attach(self):
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        for l in self.layers:
            self._handles.append(self.blocks[l].register_forward_pre_hook(self._layer_pre(l), with_kwargs=True))

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def downsample_vit(model, *, layers: Sequence[int], ratio: int, mode: str = "raster") -> Iterator[VitDownsampler]:
    """ADSC's thinning on transformers' Dinov2Model: at each layer in `layers` keep CLS and every
    ratio-th patch (mode "raster") or a ratio-strided sub-grid (mode "grid"). last_hidden_state
    then has only the kept rows (`kept_tokens()`); pooler_output is still the CLS token's."""
    ratio = _check_ratio(ratio)
    if mode not in ("raster", "grid"):
        raise ValueError(f"mode: expected 'raster' or 'grid', got {mode!r}")
    enc = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(enc, torch.nn.ModuleList) or not hasattr(model, "embeddings"):
        raise ValueError(f"downsample_vit: expected transformers' Dinov2Model (model.encoder.layer), got "
                         f"{type(model).__name__}")
    layers = _check_layers(layers, len(enc), lowest=0)
    ds = VitDownsampler(model, layers, ratio, mode)
    ds.attach()
    try:
        yield ds
    finally:
        ds.detach()


def vit_flops_fraction(kept: Sequence[int], n: int, *, hidden: int = 384, mlp_ratio: float = 4.0) -> float:
    """Encoder FLOPs with `kept[l]` tokens at layer l / with n at every layer (qkv + proj + MLP,
    bidirectional attention over m^2 pairs; the patch embedding left out)."""
    I = int(hidden * mlp_ratio)
    cost = lambda m: 2.0 * m * (4 * hidden * hidden + 2 * hidden * I) + 4.0 * hidden * m * m
    return sum(cost(m) for m in kept) / (len(kept) * cost(n))


# --------------------------------------------------------------------------- measurements

DEFAULT_SETTINGS = (((8, 16, 24), 2), ((8, 16, 24), 3), ((16,), 2))


def sweep(model=None, tokenizer=None, *, settings: Sequence[tuple[Sequence[int], int]] = DEFAULT_SETTINGS,
          prefix_tokens: int = 2048, continuation_tokens: int = 64, greedy_tokens: int = 32,
          keep_last: int = DEFAULT_KEEP_LAST, text: str | None = None, bos: int | None = None) -> list[dict[str, Any]]:
    """Rows (dicts) of the unmodified model and each (layers, ratio) setting on tinyshakespeare:
    prefill s, decode s/token, KV bytes after the prefill (measured and analytic fraction), the
    analytic FLOP fractions, continuation NLL (teacher-forced) and greedy agreement with the
    unmodified model. Default model: SmolLM2-135M (SDPA) with its BOS (id 1); with a given model,
    `bos` or the tokenizer's bos_token_id goes first when the tokenizer does not add it."""
    from attnlab.probes import fastlm
    from attnlab.probes.inputs import read_text, token_window

    if model is None:
        from attnlab.probes.assets import SMOLLM2_BOS, load_smollm2
        model, tokenizer = load_smollm2(attn_implementation="sdpa")
        bos = SMOLLM2_BOS if bos is None else bos
    if tokenizer is None:
        raise ValueError("sweep: a tokenizer is needed with an explicit model")
    text = read_text() if text is None else text
    ids = token_window(tokenizer, text[: 40 * (prefix_tokens + continuation_tokens)],
                       prefix_tokens + continuation_tokens, bos=bos, what="adsc.sweep")
    prefix, cont = ids[:, :prefix_tokens], ids[:, prefix_tokens:]
    L = len(_decoder(model)[1])
    dims = Dims.from_config(model.config)
    rows = []
    base = fastlm.run_once(model, prefix, cont, greedy_tokens=greedy_tokens)
    for layers, ratio in [((), 1)] + [tuple(s) for s in settings]:
        if layers:
            hooks = lambda: downsample(model, layers=layers, ratio=ratio, keep_last=keep_last)
            m = fastlm.run_once(model, prefix, cont, greedy_tokens=greedy_tokens, model_hooks=hooks)
        else:
            m = base
        agree, common = fastlm.agreement(m.greedy, base.greedy)
        n = prefix.shape[1]
        rows.append({
            "setting": "unmodified" if not layers else f"layers {list(layers)} r={ratio}",
            "layers": list(layers), "ratio": ratio, "prefix_tokens": n, "keep_last": keep_last,
            "prefill_s": m.prefill_s, "decode_s_per_token": m.decode_s_per_token,
            "kv_bytes": m.kv_bytes, "kv_fraction_measured": m.kv_bytes / base.kv_bytes,
            "kv_fraction_analytic": kv_fraction(L, layers, ratio, n, keep_last=keep_last),
            "flops_fraction_prefill": flops_fraction(L, layers, ratio, n, keep_last=keep_last, dims=dims),
            "flops_fraction_decode": decode_flops_fraction(L, layers, ratio, n, keep_last=keep_last, dims=dims),
            "token_budget": token_budget(L, layers, ratio, n, keep_last=keep_last),
            "nll": m.nll, "nll_delta": m.nll - base.nll,
            "greedy_agreement": agree, "greedy_common_prefix": common,
        })
    return rows


def sweep_dinov2(model=None, images=None, *, settings=(((4, 8), 2, "raster"), ((4, 8), 2, "grid"),
                                                       ((6,), 2, "raster"), ((2, 5, 8), 2, "raster")),
                 size: int = 224) -> list[dict[str, Any]]:
    """Rows of the DINOv2 variant on the sample photographs: the cosine similarity of the CLS
    feature (pooler_output) and of the mean-pooled patch tokens (after the final layernorm) to the
    unmodified model's, per setting (mean and min over images), and the analytic FLOP fraction."""
    import torch.nn.functional as F

    from attnlab.probes.assets import dinov2_preprocess, load_dinov2
    from attnlab.probes.inputs import sample_images

    if model is None:
        model = load_dinov2()
    if images is None:
        images = sample_images(4)[0]
    x = dinov2_preprocess(images, size)
    with torch.no_grad():
        ref = model(pixel_values=x)
    ref_cls, ref_mean = ref.pooler_output, ref.last_hidden_state[:, 1:].mean(1)
    n = ref.last_hidden_state.shape[1]
    L = len(model.encoder.layer)
    rows = []
    for layers, ratio, mode in settings:
        with downsample_vit(model, layers=layers, ratio=ratio, mode=mode) as ds, torch.no_grad():
            out = model(pixel_values=x)
        counts = [len(ds.kept_tokens(l)) for l in range(L)]
        c_cls = F.cosine_similarity(out.pooler_output, ref_cls, dim=-1)
        c_mean = F.cosine_similarity(out.last_hidden_state[:, 1:].mean(1), ref_mean, dim=-1)
        rows.append({
            "setting": f"layers {list(layers)} r={ratio} {mode}", "layers": list(layers), "ratio": ratio,
            "mode": mode, "tokens": n, "final_tokens": counts[-1],
            "flops_fraction": vit_flops_fraction(counts, n, hidden=model.config.hidden_size,
                                                 mlp_ratio=model.config.mlp_ratio),
            "cls_cos_mean": float(c_cls.mean()), "cls_cos_min": float(c_cls.min()),
            "patch_mean_cos_mean": float(c_mean.mean()), "patch_mean_cos_min": float(c_mean.min()),
        })
    return rows


def run(model_name_or_model="smollm2", *, out, tokenizer=None, settings=None, tokens: int = 2048,
        continuation: int = 64, greedy: int = 32, keep_last: int = DEFAULT_KEEP_LAST, mode: str = "raster",
        text_path=None, progress=None) -> dict:
    """`attnlab probe adsc`: the sweep on a causal LM ("smollm2", "gemma3", a HuggingFace folder, or a
    model with tokenizer=) or on "dinov2" (the sample photographs); writes adsc.md and adsc.json into
    `out`. settings: [(layers, ratio), ...] (default DEFAULT_SETTINGS; for DINOv2 each gets `mode`)."""
    import json
    import time
    from pathlib import Path

    from attnlab._io import write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = progress or (lambda *a: None)
    if isinstance(model_name_or_model, (str, Path)) and str(model_name_or_model) == "dinov2":
        settings = settings or (((4, 8), 2), ((6,), 2), ((2, 5, 8), 2))
        say("dinov2 sweep")
        rows = sweep_dinov2(settings=[(tuple(l), int(r), mode) for l, r in settings])
        name, kind = "DINOv2-S/14", "vit"
        cols = [("setting", "setting", "{}"), ("final tokens", "final_tokens", "{}"),
                ("FLOP fraction", "flops_fraction", "{:.3f}"), ("CLS cos (mean)", "cls_cos_mean", "{:.4f}"),
                ("CLS cos (min)", "cls_cos_min", "{:.4f}"), ("patch-mean cos (mean)", "patch_mean_cos_mean", "{:.4f}")]
        intro = (f"{name}: every r-th patch token ({mode} order) kept at the chosen layers, training-free; cosine "
                 "similarity of the features to the unmodified model's on the sample photographs.")
    else:
        from attnlab.probes.assets import causal_lm
        model, tokenizer, name, bos = causal_lm(model_name_or_model, tokenizer, what="adsc.run")
        from attnlab.probes.inputs import read_text
        say("causal-LM sweep")
        rows = sweep(model.eval(), tokenizer, settings=settings or DEFAULT_SETTINGS, prefix_tokens=tokens,
                     continuation_tokens=continuation, greedy_tokens=greedy, keep_last=keep_last,
                     text=read_text(text_path), bos=bos)
        kind = "lm"
        cols = [("setting", "setting", "{}"), ("prefill s", "prefill_s", "{:.2f}"),
                ("decode ms/token", "decode_s_per_token", "{:.1f}", 1000), ("KV fraction", "kv_fraction_measured", "{:.3f}"),
                ("prefill FLOP fraction", "flops_fraction_prefill", "{:.3f}"), ("NLL", "nll", "{:.4f}"),
                ("NLL change", "nll_delta", "{:+.4f}"), ("greedy agreement", "greedy_agreement", "{:.0%}")]
        intro = (f"{name}: every r-th context token kept at the chosen layers (BOS and the last {keep_last} tokens "
                 f"always kept), training-free; {tokens} tokens of tinyshakespeare, {continuation} teacher-forced and "
                 f"{greedy} greedy tokens; one run each (the fast_inference claim has paired, repeated timings). "
                 "The mechanism on a stand-in model, not the paper's trained MLLM.")
    lines = [f"# ADSC token downsampling on {name}", "", intro, "",
             "| " + " | ".join(c[0] for c in cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [c[2].format(r[c[1]] * (c[3] if len(c) > 3 else 1)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    doc = {"probe": "adsc", "model": name, "kind": kind, "rows": rows, "seconds": time.perf_counter() - t0}
    write_text(out / "adsc.json", json.dumps(doc, indent=1) + "\n")
    write_text(out / "adsc.md", "\n".join(lines + [""]))
    doc["files"] = [str(out / "adsc.md"), str(out / "adsc.json")]
    return doc


__all__ = ["DEFAULT_KEEP_LAST", "resolve_span", "thin", "keep_schedule", "kept_counts", "Dims", "flops_fraction",
           "decode_flops_fraction", "kv_fraction", "token_budget", "Downsampler", "downsample", "vit_schedule",
           "VitDownsampler", "downsample_vit", "vit_flops_fraction", "DEFAULT_SETTINGS", "sweep", "sweep_dinov2", "run"]
