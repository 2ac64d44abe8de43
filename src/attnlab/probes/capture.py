"""Capture and edit attention inside a model: TransformerLens-style hook names on HuggingFace
transformers models and on attnlab's own models.

    with capture(model, names=["blocks.3.attn.hook_pattern"]) as cap:
        logits = model(ids).logits
    cap["blocks.3.attn.hook_pattern"]                        # (B, h, N, M)

    def drop_head_5(z, hook):                                # z (B, N, h, d)
        z[:, :, 5] = 0
        return z
    with capture(model, edits={"blocks.3.attn.hook_z": drop_head_5}):
        ablated = model(ids).logits

Names, for every layer l (the shapes are TransformerLens's):
    blocks.{l}.attn.hook_q, hook_k, hook_v   (B, N, h, d)  q after rotary embeddings; k and v after
                                                            the KV cache (all M positions), before
                                                            grouped-query heads are repeated
    blocks.{l}.attn.hook_scores              (B, h, N, M)  scaled q k^T (softcap applied) + mask
    blocks.{l}.attn.hook_pattern             (B, h, N, M)  softmax of the scores, before dropout
    blocks.{l}.attn.hook_z                   (B, N, h, d)  per-head outputs, before the output projection
    blocks.{l}.hook_attn_out                 (B, N, C)     what the attention adds to the residual stream
    blocks.{l}.hook_mlp_out                  (B, N, C)     what the MLP adds to the residual stream
    blocks.{l}.hook_resid_post               (B, N, C)     the layer's output
Edits run in the order of the computation, so an edit of hook_scores changes the pattern, an
edit of hook_pattern changes z, and an edit of z changes the output. The cache records each
tensor after its edit (detached; the last call's value, or every call's with accumulate=True).

HuggingFace models (the attnlab[hf] extra): the attention runs through a function registered
with transformers' `AttentionInterface` under the name "attnlab_capture", and the masks through
`AttentionMaskInterface`'s eager mask under the same name (without it the mask would arrive as
None and a causal model would stop being causal). Inside the context the model's
`attn_implementation` is "attnlab_capture"; it is restored on exit. The function computes what
transformers' eager attention computes (scaled scores, softcap, additive mask, softmax in
float32 cast back to the query's dtype, dropout, probabilities times values), so with no edit
the outputs equal the eager model's; for float32 models exactly (BERT's and DINOv2's own eager
softmax runs in the input dtype, so a bfloat16 one can differ by rounding; a float64 model's
softmax runs in float64 here where Llama's and Gemma's eager code drop it to float32).

attnlab models (a model whose `.blocks`, or `.body.blocks`, is an nn.ModuleList of blocks that
each have `.attn` and `.mlp`: a `Transformer`, `CausalLM`, `Classifier`, `DiT`, ...): through their
mechanisms' hook points (`attnlab.hooks`), with the eager path (`backend="reference"`) switched
on for the duration so that scores and pattern exist. A mechanism without some hook (a
convolution has no pattern) simply does not produce that name. hook_attn_out / hook_mlp_out are
the block's own `hook_attn_out` / `hook_mlp_out` hook points where it has them (DiT's gated
branches: gate * attn(...)), else the outputs of `.attn` and `.mlp`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_pattern", "hook_z")
BLOCK_HOOKS = ("hook_attn_out", "hook_mlp_out", "hook_resid_post")
IMPLEMENTATION = "attnlab_capture"
# the axis of the heads in each hook's tensor (None: no head axis)
HEAD_AXIS = {"hook_q": 2, "hook_k": 2, "hook_v": 2, "hook_z": 2, "hook_scores": 1, "hook_pattern": 1,
             "hook_attn_out": None, "hook_mlp_out": None, "hook_resid_post": None}

Edit = Callable[[Tensor, "Hook"], "Tensor | None"]


@dataclass(frozen=True)
class Hook:
    """What an edit callback is told: the full name, the layer and the hook's short name."""

    name: str
    layer: int
    kind: str                                   # e.g. "hook_pattern"

    @property
    def head_axis(self) -> int | None:
        return HEAD_AXIS[self.kind]


def hook_names(num_layers: int) -> list[str]:
    """Every name `capture` knows for a model of `num_layers` layers, in computation order."""
    names = []
    for l in range(num_layers):
        names += [f"blocks.{l}.attn.{h}" for h in ATTN_HOOKS] + [f"blocks.{l}.{h}" for h in BLOCK_HOOKS]
    return names


def _name_filter(names) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"capture: names must be None, a callable, a name or a list of names (glob patterns "
                        f"allowed), got {names!r}")
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in names)


