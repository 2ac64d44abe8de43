"""HTR-JAND: a gated-convolution + SE line encoder, attention over its columns, a CTC head.

Paper: Hamdan, Rahiche & Cheriet, "HTR-JAND: Handwritten Text Recognition with Joint Attention
Network and Knowledge Distillation" (arXiv 2412.18524, Dec 2024). Official code: announced at
github.com/DocumentRecognitionModels/HTR-JAND, a dead link; only the abstract could be read.
Status: reconstruction. What the abstract names, and where each piece here comes from:

- "FullGatedConv2d layers": Flor et al.'s gated convolution (HTR-Flor, SIBGRAPI 2020; their
  repository arthurflor23/handwritten-text-recognition, `FullGatedConv2D` in src/network/layers.py):
  one convolution with 2F output channels split in two halves, out = h_1 * sigmoid(h_2) (after
  Dauphin et al.'s gated linear unit). `FullGatedConv2d` below is that block (the code's; our
  PyTorch, NCHW: the first F channels are the linear half, the last F the gate, as in Flor's code).
  Flor's code also puts a max-norm constraint (4) on some of these kernels; not done here.
- "Squeeze-and-Excitation blocks": Hu et al. (CVPR 2018): s = sigmoid(W_2 relu(W_1 avgpool(x)) ),
  x * s per channel, with biases (`SqueezeExcitation`, reduction r = 4 by default). Where HTR-JAND
  puts it is not known; ours: after the gated convolution of every stage.
- The stage, `GatedStage`: Flor's ordering Conv2d -> PReLU (one slope per channel) -> BatchNorm ->
  FullGatedConv2d (3 x 3), then our SE and optional dropout. Flor's encoder has six such convs
  (16, 32, 40, 48, 56, 64 channels) with (2, 4)-strided ones; the default stages here take four of
  those widths (16, 32, 48, 64; fewer convolutions, to fit CPU budgets) and strides that bring the
  line's height to one row and its width down 4x (`default_stages`).
  Flor's BatchNorm uses renormalisation (Keras `renorm=True`); ours is plain BatchNorm2d.
- "a Combined Attention mechanism fusing Multi-Head Self-Attention with Proxima Attention":
  attnlab's registered `combined` mechanism (attnlab.mechanisms.proxima, itself a reconstruction;
  read its docstring). Here it is chosen by name like any other sequence mechanism: each layer of
  `layers` is a mechanism name (default "combined"; "mhsa" etc. swap in) or None, a block without
  attention (the MLP only: the "no attention" ablation keeps every other weight).
- A CTC head: Linear(dim, num_classes + 1) per column, blank = index 0 (Graves et al. 2006).
  Flor's decoder (two BiGRUs) is not used: HTR-JAND's abstract names attention for the sequence.

Ours, where the abstract is silent: the column sequence is the encoder's output (B, C, H', W')
read as W' tokens of C * H' features, projected to `dim` and layer-normed, plus fixed sinusoidal positions
(`positions="sinusoidal"`; "none" leaves them out: the proximity prior of `proxima` needs none,
plain mhsa would see a bag of columns), then pre-norm blocks (attnlab's `Block`), a final
LayerNorm and the head. `width` multiplies every stage's channels, so a student with about half
a teacher's parameters is the same network at smaller `width` and `dim` (the paper: 0.75M vs
1.5M, a 48% cut; how its student was shrunk is not known).

Decoding and metrics (ours): `greedy_decode` (best path: argmax per frame, merge repeats, drop
blanks), `edit_distance` (Levenshtein), `error_rates` -> CER (character edits / reference
characters) and WER (the same over whitespace-separated words), both summed over the batch.

    model = HTRJAND(num_classes=30, dim=96, num_heads=4, layers=["combined"] * 2, in_height=32)
    logits = model(images)                          # (B, 1, 32, W) -> (B, W / 4, 31)
    strings = greedy_decode(logits)                 # lists of class ids (1..30)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_finite
from attnlab.models.transformer import Block, Mlp

BLANK = 0
# The claim's teacher and student: the student has about half the teacher's parameters (0.48x with
# two `combined` layers on 32-px lines; the paper's student: 0.75M vs 1.5M, 0.52x).
PRESETS = {"teacher": dict(dim=128, num_heads=4, width=1.0), "student": dict(dim=88, num_heads=4, width=0.7)}
# Channels per stage (four of Flor's six widths); `default_stages` adds the strides.
DEFAULT_CHANNELS = (16, 32, 48, 64)


def default_stages(in_height: int) -> tuple[tuple[int, tuple[int, int]], ...]:
    """(channels, (stride_h, stride_w)) per stage for lines `in_height` px high (a multiple of 8):
    the height falls 2, 2, 2 and in_height / 8 times (to 1 row), the width 4 times (stages 1-2)."""
    if not isinstance(in_height, int) or in_height < 8 or in_height % 8:
        raise ValueError(f"HTRJAND: the default stages need in_height a multiple of 8, got {in_height!r}; "
                         "pass stages=[(channels, (stride_h, stride_w)), ...] for other heights")
    strides = ((2, 2), (2, 2), (2, 1), (in_height // 8, 1))
    return tuple(zip(DEFAULT_CHANNELS, strides))


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or any(not isinstance(a, int) or isinstance(a, bool) or a < 1 for a in v)):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return int(v[0]), int(v[1])


class FullGatedConv2d(nn.Module):
    """Flor et al.'s full gated convolution: conv to 2F channels, h[:F] * sigmoid(h[F:]).

    x (B, C_in, H, W) -> (B, F, H', W') with F = out_channels; "same" padding for odd kernels at
    stride 1 (padding = kernel // 2), as in Flor's Keras layer (padding="same").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3, *,
                 stride: int | Sequence[int] = 1, bias: bool = True):
        super().__init__()
        if not (isinstance(in_channels, int) and in_channels > 0 and isinstance(out_channels, int)
                and out_channels > 0):
            raise ValueError(f"FullGatedConv2d: channels must be positive ints, got in_channels={in_channels!r}, "
                             f"out_channels={out_channels!r}")
        kernel, stride = _pair(kernel_size, "FullGatedConv2d kernel_size"), _pair(stride, "FullGatedConv2d stride")
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, kernel, stride=stride,
                              padding=(kernel[0] // 2, kernel[1] // 2), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)                                                   # (B, 2F, H', W')
        linear, gate = h[:, :self.out_channels], h[:, self.out_channels:]  # (B, F, H', W') each
        return linear * torch.sigmoid(gate)


class SqueezeExcitation(nn.Module):
    """Hu et al.'s SE block: x * sigmoid(W_2 relu(W_1 mean_hw(x) + b_1) + b_2), per channel.

    x (B, C, H, W) -> (B, C, H, W); hidden width max(1, C // reduction).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SqueezeExcitation: channels must be a positive int, got {channels!r}")
        if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
            raise ValueError(f"SqueezeExcitation: reduction must be a positive int, got {reduction!r}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3))                                             # (B, C): squeeze
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))                  # (B, C): excitation
        return x * s[:, :, None, None]                                     # (B, C, H, W)


class GatedStage(nn.Module):
    """Conv2d (stride s) -> PReLU -> BatchNorm2d -> FullGatedConv2d 3x3 -> SE -> dropout.

    The first conv is 3 x 3 with padding 1 along a dimension of stride 1 or 2 and a
    non-overlapping s x s window (no padding) along a stride above 2, like Flor's (2, 4) convs.
    """

    def __init__(self, in_channels: int, channels: int, stride: tuple[int, int] = (1, 1), *,
                 se_reduction: int = 4, drop: float = 0.0):
        super().__init__()
        stride = _pair(stride, "GatedStage stride")
        kernel = tuple(3 if s <= 2 else s for s in stride)
        padding = tuple(1 if s <= 2 else 0 for s in stride)
        self.stride, self.kernel, self.padding = stride, kernel, padding
        self.conv = nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=padding)
        self.act = nn.PReLU(channels)
        self.norm = nn.BatchNorm2d(channels)
        self.gated = FullGatedConv2d(channels, channels, 3)
        self.se = SqueezeExcitation(channels, se_reduction) if se_reduction else nn.Identity()
        self.drop = nn.Dropout(drop)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple((n + 2 * p - k) // s + 1 for n, p, k, s in
                     zip((height, width), self.padding, self.kernel, self.stride))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.act(self.conv(x)))                              # (B, C, H / s_h, W / s_w)
        return self.drop(self.se(self.gated(x)))


class FeedForwardBlock(nn.Module):
    """A block without attention: x + mlp(norm(x)); what an attention layer of None becomes."""

    mechanism = None

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))


def sinusoidal_positions(n: int, dim: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(n, dim) Vaswani et al.'s fixed encoding: sin on even channels, cos on odd, 10000^(-2i/dim)."""
    pos = torch.arange(n, dtype=torch.float64, device=device)[:, None]               # (n, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    out = torch.zeros(n, dim, dtype=torch.float64, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out.to(dtype)


def scaled_channels(channels: int, width: float) -> int:
    """A stage's channels times `width`, rounded to a multiple of 4 (at least 4)."""
    return max(4, int(round(channels * width / 4)) * 4)


class HTRJAND(nn.Module):
    """Text-line recogniser: gated conv + SE stages -> column tokens -> attention blocks -> CTC logits.

    images (B, 1, in_height, W) -> logits (B, T, num_classes + 1), T = the encoder's output width
    (W / 4 with the default stages); class 0 is the CTC blank, 1..num_classes the characters.
    layers: one entry per block, a mechanism name / layer dict (attnlab.models.transformer.parse_layer)
    or None (no attention in that block); an int n means n x "combined".
    """

    def __init__(self, num_classes: int, dim: int = 96, num_heads: int = 4,
                 layers: int | Sequence[Any] = 2, *, in_height: int = 32, in_channels: int = 1,
                 width: float = 1.0, stages: Sequence[tuple[int, Sequence[int]]] | None = None,
                 se_reduction: int = 4, conv_drop: float = 0.0, mlp_ratio: float = 2.0, drop: float = 0.0,
                 act: str = "gelu", positions: str = "sinusoidal", mechanism_options: dict | None = None):
        super().__init__()
        for arg, v in (("num_classes", num_classes), ("dim", dim), ("num_heads", num_heads),
                       ("in_height", in_height), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HTRJAND: {arg} must be a positive int, got {v!r}")
        if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
            raise ValueError(f"HTRJAND: width must be a positive number, got {width!r}")
        if positions not in ("sinusoidal", "none"):
            raise ValueError(f"HTRJAND: positions must be 'sinusoidal' or 'none', got {positions!r}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["combined"] * layers
        if isinstance(layers, (str, dict)) or not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"HTRJAND: layers must be a non-empty list of mechanism names or None, got {layers!r}")
        stages = default_stages(in_height) if stages is None else stages
        if not stages:
            raise ValueError("HTRJAND: stages must list at least one (channels, stride) pair")
        self.num_classes, self.dim, self.in_height, self.in_channels = num_classes, dim, in_height, in_channels
        self.width, self.positions = float(width), positions
        blocks, c_in, height = [], in_channels, in_height
        for i, stage in enumerate(stages):
            if not (isinstance(stage, (tuple, list)) and len(stage) == 2):
                raise ValueError(f"HTRJAND: stage {i} must be (channels, stride), got {stage!r}")
            c_out = scaled_channels(int(stage[0]), width)
            blocks.append(GatedStage(c_in, c_out, _pair(stage[1], f"stage {i} stride"), se_reduction=se_reduction,
                                     drop=conv_drop if i >= 2 else 0.0))     # Flor: dropout from the third gated conv on
            height, _ = blocks[-1].out_size(height, 8)
            if height < 1:
                raise ValueError(f"HTRJAND: in_height={in_height} is too small for the stages' strides "
                                 f"(height {height} after stage {i})")
            c_in = c_out
        self.encoder = nn.Sequential(*blocks)
        self.out_height, self.features = height, c_in * height
        self.project = nn.Linear(self.features, dim)
        self.project_norm = nn.LayerNorm(dim)    # unit-scale column features beside the unit-scale positions
        self.layer_names = []
        body = []
        for layer in layers:
            if layer is None:
                body.append(FeedForwardBlock(dim, mlp_ratio, act=act, drop=drop))
                self.layer_names.append(None)
            else:
                body.append(Block(dim, num_heads, mechanism=layer, mechanism_options=mechanism_options,
                                  mlp_ratio=mlp_ratio, act=act, drop=drop))
                self.layer_names.append(body[-1].mechanism)
        self.blocks = nn.ModuleList(body)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes + 1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, in_height={self.in_height}, width={self.width:g}, "
                f"layers={self.layer_names}")

    def frames(self, width: int) -> int:
        """T, the number of output columns for an input `width` pixels wide."""
        w = width
        for stage in self.encoder:
            _, w = stage.out_size(self.in_height, w)
        return w

    def encode(self, images: Tensor) -> Tensor:
        """images (B, C_in, in_height, W) -> column tokens (B, T, dim) after the attention blocks."""
        if images.dim() != 4 or images.shape[1] != self.in_channels or images.shape[2] != self.in_height:
            raise ValueError(f"HTRJAND expects images (B, {self.in_channels}, {self.in_height}, W), "
                             f"got {tuple(images.shape)}")
        check_finite("HTRJAND", images, what="images")
        x = self.encoder(images)                                           # (B, C, H', T)
        B, C, H, T = x.shape
        x = x.permute(0, 3, 1, 2).reshape(B, T, C * H)                     # (B, T, C * H'): one token per column
        x = self.project_norm(self.project(x))                             # (B, T, dim)
        if self.positions == "sinusoidal":
            x = x + sinusoidal_positions(T, self.dim, dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x = block(x)                                                   # (B, T, dim)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encode(images))                              # (B, T, num_classes + 1)


# --- decoding and error rates ------------------------------------------------------------------------

def greedy_decode(logits: Tensor, *, blank: int = BLANK) -> list[list[int]]:
    """Best-path CTC decoding: per sequence, argmax per frame, merge repeats, drop blanks.

    logits (B, T, K) (or log-probabilities) -> B lists of class ids.
    """
    if logits.dim() != 3:
        raise ValueError(f"greedy_decode expects logits (B, T, K), got {tuple(logits.shape)}")
    best = logits.argmax(-1).tolist()                                      # (B, T)
    out = []
    for row in best:
        seq, prev = [], None
        for k in row:
            if k != prev and k != blank:
                seq.append(k)
            prev = k
        out.append(seq)
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def error_rates(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """CER and WER over a batch: total edits / total reference characters (words), plus the counts.

    Words are the whitespace-separated pieces. An empty reference set gives rates of 0 when the
    predictions are empty too, else the edits themselves (each edit over a denominator of 1).
    """
    if len(predictions) != len(references):
        raise ValueError(f"error_rates: {len(predictions)} predictions for {len(references)} references")
    char_edits = sum(edit_distance(p, r) for p, r in zip(predictions, references))
    chars = sum(len(r) for r in references)
    word_edits = sum(edit_distance(p.split(), r.split()) for p, r in zip(predictions, references))
    words = sum(len(r.split()) for r in references)
    return {"cer": char_edits / max(chars, 1), "wer": word_edits / max(words, 1),
            "char_edits": char_edits, "chars": chars, "word_edits": word_edits, "words": words}


def ctc_loss(logits: Tensor, targets: Tensor, target_lengths: Tensor, *, blank: int = BLANK) -> Tensor:
    """Mean CTC loss per target character (torch's reduction="mean"), every sequence using all T frames.

    logits (B, T, K), targets (B, L) padded (entries past target_lengths ignored), target_lengths (B,).
    Computed in float32; infeasible alignments (T too short) give 0 instead of inf.
    """
    B, T, _ = logits.shape
    log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)         # (T, B, K)
    input_lengths = torch.full((B,), T, dtype=torch.long, device=logits.device)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank, reduction="mean",
                      zero_infinity=True)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Mean over frames of KL(softmax(z_t / tau) || softmax(z_s / tau)), in float32 (not yet times tau^2)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    log_p_s = F.log_softmax(student_logits.float() / tau, -1)             # (B, T, K)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)                     # (B, T)
    return kl.mean()


__all__ = ["HTRJAND", "PRESETS", "FullGatedConv2d", "SqueezeExcitation", "GatedStage", "FeedForwardBlock", "DEFAULT_CHANNELS", "default_stages",
           "BLANK", "greedy_decode", "edit_distance", "error_rates", "ctc_loss", "distillation_kl",
           "sinusoidal_positions", "scaled_channels"]
