"""Pre-norm Transformer blocks over any registered sequence mechanism, and a stack of them.

    block = attnlab.Block(256, 4, mechanism="moh", mechanism_options={"top_k": 2})
    body = attnlab.Transformer(256, 4, layers=["mhsa", "deconstructed:fixed", "mhsa"])
    lm = attnlab.CausalLM(vocab_size=65, dim=256, num_heads=4, layers=["mhsa"] * 4, max_len=256)
    clf = attnlab.Classifier(num_classes=10, dim=64, num_heads=4, layers=2, in_dim=16)

A layer is named by a string ("mhsa", "deconstructed:fixed"), a (name, options) pair, a dict
{"name": ..., **options}, or a MechanismSpec. `layers` may also be an int (that many "mhsa").

Contracts with mechanisms:
- every block calls `attn(x, attn_mask=..., is_causal=..., cache=...)`;
- a mechanism with attribute `needs_embeddings = True` also gets `embeddings=` (B, N, C), the
  stack's input (token + position embeddings), for queries/keys coupled to the embeddings;
- a mechanism that sets `aux_loss` (a scalar tensor) after its forward contributes to
  `Transformer.aux_loss` (e.g. MoH's load-balance loss); train with `loss + coef * aux_loss`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.registry import MechanismSpec, create, get_spec

LayerSpec = Any  # str | (str, dict) | dict | MechanismSpec


def _activation(name: str) -> nn.Module:
    table = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
             "relu": nn.ReLU, "silu": nn.SiLU}
    try:
        from attnlab.ops.numerics import ACTIVATIONS  # Edge-MoE and friends, where present
    except ImportError:
        ACTIVATIONS = {}
    if name in table:
        return table[name]()
    if name in ACTIVATIONS:
        fn = ACTIVATIONS[name]
        return fn() if isinstance(fn, type) else _Lambda(fn, name)
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(set(table) | set(ACTIVATIONS))}")


class _Lambda(nn.Module):
    def __init__(self, fn, name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class Mlp(nn.Module):
    """timm-style MLP: Linear -> act -> drop -> Linear -> drop. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden_dim: int, *, act: str = "gelu", drop: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def parse_layer(layer: LayerSpec) -> tuple[str, dict]:
    """A layer description -> (mechanism name, options)."""
    if isinstance(layer, MechanismSpec):
        return layer.name, {}
    if isinstance(layer, str):
        return layer, {}
    if isinstance(layer, dict):
        if "name" not in layer:
            raise ValueError(f"a layer dict needs a 'name' key, got keys {sorted(layer)}")
        options = dict(layer)
        return options.pop("name"), options
    if isinstance(layer, (tuple, list)) and len(layer) == 2 and isinstance(layer[0], str) \
            and isinstance(layer[1], dict):
        return layer[0], dict(layer[1])
    raise TypeError("a layer must be a mechanism name, a (name, options) pair, a dict with 'name', "
                    f"or a MechanismSpec; got {layer!r}")


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)) (no MLP when mlp_ratio == 0).

    x (B, N, C) -> (B, N, C). `softmax` and other mechanism options go in `mechanism_options`
    (`softmax=` here is a shortcut for mechanisms that take it, such as mhsa).
    A 2-D mechanism (layout "2d", e.g. halo2d, neighborhood2d) needs `grid=(H, W)`: its tokens
    are an H x W image in row-major order, (B, H*W, C) -> (B, H, W, C) -> mechanism -> back. Sequence
    mechanisms ignore `grid`, so one stack can mix both on the tokens of an image.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mechanism: LayerSpec = "mhsa",
                 mechanism_options: dict | None = None, mlp_ratio: float = 4.0, act: str = "gelu",
                 softmax: str | None = None, drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        name, options = parse_layer(mechanism)
        options.update(mechanism_options or {})
        if softmax is not None:
            options["softmax"] = softmax
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0 (0 = no MLP), got {mlp_ratio}")
        spec = get_spec(name)
        if spec.layout not in ("seq", "2d"):
            raise ValueError(f"Block needs a sequence or 2-D mechanism (layout 'seq' or '2d'), {name!r} has "
                             f"layout {spec.layout!r}")
        self.grid = None
        if spec.layout == "2d":
            if grid is None or len(grid) != 2 or any(not isinstance(g, int) or isinstance(g, bool) or g < 1
                                                     for g in grid):
                raise ValueError(f"mechanism {name!r} is 2-D: Block needs grid=(H, W), positive ints with "
                                 f"H * W tokens, got grid={grid!r}")
            self.grid = (int(grid[0]), int(grid[1]))
        self.mechanism = name
        self.norm1 = norm_layer(dim)
        self.attn = create(name, dim, num_heads, **options)
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, embeddings: Tensor | None = None) -> Tensor:
        extra = {}
        if getattr(self.attn, "needs_embeddings", False):
            if embeddings is None:
                raise ValueError(f"mechanism {self.mechanism!r} needs the stack's input embeddings; "
                                 "pass embeddings= (B, N, C)")
            extra["embeddings"] = embeddings
        if self.grid is not None:
            x = x + self._attend_grid(self.norm1(x), attn_mask, is_causal, cache)
        else:
            x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, cache=cache, **extra)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


    def _attend_grid(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache) -> Tensor:
        B, N, C = x.shape
        H, W = self.grid
        if N != H * W:
            raise ValueError(f"mechanism {self.mechanism!r} is 2-D over grid {self.grid}: expected {H * W} "
                             f"tokens, got {N} (shape {tuple(x.shape)})")
        if attn_mask is not None or cache is not None or is_causal:
            raise ValueError(f"mechanism {self.mechanism!r} is 2-D: in a Block it takes no attn_mask, cache or "
                             "is_causal (give a causal 2-D mechanism its own causal= option)")
        y = self.attn(x.reshape(B, H, W, C))                               # (B, H, W, C)
        return y.reshape(B, N, C)