class Capture:
    """The context manager `capture` returns: records and edits while it is entered.

    cache: {name: tensor}; `cap[name]` reads it (KeyError lists what was recorded).
    """

    def __init__(self, model: nn.Module, *, names=None, edits: dict[str, Edit] | None = None,
                 accumulate: bool = False, detach: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture: model must be a torch.nn.Module, got {type(model).__name__}")
        edits = dict(edits or {})
        for name, fn in edits.items():
            if not isinstance(name, str) or not callable(fn):
                raise TypeError(f"capture: edits must map hook names to callables fn(tensor, hook), got "
                                f"{name!r}: {type(fn).__name__}")
        self.model, self.edits, self.accumulate, self.detach = model, edits, accumulate, detach
        self.wanted = _name_filter(names)
        self.cache: dict[str, Any] = {}
        self._adapter: _Adapter | None = None

    # --- the context ---
    def __enter__(self) -> "Capture":
        if self._adapter is not None:
            raise RuntimeError("capture: this Capture is already entered")
        self._adapter = _adapter_for(self.model)
        names = set(hook_names(self._adapter.num_layers))
        unknown = [n for n in self.edits if n not in names]
        if unknown:
            raise KeyError(f"capture: no hook named {unknown[0]!r} in this {self._adapter.num_layers}-layer model; "
                           f"names look like 'blocks.0.attn.hook_pattern' (see attnlab.probes.capture.hook_names)")
        self.cache.clear()
        self._adapter.attach(self)
        return self

    def __exit__(self, *exc) -> None:
        adapter, self._adapter = self._adapter, None
        if adapter is not None:
            adapter.detach()

    # --- reading ---
    def __getitem__(self, name: str):
        try:
            return self.cache[name]
        except KeyError:
            shown = ", ".join(list(self.cache)[:6]) + (" ..." if len(self.cache) > 6 else "")
            raise KeyError(f"capture: {name!r} was not recorded (recorded: {shown or 'nothing'}; check `names` "
                           "and that the model ran inside the context)") from None

    def __contains__(self, name: str) -> bool:
        return name in self.cache

    def keys(self):
        return self.cache.keys()

    @property
    def num_layers(self) -> int:
        return _adapter_for(self.model).num_layers

    # --- called by the adapters ---
    def active(self, name: str) -> bool:
        return name in self.edits or self.wanted(name)

    def emit(self, layer: int, kind: str, value: Tensor) -> Tensor:
        name = f"blocks.{layer}.attn.{kind}" if kind in ATTN_HOOKS else f"blocks.{layer}.{kind}"
        fn = self.edits.get(name)
        if fn is not None:
            out = fn(value, Hook(name, layer, kind))
            if out is not None:
                if not isinstance(out, Tensor) or out.shape != value.shape:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"capture: the edit of {name} must return a tensor of shape "
                                     f"{tuple(value.shape)} (or None), got {got}")
                value = out
        if self.wanted(name):
            kept = value.detach() if self.detach else value
            if self.accumulate:
                self.cache.setdefault(name, []).append(kept)
            else:
                self.cache[name] = kept
        return value


def capture(model: nn.Module, *, names=None, edits: dict[str, Edit] | None = None, accumulate: bool = False,
            detach: bool = True) -> Capture:
    """A context manager that records the hooks `names` selects (None: all; a name, a glob such as
    "blocks.*.attn.hook_pattern", a list, or a callable name -> bool) and applies `edits`
    ({name: fn(tensor, hook) -> tensor or None}) on every forward of `model` inside it."""
    return Capture(model, names=names, edits=edits, accumulate=accumulate, detach=detach)


# --- edit helpers -----------------------------------------------------------------------------------

def _heads_by_layer(heads) -> dict[int, list[int]]:
    if isinstance(heads, dict):
        return {int(l): sorted(set(int(h) for h in hs)) for l, hs in heads.items()}
    out: dict[int, list[int]] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"heads must be {{layer: [heads]}} or [(layer, head), ...], got item {item!r}")
        out.setdefault(int(item[0]), []).append(int(item[1]))
    return out


def ablate_heads(heads, *, value: float = 0.0) -> dict[str, Edit]:
    """Edits that set the chosen heads' outputs (hook_z) to `value` (0: zero ablation).
    heads: {layer: [head, ...]} or [(layer, head), ...]."""
    edits = {}
    for layer, hs in _heads_by_layer(heads).items():
        def fn(z: Tensor, hook: Hook, hs=hs) -> Tensor:
            if max(hs) >= z.shape[2]:
                raise IndexError(f"ablate_heads: head {max(hs)} asked of layer {hook.layer} with {z.shape[2]} heads")
            z = z.clone()
            z[:, :, hs] = value
            return z
        edits[f"blocks.{layer}.attn.hook_z"] = fn
    return edits


