"""VISOR networks: text tokens through every layer, visual tokens read at a few and refined at fewer.

    body = attnlab.models.Visor(64, 4, layers=4, cross_layers=[1, 3], refine_layers=[0])
    text, visual = body(text, visual)                  # (B, N, C), (B, M, C) -> same shapes
    body.modes()                                       # ['full', 'cross', 'text', 'cross']
    body.flop_comparison(text_len=3, visual_len=64)    # full self-attention vs cross-only vs this

Paper: Bulat et al., "VISion On Request: Enhanced VLLM efficiency with sparse, dynamically
selected, vision-language interactions" (CVPR 2026, arXiv:2603.23495); no code released, so this
is a reconstruction (see src/attnlab/mechanisms/visor.py for what was read and what was guessed).

Each layer is one pre-norm block, x + attn(norm1(x)) then x + mlp(norm2(x)), whose attention is
the `visor` mechanism (one set of q/k/v/o weights for both streams, as a layer of the LVLM it
reconstructs). A layer runs in one of three modes:
- "full" (i in `refine_layers`): full self-attention over [V; T] (`VisorAttention.joint`); text and
  visual tokens both go through the attention and the MLP: the visual tokens are refined.
- "cross" (i in `cross_layers`, not a refinement layer): the text tokens attend [V; T] keys
  (`VisorAttention.forward`), the visual tokens give keys and values (through norm1, k_proj,
  v_proj) and are not updated; the MLP runs on the text only.
- "text" (neither): the visual tokens are not touched; text self-attention and MLP.
A refinement layer needs no entry in `cross_layers`: its text rows see the visual tokens anyway.
`refine_layers` is fixed at construction and can be overridden per call (`forward(...,
refine_layers=[...])`): the paper trains one network for several budgets and lets a light policy
pick the budget per sample; that policy is not reconstructed here (Deviations below).

The three budgets the FLOP counters compare (`Visor.flop_comparison`, `visor_flops`):
(a) full self-attention over [V; T] at every layer (LLaVA-style: every layer "full");
(b) cross-attention only: `cross_layers` as given, no refinement, the visual tokens never change;
(c) VISOR: `cross_layers` plus the `refine_layers`.
They count 2 x the multiply-adds of the matmuls (linear layers, scores, weighted sums), the work
`torch.utils.flop_counter.FlopCounterMode` sees on attnlab's eager attention; norms, softmax and
activations are left out (they are O(tokens x C), not matmuls).

Deviations: no per-sample policy (a fixed `refine_layers`, overridable per call); no rotary
embeddings (learned positions in `VisorClassifier`); LayerNorm and a GELU MLP as attnlab's
`Block` (Qwen2 uses RMSNorm and SwiGLU); the visual tokens at a cross layer are the last refined
ones, normalised by that layer's norm1 (the reading of "the visual tokens are not updated").
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from attnlab.models.transformer import Mlp, parse_layer
from attnlab.registry import create

MODES = ("text", "cross", "full")
MECHANISM = "visor"


def _layer_list(name: str, value, layers: int) -> list[int]:
    """Validated sorted layer indices in [0, layers)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
        raise TypeError(f"Visor: {name} must be a list of layer indices, got {value!r}")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers:
            raise ValueError(f"Visor: {name} must hold layer indices in [0, {layers}), got {list(value)!r}")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"Visor: {name} lists a layer twice: {list(value)!r}")
    return sorted(out)


def layer_modes(layers: int, cross_layers: Sequence[int] | None, refine_layers: Sequence[int]) -> list[str]:
    """The mode of each layer: "full" in refine_layers, else "cross" in cross_layers (None: every
    layer), else "text"."""
    cross = set(range(layers)) if cross_layers is None else set(_layer_list("cross_layers", cross_layers, layers))
    refine = set(_layer_list("refine_layers", refine_layers, layers))
    return ["full" if i in refine else "cross" if i in cross else "text" for i in range(layers)]


# --- FLOP counters ----------------------------------------------------------------------------------