class Transformer(nn.Module):
    """A stack of Blocks, each with its own mechanism, and a final norm. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int = 8, layers: int | Sequence[LayerSpec] = 4, *,
                 mlp_ratio: float = 4.0, act: str = "gelu", softmax: str | None = None, drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, grid: tuple[int, int] | None = None):
        super().__init__()
        if isinstance(layers, int):
            if layers <= 0:
                raise ValueError(f"layers must be a positive int or a list of layers, got {layers}")
            layers = ["mhsa"] * layers
        elif isinstance(layers, (str, dict, MechanismSpec)):
            raise TypeError(f"layers must be an int or a list of layers, got a single {type(layers).__name__}; "
                            "wrap it in a list")
        layers = list(layers)
        if not layers:
            raise ValueError("layers must not be empty")
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mechanism=layer, mlp_ratio=mlp_ratio, act=act, softmax=softmax, drop=drop,
                  norm_layer=norm_layer, grid=grid) for layer in layers)
        self.norm = norm_layer(dim)
        self.dim = dim

    @property
    def layer_names(self) -> list[str]:
        return [b.mechanism for b in self.blocks]

    def new_cache(self, max_len: int | None = None) -> list[KVCache]:
        """One KVCache per layer, for incremental decoding."""
        return [KVCache(max_len) for _ in self.blocks]

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the mechanisms' auxiliary losses from the last forward (None if none has one)."""
        losses = [b.attn.aux_loss for b in self.blocks if getattr(b.attn, "aux_loss", None) is not None]
        return torch.stack([l.reshape(()) for l in losses]).sum() if losses else None

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: Sequence[KVCache] | None = None) -> Tensor:
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache must hold one KVCache per layer ({len(self.blocks)}), got {len(cache)}")
        embeddings = x
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, cache=None if cache is None else cache[i],
                      embeddings=embeddings)
        return self.norm(x)


class _Embedded(nn.Module):
    """Shared front end: token ids (B, N) or features (B, N, in_dim) -> (B, N, C) + positions."""

    def __init__(self, dim: int, *, vocab_size: int | None, in_dim: int | None, max_len: int, pos: str,
                 pos_std: float = 0.02):
        super().__init__()
        if (vocab_size is None) == (in_dim is None):
            raise ValueError("give exactly one of vocab_size (token ids) and in_dim (feature vectors)")
        if pos not in ("learned", "none"):
            raise ValueError(f"pos must be 'learned' or 'none', got {pos!r}")
        self.vocab_size, self.in_dim, self.max_len = vocab_size, in_dim, max_len
        # Initialisation: PyTorch's defaults for the token table (N(0, 1)) and the feature Linear
        # (Kaiming-uniform); learned positions N(0, pos_std), 0.02 as in GPT-2 / timm. The token
        # identity must not be small next to what each block writes into the residual stream
        # (about 0.14 per attention block and 0.2 per MLP at width 64 with default Linear init):
        # a GPT-2 N(0, 0.02) table is drowned by layer 2. docs/models.md has the measurements;
        # tests/models/test_learns.py trains this model beside a plain-torch reference.
        if not isinstance(pos_std, (int, float)) or isinstance(pos_std, bool) or not pos_std >= 0:
            raise ValueError(f"pos_std must be a number >= 0, got {pos_std!r}")
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim)) if pos == "learned" else None
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=float(pos_std))

    def forward(self, inputs: Tensor, offset: int = 0) -> Tensor:
        if self.vocab_size is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"expected token ids (B, N) of dtype int64, got {tuple(inputs.shape)} {inputs.dtype}")
            if inputs.numel() and (inputs.min() < 0 or inputs.max() >= self.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got "
                                 f"[{int(inputs.min())}, {int(inputs.max())}]")
        elif inputs.dim() != 3 or inputs.shape[-1] != self.in_dim:
            raise ValueError(f"expected features (B, N, {self.in_dim}), got {tuple(inputs.shape)}")
        N = inputs.shape[1]
        if offset + N > self.max_len:
            raise ValueError(f"sequence of {offset + N} positions exceeds max_len={self.max_len}")
        x = self.embed(inputs)                                             # (B, N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, offset:offset + N]
        return x