def scale_heads(gates: dict[int, Tensor]) -> dict[str, Edit]:
    """Edits multiplying each head's output by a gate: {layer: (h,) tensor}. With gates that require
    grad, d loss / d gate is the head-importance score of Michel et al. (2019)."""
    edits = {}
    for layer, g in gates.items():
        def fn(z: Tensor, hook: Hook, g=g) -> Tensor:
            if g.shape != (z.shape[2],):
                raise ValueError(f"scale_heads: layer {hook.layer} has {z.shape[2]} heads, got gates {tuple(g.shape)}")
            return z * g.to(z.dtype)[None, None, :, None]
        edits[f"blocks.{int(layer)}.attn.hook_z"] = fn
    return edits


# --- adapters ---------------------------------------------------------------------------------------

class _Adapter:
    num_layers: int

    def attach(self, cap: Capture) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _adapter_for(model: nn.Module) -> _Adapter:
    if _is_hf(model):
        return _HFAdapter(model)
    blocks = _attnlab_blocks(model)
    if blocks is not None:
        return _AttnlabAdapter(model, blocks)
    raise TypeError(f"capture: {type(model).__name__} is neither a HuggingFace PreTrainedModel (needs the "
                    "attnlab[hf] extra) nor an attnlab model with blocks (.blocks or .body.blocks: an nn.ModuleList "
                    "of blocks with .attn and .mlp)")


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_output(out, value):
    if isinstance(out, tuple):
        return (value, *out[1:])
    if isinstance(out, list):
        return [value, *out[1:]]
    return value


def _block_hook(cap: Capture, layer: int, kind: str):
    def hook(module, inputs, out):
        name = f"blocks.{layer}.{kind}"
        if not cap.active(name):
            return None
        value = _output(out)
        new = cap.emit(layer, kind, value)
        return None if new is value else _replace_output(out, new)
    return hook


# HuggingFace ----------------------------------------------------------------------------------------

_MODULE_LAYER: dict[int, tuple[Capture, int]] = {}     # id(attention module) -> (its capture, layer)
_REGISTERED = False


