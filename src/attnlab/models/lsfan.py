"""L-SFAN: a lightweight CNN with oriented pooling and one attention layer over its channel tokens
(Ortigoso-Narro et al., 2024, arXiv 2406.16913, "L-SFAN: Lightweight Spatially-focused Attention
Network for Pain Behavior Detection"; official code jortigoso/LSFAN, `src/models.py`).

    model = LSFAN(num_classes=2, length=180, sensors=30)                  # the paper's CNN_TAP_Att
    logits = model(x)                                                     # x (B, T, S) -> (B, classes)
    LSFAN(4, length=100, sensors=6, num_heads=2, pooling="sap")           # pooled over sensors
    LSFAN(4, length=100, sensors=6, attention=None)                       # no attention (CNN_TAP)
    LSFAN(4, length=100, sensors=6, num_heads=2, attention="proxima")     # any registered mechanism

The network reads a frame of T time steps by S sensors as a one-channel image (B, 1, T, S) and runs:

1. `LSFANConvStack` (official `feature_extractor_small`): 4 x [Conv2d 3x3, padding (0, 1), BN,
   ReLU] with 1 -> 2 -> 4 -> 8 -> 16 channels and MaxPool2d((2, 1), stride (2, 1)) after convs 2
   and 4. Time is convolved without padding (T -> T - 2 per conv) and halved by each pool;
   sensors keep their width (padding 1). (B, 1, T, S) -> (B, 16, T', S), T' = ((T - 4) // 2 - 4) // 2
   (T = 180 -> T' = 42, the official comment's "H=42").
2. `oriented_pool`: TAP ("temporal average pooling", the official AdaptiveAvgPool2d((1, W))) means
   over time -> (B, 16, S); SAP (spatial average pooling) means over sensors -> (B, 16, T'). Either
   way the tokens are the 16 channels, of width S (TAP) or T' (SAP).
3. `LSFANEncoderLayer` (official nn.TransformerEncoderLayer(d_model=30, nhead=5,
   dim_feedforward=30, dropout=0.2, batch_first=True, norm_first=False) in an nn.TransformerEncoder
   of num_layers=1): post-norm, x = LN1(x + drop(attn(x))), x = LN2(x + drop(W2 drop(relu(W1 x)))),
   over the 16 tokens of that width. Its attention is a registered mechanism chosen by name
   (default "mhsa" with the official settings: q/k/v and output biases, dropout on the attention
   probabilities = `dropout`, as nn.MultiheadAttention(dropout=0.2) does).
4. Head: Flatten + Linear(16 * width, num_classes) (official `Classifier`).

Parameters at the paper's input (1, 180, 30), 2 classes, TAP, mhsa with 5 heads, feed-forward 30:
conv stack 1,560 + BN 60 = 1,620; encoder layer 5,700 (attention 3,720, feed-forward 1,860, two
LayerNorms 120); head 962: **8,282** in all (the issue's "about 8.3k"; a test checks it). The
official module reports 13,982 from `parameters()`, because it also registers the template
`encoderlayer` that nn.TransformerEncoder deep-copies and never runs (5,700 unused). Loaded with
the released checkpoint weights/L_SFAN/model0_segment0.pth through `from_official`, this module
gives the official CNN_TAP_Att's logits to 4e-7 (float32, checked once by hand; the checkpoint is
not shipped here).

What is the official code's and what is ours:
- Code's: every layer, its order and size, the padding (0, 1), the pools, the TAP mean, the
  post-norm encoder layer with ReLU feed-forward of width dim_feedforward (30 = d_model) and
  dropout 0.2, five heads on d_model = 30 (head width 6), the flattened head. `from_official`
  maps a released CNN_TAP_Att / CNN_TAP state dict onto this module (the official fused
  in_proj is [q; k; v] heads in order, the same layout as mhsa's qkv); checked against
  torch's own nn.TransformerEncoderLayer in the tests.
- Ours: the attention is any registered mechanism (`attention=` a name or {"name": ..., **options});
  SAP as a mean over sensors: the code's CNN_SAP calls AdaptiveAvgPool2d((1, H)) on (B, 16, H, W),
  which averages over *time* (output height 1) and resamples the sensor axis from W to H adaptive
  bins (its comment's shape (B, 16, 1, 42) is right, the content is not a sensor mean; a test shows
  the two differ), so here SAP follows the paper's wording and the issue, not that line;
  SAP *with* attention (the code has CNN_SAP without attention and only a TAP variant with it);
  `attention=None` is the code's CNN_TAP (and CNN_SAP with the sensor mean; pooling straight into
  the head); several encoder layers via `num_layers` (the code's num_layers, default 1); inputs
  of any T >= 16 and S (the code fixes 180 x 30). The official module-level `feature_extractor_small` is one
  object shared by every model built in a process (its LOSO loop reuses the conv weights of the
  previous fold); here each model owns a freshly initialised stack.
- Not here: the official training (Adam lr 1e-3, batch 40, class-weighted cross-entropy,
  leave-one-subject-out over EmoPain's 30 subjects) is the harness's business; EmoPain itself is
  access-restricted (attnlab.tasks.uea uses UEA sets instead).

Heads: the token width is set by the data, so `num_heads` must divide it (S for TAP, T' for SAP);
the error names the width and its divisors.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_finite
from attnlab.registry import create

CHANNELS = (2, 4, 8, 16)          # official conv widths
POOLINGS = ("tap", "sap")
MIN_LENGTH = 16                   # shortest T for which T' = ((T - 4) // 2 - 4) // 2 >= 1


def pooled_length(length: int) -> int:
    """T' after the conv stack: two valid 3-tall convs, a (2, 1) pool, two more, a pool."""
    return ((length - 4) // 2 - 4) // 2


class LSFANConvStack(nn.Module):
    """Official `feature_extractor_small`: (B, 1, T, S) -> (B, 16, T', S)."""

    def __init__(self, channels: Sequence[int] = CHANNELS, *, in_channels: int = 1, bias: bool = True):
        super().__init__()
        if len(channels) != 4 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"LSFANConvStack: channels must be 4 positive ints (official (2, 4, 8, 16)), got {channels!r}")
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, c, (3, 3), padding=(0, 1), bias=bias), nn.BatchNorm2d(c), nn.ReLU()]
            if i in (1, 3):                                   # after convs 2 and 4
                layers.append(nn.MaxPool2d((2, 1), (2, 1)))
            width = c
        # The same indices as the official nn.Sequential (0 conv, 1 BN, 2 ReLU, ..., 6 pool, ..., 13 pool),
        # so a released state dict's FrameFeatureExtractor.* keys load into features.*.
        self.features = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)                               # (B, C, T', S)