class CausalLM(nn.Module):
    """Decoder-only language model: token ids (B, N) -> logits (B, N, vocab_size).

    `forward(tokens, targets=None, cache=None)` returns logits, or (logits, loss) with targets
    (cross-entropy, targets == -100 ignored). `generate` decodes with a KV cache where every
    layer supports one, and by recomputing the whole prefix otherwise.

    The head is untied from the token table by default: with the table at N(0, 1) (see
    `_Embedded`), a tied head starts with logits of std ~sqrt(dim) and on MQAR learned to 0.24
    in 400 steps where the untied one reached 1.0. `tie_weights=True` ties them (GPT-2 style).
    """

    def __init__(self, vocab_size: int, dim: int, num_heads: int = 8, layers: int | Sequence[LayerSpec] = 4, *,
                 max_len: int = 1024, pos: str = "learned", pos_std: float = 0.02, tie_weights: bool = False,
                 **block_options):
        super().__init__()
        self.embed = _Embedded(dim, vocab_size=vocab_size, in_dim=None, max_len=max_len, pos=pos, pos_std=pos_std)
        self.body = Transformer(dim, num_heads, layers, **block_options)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.embed.embed.weight

    @property
    def aux_loss(self) -> Tensor | None:
        return self.body.aux_loss

    def new_cache(self, max_len: int | None = None) -> list[KVCache]:
        return self.body.new_cache(max_len)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, attn_mask: Tensor | None = None,
                cache: Sequence[KVCache] | None = None):
        offset = len(cache[0]) if cache else 0
        x = self.embed(tokens, offset)                                     # (B, N, C)
        x = self.body(x, attn_mask=attn_mask, is_causal=True, cache=cache)
        logits = self.lm_head(x)                                           # (B, N, V)
        if targets is None:
            return logits
        if targets.shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample `max_new_tokens` after `tokens` (B, N); temperature 0 means greedy."""
        use_cache = all(b.attn.spec.kv_cache for b in self.body.blocks)
        cache = self.new_cache() if use_cache else None
        out, step_in = tokens, tokens
        for _ in range(max_new_tokens):
            logits = self(step_in, cache=cache)[:, -1] if use_cache else self(out[:, -self.embed.max_len:])[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            step_in = nxt
        return out


class Classifier(nn.Module):
    """Sequence classifier: token ids (B, N) or features (B, N, in_dim) -> logits (B, num_classes).

    `pool`: "mean" (over unpadded tokens), "cls" (a learned token prepended) or "last".
    `attn_mask` may be a (B, N) key-padding bool (True = real token).
    """

    def __init__(self, num_classes: int, dim: int, num_heads: int = 8, layers: int | Sequence[LayerSpec] = 4, *,
                 vocab_size: int | None = None, in_dim: int | None = None, max_len: int = 1024,
                 pos: str = "learned", pos_std: float = 0.02, pool: str = "mean", **block_options):
        super().__init__()
        if pool not in ("mean", "cls", "last"):
            raise ValueError(f"pool must be 'mean', 'cls' or 'last', got {pool!r}")
        self.pool = pool
        self.embed = _Embedded(dim, vocab_size=vocab_size, in_dim=in_dim, max_len=max_len + (pool == "cls"), pos=pos,
                               pos_std=pos_std)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.body = Transformer(dim, num_heads, layers, **block_options)
        self.head = nn.Linear(dim, num_classes)

    @property
    def aux_loss(self) -> Tensor | None:
        return self.body.aux_loss

    def forward(self, inputs: Tensor, *, attn_mask: Tensor | None = None) -> Tensor:
        B = inputs.shape[0]
        if self.cls_token is not None:
            x = self.embed(inputs, offset=1)                               # (B, N, C), positions 1..N
            first = self.cls_token.expand(B, -1, -1)
            if self.embed.pos_embed is not None:
                first = first + self.embed.pos_embed[:, :1]
            x = torch.cat([first, x], dim=1)                               # (B, 1 + N, C)
            if attn_mask is not None:
                attn_mask = torch.cat([attn_mask.new_ones(B, 1), attn_mask], dim=1)
        else:
            x = self.embed(inputs)                                         # (B, N, C)
        if attn_mask is not None and (attn_mask.dim() != 2 or attn_mask.dtype != torch.bool
                                      or attn_mask.shape != x.shape[:2]):
            raise ValueError(f"Classifier attn_mask must be a (B, N) = {tuple(inputs.shape[:2])} bool key-padding "
                             f"mask, got {tuple(attn_mask.shape)} {attn_mask.dtype}")
        x = self.body(x, attn_mask=attn_mask)                              # (B, N', C)
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "last":
            if attn_mask is None:
                pooled = x[:, -1]
            else:
                last = (attn_mask.long().cumsum(1).argmax(1))              # index of the last real token
                pooled = x[torch.arange(B, device=x.device), last]
        elif attn_mask is None:
            pooled = x.mean(1)
        else:
            weights = attn_mask.to(x.dtype).unsqueeze(-1)                  # (B, N, 1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)                                           # (B, num_classes)