def _capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                       scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                       **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention with the hook points. q (B, h, N, d), k/v (B, h_kv, M, d)."""
    entry = _MODULE_LAYER.get(id(module))
    cap, layer = entry if entry is not None else (None, -1)

    def emit(kind: str, x: Tensor) -> Tensor:
        if cap is None or not cap.active(f"blocks.{layer}.attn.{kind}"):
            return x
        return cap.emit(layer, kind, x)

    def emit_heads(kind: str, x: Tensor) -> Tensor:          # (B, h, N, d) <-> TransformerLens (B, N, h, d)
        if cap is None or not cap.active(f"blocks.{layer}.attn.{kind}"):
            return x
        return cap.emit(layer, kind, x.transpose(1, 2)).transpose(1, 2)

    query, key, value = emit_heads("hook_q", query), emit_heads("hook_k", key), emit_heads("hook_v", value)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups * key.shape[1] != query.shape[1]:
        raise ValueError(f"capture: {query.shape[1]} query heads are not a multiple of {key.shape[1]} key heads")
    if groups > 1:                                            # grouped-query attention: repeat the kv heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling                 # (B, h, N, M)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    scores = emit("hook_scores", scores)
    upcast = torch.float64 if scores.dtype == torch.float64 else torch.float32   # never below the input's
    pattern = torch.softmax(scores, dim=-1, dtype=upcast).to(query.dtype)
    pattern = emit("hook_pattern", pattern)
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()               # (B, N, h, d)
    out = emit("hook_z", out)
    return out, pattern


def _register_hf() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    _REGISTERED = True


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer layers: the longest ModuleList of one repeated class."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise TypeError(f"capture: found no list of layers in {type(model).__name__}")
    return best


def _find(layer: nn.Module, paths: Iterable[str]) -> nn.Module | None:
    for path in paths:
        m = layer
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Module):
            return m
    return None


# What each layer adds to the residual stream, by the attribute that computes it (first found).
_ATTN_OUT = ("layer_scale1", "attention.output.dense", "self_attn", "attention",
             "attn")
_MLP_OUT = ("post_feedforward_layernorm", "layer_scale2", "output.dense", "mlp", "feed_forward")


class _HFAdapter(_Adapter):
    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = _layer_stack(model)
        self.num_layers = len(self.layers)
        self.handles: list = []
        self.saved = None

    def _attn_out_module(self, layer: nn.Module) -> nn.Module | None:
        # Gemma's post_attention_layernorm normalises the attention's output before the residual add;
        # Llama's post_attention_layernorm is the pre-MLP norm (of the residual), not an output.
        if getattr(layer, "pre_feedforward_layernorm", None) is not None:
            return layer.post_attention_layernorm
        return _find(layer, _ATTN_OUT)

    def attach(self, cap: Capture) -> None:
        _register_hf()
        for l, layer in enumerate(self.layers):
            for m in layer.modules():
                if id(m) in _MODULE_LAYER and _MODULE_LAYER[id(m)][0] is not cap:
                    raise RuntimeError("capture: this model is already inside another capture")
                _MODULE_LAYER[id(m)] = (cap, l)
            for kind, module in (("hook_attn_out", self._attn_out_module(layer)),
                                 ("hook_mlp_out", _find(layer, _MLP_OUT)), ("hook_resid_post", layer)):
                if module is not None:
                    self.handles.append(module.register_forward_hook(_block_hook(cap, l, kind)))
        self.saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.layers:
            for m in layer.modules():
                _MODULE_LAYER.pop(id(m), None)
        if self.saved is not None:
            self.model.set_attn_implementation(self.saved)


# attnlab --------------------------------------------------------------------------------------------

def _is_block(block: nn.Module) -> bool:
    """A residual block capture can read: an attention module `.attn` and an `.mlp` (None allowed)."""
    mlp = getattr(block, "mlp", False)
    return isinstance(getattr(block, "attn", None), nn.Module) and (mlp is None or isinstance(mlp, nn.Module))


def _attnlab_blocks(model: nn.Module) -> nn.ModuleList | None:
    for candidate in (model, getattr(model, "body", None)):
        blocks = getattr(candidate, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and all(_is_block(b) for b in blocks):
            return blocks
    return None


def _branch(block: nn.Module, hook: str, fallback: nn.Module | None) -> nn.Module | None:
    """The module whose output is what a branch adds to the residual: the block's own hook point
    (e.g. DiT's gated branches) where it has one, else the branch module itself."""
    point = getattr(block, hook, None)
    return point if isinstance(point, nn.Module) else fallback


# attnlab hook point -> capture name, and whether it carries (B, h, N, d) to show as (B, N, h, d)
_ATTNLAB_HOOKS = {"hook_q": ("hook_q", True), "hook_k": ("hook_k", True), "hook_v": ("hook_v", True),
                  "hook_scores": ("hook_scores", False), "hook_probs": ("hook_pattern", False),
                  "hook_out": ("hook_z", True)}


class _AttnlabAdapter(_Adapter):
    def __init__(self, model: nn.Module, blocks: nn.ModuleList):
        self.model, self.blocks = model, blocks
        self.num_layers = len(blocks)
        self.handles: list = []
        self.backends: list = []

    def attach(self, cap: Capture) -> None:
        for l, block in enumerate(self.blocks):
            attn = block.attn
            if hasattr(attn, "backend"):
                self.backends.append((attn, attn.backend))
                attn.backend = "reference"                     # the eager path: scores and pattern exist
            for point, (kind, heads) in _ATTNLAB_HOOKS.items():
                hp = getattr(attn, point, None)
                if isinstance(hp, nn.Module):
                    self.handles.append(hp.register_forward_hook(self._point_hook(cap, l, kind, heads)))
            for kind, module in (("hook_attn_out", _branch(block, "hook_attn_out", attn)),
                                 ("hook_mlp_out", _branch(block, "hook_mlp_out", block.mlp)),
                                 ("hook_resid_post", block)):
                if module is not None:
                    self.handles.append(module.register_forward_hook(_block_hook(cap, l, kind)))

    @staticmethod
    def _point_hook(cap: Capture, layer: int, kind: str, heads: bool):
        def hook(module, inputs, out):
            if not cap.active(f"blocks.{layer}.attn.{kind}"):
                return None
            if heads and out.dim() == 4:
                return cap.emit(layer, kind, out.transpose(1, 2)).transpose(1, 2)
            return cap.emit(layer, kind, out)
        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for attn, backend in self.backends:
            attn.backend = backend
        self.backends.clear()


__all__ = ["capture", "Capture", "Hook", "hook_names", "ablate_heads", "scale_heads", "ATTN_HOOKS", "BLOCK_HOOKS"]