def layer_flops(mode: str, *, dim: int, num_heads: int, num_kv_heads: int | None = None, mlp_hidden: int,
                text_len: int, visual_len: int, causal: bool = False) -> int:
    """Forward FLOPs (2 x multiply-adds of the matmuls) of one layer in `mode` for one sample.

    With C = dim, d = C / h, kv = 2 h_kv d, H = mlp_hidden, N text and M visual tokens:
    - text:  q and o 4 N C^2, k/v 2 N C kv, scores + weighted sum 4 C per (query, key) pair over
             N^2 pairs (N (N + 1) / 2 causal), MLP 4 N C H;
    - cross: q and o 4 N C^2, k/v 2 (N + M) C kv, 4 C per pair over N (M + N) pairs
             (N M + N (N + 1) / 2 causal), MLP 4 N C H;
    - full:  every cost on N + M tokens, (M + N)^2 pairs ((M + N)(M + N + 1) / 2 causal).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    C, N, M = dim, text_len, visual_len
    h_kv = num_heads if num_kv_heads is None else num_kv_heads
    kv = 2 * h_kv * (C // num_heads)

    def pairs_square(n: int) -> int:
        return n * (n + 1) // 2 if causal else n * n

    if mode == "text":
        rows, kv_tokens, pairs = N, N, pairs_square(N)
    elif mode == "cross":
        rows, kv_tokens, pairs = N, N + M, N * M + pairs_square(N)
    else:
        rows, kv_tokens, pairs = N + M, N + M, pairs_square(N + M)
    return 4 * rows * C * C + 2 * kv_tokens * C * kv + 4 * C * pairs + 4 * rows * C * mlp_hidden


def network_flops(modes: Sequence[str], *, batch: int = 1, **shape: Any) -> int:
    """Forward FLOPs of a stack of layers in `modes` (see layer_flops for `shape`), for `batch` samples."""
    return batch * sum(layer_flops(mode, **shape) for mode in modes)


def visor_flops(dim: int, num_heads: int, layers: int, *, text_len: int, visual_len: int,
                cross_layers: Sequence[int] | None, refine_layers: Sequence[int], mlp_ratio: float = 4.0,
                num_kv_heads: int | None = None, causal: bool = False, batch: int = 1) -> dict[str, Any]:
    """Forward FLOPs of (a) full self-attention over [V; T] at every layer, (b) cross-attention only
    (visual tokens never refined) and (c) VISOR (cross + the refinement layers), and what (b) and (c)
    save against (a).

    Returns {"full": int, "cross_only": int, "visor": int, "visor_saved": 1 - visor / full,
    "cross_only_saved": ..., "visor_speedup": full / visor, "modes": {...}}.
    """
    shape = dict(dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, mlp_hidden=int(dim * mlp_ratio),
                 text_len=text_len, visual_len=visual_len, causal=causal)
    modes = {"full": ["full"] * layers, "cross_only": layer_modes(layers, cross_layers, []),
             "visor": layer_modes(layers, cross_layers, refine_layers)}
    out: dict[str, Any] = {k: network_flops(v, batch=batch, **shape) for k, v in modes.items()}
    out.update(visor_saved=1 - out["visor"] / out["full"], cross_only_saved=1 - out["cross_only"] / out["full"],
               visor_speedup=out["full"] / out["visor"], modes=modes)
    return out


# --- modules ----------------------------------------------------------------------------------------

class VisorBlock(nn.Module):
    """One pre-norm layer over the two streams; `forward(text, visual, mode)` -> (text, visual)."""

    def __init__(self, dim: int, num_heads: int = 8, *, mechanism_options: dict | None = None, mlp_ratio: float = 4.0,
                 act: str = "gelu", drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0 (0 = no MLP), got {mlp_ratio}")
        self.norm1 = norm_layer(dim)
        self.attn = create(MECHANISM, dim, num_heads, **(mechanism_options or {}))
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def _mlp(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, text: Tensor, visual: Tensor, mode: str, *, visual_mask: Tensor | None = None,
                is_causal: bool = False) -> tuple[Tensor, Tensor]:
        if mode == "text":      # the visual tokens are not touched
            text = text + self.attn.text_self_attention(self.norm1(text), is_causal=is_causal)
            return self._mlp(text), visual
        if mode == "cross":     # the visual tokens are keys and values only
            text = text + self.attn(self.norm1(text), self.norm1(visual), attn_mask=visual_mask, is_causal=is_causal)
            return self._mlp(text), visual
        if mode != "full":
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        t, v = self.attn.joint(self.norm1(text), self.norm1(visual), attn_mask=visual_mask, is_causal=is_causal)
        text, visual = text + t, visual + v
        both = self._mlp(torch.cat([visual, text], 1))                    # (B, M + N, C): one MLP call
        M = visual.shape[1]
        return both[:, M:], both[:, :M]


class Visor(nn.Module):
    """A stack of VisorBlocks and a final norm on the text: (text (B, N, C), visual (B, M, C)) ->
    (text (B, N, C) normed, visual (B, M, C) as the last refinement layer left it).

    layers: an int L, or a list of L layer descriptions that all name "visor" (per-layer mechanism
    options, e.g. {"name": "visor", "num_kv_heads": 2}). cross_layers: the layers where the text
    reads the visual tokens (None: every layer). refine_layers: the layers where the visual tokens
    are refined (full self-attention over [V; T]). is_causal: text causal among itself (and the
    joint sequence [V; T] causal at refinement layers, as LLaVA's mask).
    """

    def __init__(self, dim: int, num_heads: int = 8, layers: int | Sequence[Any] = 4, *,
                 cross_layers: Sequence[int] | None = None, refine_layers: Sequence[int] = (),
                 mlp_ratio: float = 4.0, act: str = "gelu", drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, mechanism_options: dict | None = None):
        super().__init__()
        if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
            raise TypeError(f"Visor: layers must be an int or a list of 'visor' layers, got {layers!r}")
        if isinstance(layers, int):
            if layers <= 0:
                raise ValueError(f"Visor: layers must be a positive int, got {layers}")
            layers = [MECHANISM] * layers
        options = []
        for layer in layers:
            name, opts = parse_layer(layer)
            if name != MECHANISM:
                raise ValueError(f"Visor: every layer runs the 'visor' mechanism (one set of weights serves the cross, "
                                 f"refinement and text-only modes), got {name!r}")
            options.append({**(mechanism_options or {}), **opts})
        if not options:
            raise ValueError("Visor: layers must not be empty")
        self.num_layers = len(options)
        self.cross_layers = None if cross_layers is None else _layer_list("cross_layers", cross_layers, self.num_layers)
        self.refine_layers = _layer_list("refine_layers", refine_layers, self.num_layers)
        self.dim, self.num_heads, self.mlp_ratio = dim, num_heads, mlp_ratio
        self.blocks = nn.ModuleList(
            VisorBlock(dim, num_heads, mechanism_options=o, mlp_ratio=mlp_ratio, act=act, drop=drop,
                       norm_layer=norm_layer) for o in options)
        self.norm = norm_layer(dim)

    def modes(self, refine_layers: Sequence[int] | None = None) -> list[str]:
        """Each layer's mode, with this model's refine_layers or the given ones."""
        return layer_modes(self.num_layers, self.cross_layers,
                           self.refine_layers if refine_layers is None else refine_layers)

    def forward(self, text: Tensor, visual: Tensor, *, visual_mask: Tensor | None = None, is_causal: bool = False,
                refine_layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(text, Tensor) or not isinstance(visual, Tensor) or text.dim() != 3 or visual.dim() != 3 \
                or text.shape[0] != visual.shape[0] or text.shape[-1] != self.dim or visual.shape[-1] != self.dim:
            raise ValueError(f"Visor: expected text (B, N, {self.dim}) and visual (B, M, {self.dim}) tensors, got "
                             f"{tuple(getattr(text, 'shape', ()))} and {tuple(getattr(visual, 'shape', ()))}")
        for block, mode in zip(self.blocks, self.modes(refine_layers)):
            text, visual = block(text, visual, mode, visual_mask=visual_mask, is_causal=is_causal)
        return self.norm(text), visual

    def _shape(self, text_len: int, visual_len: int, causal: bool) -> dict[str, Any]:
        attn = self.blocks[0].attn
        if any(b.attn.num_kv_heads != attn.num_kv_heads for b in self.blocks):
            raise NotImplementedError("Visor.flops: layers with different num_kv_heads")
        mlp = 0 if self.blocks[0].mlp is None else self.blocks[0].mlp.fc1.out_features
        return dict(dim=self.dim, num_heads=self.num_heads, num_kv_heads=attn.num_kv_heads, mlp_hidden=mlp,
                    text_len=text_len, visual_len=visual_len, causal=causal)

    def flops(self, text_len: int, visual_len: int, *, batch: int = 1, refine_layers: Sequence[int] | None = None,
              causal: bool = False) -> int:
        """Forward FLOPs of this model (its modes, or with the given refine_layers); see layer_flops."""
        return network_flops(self.modes(refine_layers), batch=batch, **self._shape(text_len, visual_len, causal))

    def flop_comparison(self, text_len: int, visual_len: int, *, batch: int = 1, causal: bool = False) -> dict[str, Any]:
        """`visor_flops` for this model's layers, cross_layers and refine_layers."""
        s = self._shape(text_len, visual_len, causal)
        return visor_flops(self.dim, self.num_heads, self.num_layers, text_len=text_len, visual_len=visual_len,
                           cross_layers=self.cross_layers, refine_layers=self.refine_layers,
                           mlp_ratio=s["mlp_hidden"] / self.dim, num_kv_heads=s["num_kv_heads"], causal=causal,
                           batch=batch)


class VisorClassifier(nn.Module):
    """A visual question answerer: patch features (B, M, visual_in_dim) and question ids (B, N) ->
    logits (B, num_classes), read from the text token `answer_index` (default the last).

    Front ends: visual = Linear(visual_in_dim, C) + learned positions (1, M, C); text = Embedding
    (vocab_size, C), N(0, 1) as attnlab's Classifier, + learned positions (1, N, C), both N(0, 0.02).
    The body is `Visor` (options after `*` go to it); the head Linear(C, num_classes).
    """

    def __init__(self, num_classes: int, dim: int, num_heads: int = 8, layers: int | Sequence[Any] = 4, *,
                 vocab_size: int, visual_in_dim: int, text_len: int, visual_len: int, answer_index: int = -1,
                 pos_std: float = 0.02, **body_options):
        super().__init__()
        if not -text_len <= answer_index < text_len:
            raise ValueError(f"VisorClassifier: answer_index must index the {text_len} text tokens, got {answer_index}")
        self.text_len, self.visual_len, self.answer_index = text_len, visual_len, answer_index
        self.visual_in_dim, self.num_classes = visual_in_dim, num_classes
        self.visual_embed = nn.Linear(visual_in_dim, dim)
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.visual_pos = nn.Parameter(torch.randn(1, visual_len, dim) * pos_std)
        self.text_pos = nn.Parameter(torch.randn(1, text_len, dim) * pos_std)
        self.body = Visor(dim, num_heads, layers, **body_options)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, visual: Tensor, text: Tensor, *, visual_mask: Tensor | None = None,
                refine_layers: Sequence[int] | None = None) -> Tensor:
        if not isinstance(visual, Tensor) or not isinstance(text, Tensor):
            raise TypeError(f"VisorClassifier: expected visual features (B, {self.visual_len}, {self.visual_in_dim}) "
                            f"and question ids (B, {self.text_len}) tensors, got {type(visual).__name__} and "
                            f"{type(text).__name__}")
        if visual.dim() != 3 or visual.shape[1:] != (self.visual_len, self.visual_in_dim):
            raise ValueError(f"VisorClassifier: expected visual features (B, {self.visual_len}, {self.visual_in_dim}), "
                             f"got {tuple(visual.shape)}")
        if text.dim() != 2 or text.shape[1] != self.text_len or text.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"VisorClassifier: expected question ids (B, {self.text_len}) int64, got "
                             f"{tuple(text.shape)} {text.dtype}")
        if text.shape[0] != visual.shape[0]:
            raise ValueError(f"VisorClassifier: {visual.shape[0]} images and {text.shape[0]} questions")
        v = self.visual_embed(visual) + self.visual_pos                       # (B, M, C)
        t = self.text_embed(text) + self.text_pos                             # (B, N, C)
        t, _ = self.body(t, v, visual_mask=visual_mask, refine_layers=refine_layers)
        return self.head(t[:, self.answer_index])                             # (B, num_classes)

    def flops(self, *, batch: int = 1, refine_layers: Sequence[int] | None = None) -> int:
        """Forward FLOPs: the body's plus the visual embedding 2 M in C and the head 2 C classes."""
        C = self.body.dim
        front = 2 * self.visual_len * self.visual_in_dim * C + 2 * C * self.num_classes
        return batch * front + self.body.flops(self.text_len, self.visual_len, batch=batch,
                                               refine_layers=refine_layers)


__all__ = ["Visor", "VisorBlock", "VisorClassifier", "layer_flops", "layer_modes", "network_flops", "visor_flops"]