def oriented_pool(features: Tensor, pooling: str) -> Tensor:
    """(B, C, T', S) -> TAP: mean over time (B, C, S); SAP: mean over sensors (B, C, T')."""
    if pooling == "tap":
        return features.mean(dim=2)                           # (B, C, S)
    if pooling == "sap":
        return features.mean(dim=3)                           # (B, C, T')
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _mechanism(attention: Any) -> tuple[str, dict]:
    if isinstance(attention, str) and attention:
        return attention, {}
    if isinstance(attention, dict) and isinstance(attention.get("name"), str):
        options = dict(attention)
        return options.pop("name"), options
    raise TypeError(f"attention must be a mechanism name, a dict {{'name': ..., **options}} or None, got {attention!r}")


class LSFANEncoderLayer(nn.Module):
    """Post-norm encoder layer as torch's nn.TransformerEncoderLayer(norm_first=False, activation=relu),
    with a registered mechanism as its self-attention. x (B, N, C) -> (B, N, C).

    For "mhsa" the official nn.MultiheadAttention settings are the defaults (qkv_bias=True,
    attn_drop=dropout); other mechanisms get only the options given.
    """

    def __init__(self, dim: int, num_heads: int, *, attention: Any = "mhsa", dim_feedforward: int | None = None,
                 dropout: float = 0.2, layer_norm_eps: float = 1e-5):
        super().__init__()
        name, options = _mechanism(attention)
        if name == "mhsa":
            options = {"qkv_bias": True, "attn_drop": dropout, **options}
        dim_feedforward = dim if dim_feedforward is None else dim_feedforward
        if not isinstance(dim_feedforward, int) or isinstance(dim_feedforward, bool) or dim_feedforward < 1:
            raise ValueError(f"LSFANEncoderLayer: dim_feedforward must be a positive int, got {dim_feedforward!r}")
        self.mechanism = name
        self.attn = create(name, dim, num_heads, **options)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.attn(x)))                                   # (B, N, C)
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class LSFAN(nn.Module):
    """x (B, T, S) (or the official (B, 1, T, S)) -> logits (B, num_classes).

    length, sensors: T and S of the input (the paper's 180 frames x 30 sensors); they fix the token
    width (S for TAP, T' for SAP) and so the head's size. attention: a mechanism name, a dict
    {"name": ..., **options}, a list of those (one per encoder layer), or None for no attention.
    """

    def __init__(self, num_classes: int = 2, *, length: int = 180, sensors: int = 30, num_heads: int = 5,
                 pooling: str = "tap", attention: Any = "mhsa", num_layers: int = 1,
                 dim_feedforward: int | None = None, dropout: float = 0.2, channels: Sequence[int] = CHANNELS):
        super().__init__()
        for arg, value, low in (("num_classes", num_classes, 1), ("length", length, MIN_LENGTH),
                                ("sensors", sensors, 1), ("num_heads", num_heads, 1), ("num_layers", num_layers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                extra = (f" (the conv stack needs T >= {MIN_LENGTH}: two valid 3-tall convs, a pool, two more, a pool)"
                         if arg == "length" else "")
                raise ValueError(f"LSFAN: {arg} must be an int >= {low}{extra}, got {value!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"LSFAN: pooling must be one of {POOLINGS}, got {pooling!r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"LSFAN: dropout must be a number in [0, 1), got {dropout!r}")
        self.num_classes, self.length, self.sensors, self.pooling = num_classes, length, sensors, pooling
        self.stack = LSFANConvStack(channels)
        self.tokens = self.stack.out_channels                                      # 16 channel tokens
        self.width = sensors if pooling == "tap" else pooled_length(length)       # token width
        if attention is None:
            self.encoder = nn.ModuleList()
        else:
            per_layer = list(attention) if isinstance(attention, (list, tuple)) else [attention] * num_layers
            if isinstance(attention, (list, tuple)) and len(per_layer) != num_layers and num_layers != 1:
                raise ValueError(f"LSFAN: {len(per_layer)} attention entries for num_layers={num_layers}")
            if not per_layer:
                raise ValueError("LSFAN: attention list is empty; use attention=None for no attention")
            if self.width % num_heads:
                what = "sensors S (TAP)" if pooling == "tap" else f"pooled time T' = {self.width} of T = {length} (SAP)"
                divisors = [d for d in range(1, self.width + 1) if self.width % d == 0]
                raise ValueError(f"LSFAN: num_heads={num_heads} does not divide the token width {self.width}, the "
                                 f"{what}; choose one of {divisors}")
            self.encoder = nn.ModuleList(
                LSFANEncoderLayer(self.width, num_heads, attention=a, dim_feedforward=dim_feedforward, dropout=dropout)
                for a in per_layer)
        self.head = nn.Linear(self.tokens * self.width, num_classes)

    @property
    def attention(self) -> bool:
        return len(self.encoder) > 0

    def features(self, x: Tensor) -> Tensor:
        """The encoder's output tokens (B, 16, width) (the pooled tokens when there is no attention)."""
        if x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]                                                            # (B, T, S)
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.length, self.sensors):
            raise ValueError(f"LSFAN: expected x (B, T, S) = (B, {self.length}, {self.sensors}) or (B, 1, T, S), "
                             f"got {tuple(x.shape)}")
        check_finite("LSFAN", x)
        maps = self.stack(x.unsqueeze(1))                                          # (B, 16, T', S)
        tokens = oriented_pool(maps, self.pooling)                                 # (B, 16, width)
        for layer in self.encoder:
            tokens = layer(tokens)                                                 # (B, 16, width)
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))                              # (B, 16 * width) -> (B, classes)

    def extra_repr(self) -> str:
        return (f"length={self.length}, sensors={self.sensors}, pooling={self.pooling!r}, tokens={self.tokens}, "
                f"width={self.width}")

    @classmethod
    def from_official(cls, state_dict: dict[str, Tensor], **options) -> "LSFAN":
        """An LSFAN holding a released CNN_TAP_Att (or CNN_TAP / CNN_SAP, with attention=None) state dict.

        Key map: FrameFeatureExtractor.i.* -> stack.features.i.*; encoder.layers.l.self_attn.in_proj_* ->
        encoder.l.attn.qkv.* (fused [q; k; v], heads in order: mhsa's layout); self_attn.out_proj.* ->
        attn.proj.*; linear1/linear2/norm1/norm2 keep their names; Classifier.1.* -> head.*.
        `options` are LSFAN's (the defaults are the paper's: 2 classes, 180 x 30, TAP, 5 heads).
        """
        model = cls(**options)
        renamed = {}
        for key, value in state_dict.items():
            new = key
            if key.startswith("FrameFeatureExtractor."):
                new = "stack.features." + key[len("FrameFeatureExtractor."):]
            elif key.startswith("encoder.layers."):
                rest = key[len("encoder.layers."):]
                layer, _, name = rest.partition(".")
                name = (name.replace("self_attn.in_proj_", "attn.qkv.").replace("self_attn.out_proj.", "attn.proj."))
                new = f"encoder.{layer}.{name}"
            elif key.startswith("Classifier.1."):
                new = "head." + key[len("Classifier.1."):]
            elif key.startswith("encoderlayer."):
                continue                     # the template layer nn.TransformerEncoder deep-copies; unused
            renamed[new] = value
        model.load_state_dict(renamed)
        return model


__all__ = ["LSFAN", "LSFANConvStack", "LSFANEncoderLayer", "oriented_pool", "pooled_length", "POOLINGS"]
