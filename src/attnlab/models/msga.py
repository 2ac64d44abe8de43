"""Multi-scale self-guided attention for segmentation (MS-Dual-Guided, `MSGA`).

Paper: Sinha & Dolz, "Multi-scale self-guided attention for medical image segmentation" (IEEE JBHI
2020, arXiv 1906.02849). Official code: github.com/sinAshish/Multi-Scale-Attention (read, not
copied): `src/models/my_stacked_danet.py::DAF_stack` (the network), `src/models/attention.py`
(PAM_Module, CAM_Module, PAM_CAM_Layer, semanticModule, MultiConv) and the loss in `src/main.py`.

What is the code's (structure and formulas, re-written here in channels-first PyTorch):

- Multi-scale features F_s (s = 1..4, the four backbone stages) each go through a 1 x 1 conv ->
  BatchNorm -> PReLU to `dim` channels (the code: 64) and are bilinearly resized to the first
  stage's resolution (`down1..down4`). Their concatenation is fused by `MultiConv(4 dim, dim)`
  (conv 3x3 -> BN -> PReLU -> conv 3x3 -> BN -> PReLU -> conv 1x1 -> BN -> PReLU; `fuse1`): F_MS.
- Guided step 1, per scale s, on x_s = cat(F_s, F_MS) (2 dim channels):
      A_s = conv1x1_s( (PAMLayer_s(x_s) + CAMLayer_s(x_s)) * conv3x3_s(rec_s) ),
      (e_s, rec_s) = SemanticModule(x_s)       (ONE semantic module shared by the four scales)
  where PAMLayer/CAMLayer (the code's PAM_CAM_Layer) = conv 3x3 (2 dim -> dim) -> BN -> PReLU ->
  attention -> conv 3x3 -> BN -> PReLU, conv3x3_s the code's conv_sem (2 dim -> dim) and conv1x1_s
  its conv8 (dim -> dim). The semantic module is a 2-level encoder-decoder: enc1 = (conv3x3 ->
  BN -> ReLU) x 2 to 2c channels + maxpool 2, enc2 the same to 4c; dec2 = (conv3x3 -> BN -> ReLU)
  x 2 to 2c + ConvTranspose 2x2 stride 2 (2c), resized (bilinear) to enc1's size, dec1 = (conv3x3
  -> BN -> ReLU) x 2 to c + ConvTranspose to c; it returns e_s = enc2 (the code flattens it with
  `view(-1)`) and the reconstruction rec_s = dec1 of its input (c = 2 dim channels).
- Guided step 2: the same on x'_s = cat(F_s, A_s * F_MS), with its own PAM/CAM layers, convs and
  its own shared semantic module, giving R_s.
- Predictions: a 1 x 1 conv per scale on F_s (step 1: `predict1..4` read the down-projected
  features, not A_s) and on R_s (step 2: `predict1_2..4_2`), each bilinearly resized to the input.
  In eval mode the code returns the mean of the four step-2 predictions; that is `final` here.
- The loss (src/main.py): sum over the 8 outputs of CE, + 0.25 * sum_s MSE(e_s step 1, e_s step 2)
  (the two steps' encodings of the same scale), + 0.1 * sum over the 8 semantic calls of
  MSE(input x, reconstruction) (`msga_loss`; no detach on either side, as the code).
- The attention itself: DANet's PAM and CAM, attnlab's registered `danet_pam` and `danet_cam`
  (gamma initialised to 0, the official modules), built by name so that any registered 2-D
  (channels-last) mechanism can take their place: `position="danet_pam", channel="danet_cam"`.

Not kept from the code: `conv6_*`, `conv7_*`, `attention1..4`, `refine1..4` (MultiConv) and
`softmax_1` are built in DAF_stack's constructor but never used by its forward; they are left out.
The code hard-codes `nn.BatchNorm2d(64)` inside MultiConv (only right at 64 channels); here it
follows `dim`.

What is ours: the backbone. The code uses an ImageNet ResNeXt-101 (layer1..4, strides 4..32);
here a small CNN trained from scratch (`Backbone`): a stem conv 3x3 (stride `stem_stride`, default
2) -> BN -> ReLU, then 4 stages of conv 3x3 (stride 2) -> BN -> ReLU -> conv 3x3 -> BN -> ReLU,
`widths` channels (default dim * (1, 2, 4, 8)), so the stages run at 1/4 .. 1/32 of the input and
the fused map at 1/4, as the code's (stem_stride=1: 1/2, for small images). The fused map's sides
are the first stage's rounded down to a multiple of 4 (the semantic module pools twice); the
bilinear resizes take care of the rest, so any input of at least 16 stem_stride pixels works.
The code's backbone weights, its ImageNet pretraining, and its dropout (Dropout2d in unused
layers) are not reproduced.

The ablation `guided=False`: the same backbone, projections, fusion and the eight predictions, with
every PAM/CAM layer and semantic module removed; the step-1 attention map A_s and the step-2 output
R_s are replaced by a conv block of the PAM layer's shape without the attention, x_s -> conv 3x3 ->
BN -> PReLU -> conv 3x3 -> BN -> PReLU (and step 2's input uses A_s * F_MS as before). It has fewer
parameters (no semantic modules); `parameter_count` tells.

    model = MSGA(in_channels=1, num_classes=3, dim=16)
    out = model(images)                  # (B, 1, H, W) -> MSGAOutput
    out.final                            # (B, 3, H, W): mean of the four step-2 predictions
    loss, parts = msga_loss(out, labels) # labels (B, H, W) int64
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_finite
from attnlab.registry import create, get_spec

SCALES = 4
SEMANTIC_WEIGHT, RECONSTRUCTION_WEIGHT = 0.25, 0.1     # src/main.py: 0.25 * lossSemantic, 0.1 * lossRec


def _check_int(name: str, value, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"MSGA: {name} must be an int >= {low}, got {value!r}")
    return value


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, act: str = "prelu") -> list[nn.Module]:
    """conv (kernel, 'same' padding) -> BatchNorm2d -> PReLU (one slope, as nn.PReLU()) or ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.BatchNorm2d(out_channels),
            nn.PReLU() if act == "prelu" else nn.ReLU()]


class MultiConv(nn.Module):
    """The code's MultiConv(in, out, attn=False): (conv3x3 -> BN -> PReLU) x 2 -> conv1x1 -> BN -> PReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(in_channels, out_channels), *conv_bn(out_channels, out_channels),
                                  *conv_bn(out_channels, out_channels, kernel=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class EncoderBlock(nn.Sequential):
    """(conv3x3 -> BN -> ReLU) x 2 -> maxpool 2 (the code's _EncoderBlock, no dropout)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*conv_bn(in_channels, out_channels, act="relu"),
                         *conv_bn(out_channels, out_channels, act="relu"), nn.MaxPool2d(2, 2))


class DecoderBlock(nn.Sequential):
    """(conv3x3 -> BN -> ReLU) x 2 to `middle` -> ConvTranspose2d 2x2 stride 2 (the code's _DecoderBlock)."""

    def __init__(self, in_channels: int, middle: int, out_channels: int):
        super().__init__(*conv_bn(in_channels, middle, act="relu"), *conv_bn(middle, middle, act="relu"),
                         nn.ConvTranspose2d(middle, out_channels, kernel_size=2, stride=2))


class SemanticModule(nn.Module):
    """The code's semanticModule(c): x (B, c, H, W) -> (encoding (B, 4c, H/4, W/4), reconstruction (B, c, H, W)).

    H and W must be divisible by 4 (two 2x poolings and two 2x transposed convolutions). The code
    returns the encoding flattened over the batch (`enc2.view(-1)`); it is kept 4-D here (MSE is the
    same either way)."""

    def __init__(self, channels: int):
        super().__init__()
        c = _check_int("semantic channels", channels)
        self.channels = c
        self.enc1 = EncoderBlock(c, 2 * c)
        self.enc2 = EncoderBlock(2 * c, 4 * c)
        self.dec2 = DecoderBlock(4 * c, 2 * c, 2 * c)
        self.dec1 = DecoderBlock(2 * c, c, c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"SemanticModule: expected (B, {self.channels}, H, W) with H, W divisible by 4, "
                             f"got {tuple(x.shape)}")
        enc1 = self.enc1(x)                                                 # (B, 2c, H/2, W/2)
        enc2 = self.enc2(enc1)                                              # (B, 4c, H/4, W/4)
        dec2 = self.dec2(enc2)                                              # (B, 2c, H/2, W/2)
        dec2 = F.interpolate(dec2, size=enc1.shape[2:], mode="bilinear", align_corners=False)
        return enc2, self.dec1(dec2)                                        # (B, c, H, W)


class ChannelsLast(nn.Module):
    """Runs a registered mechanism on NCHW maps: a 2-D one on (B, H, W, C), a sequence one on the
    N = H W pixels in row-major order (B, N, C); both return the input's shape."""

    def __init__(self, mechanism: nn.Module, layout: str):
        super().__init__()
        self.mechanism, self.layout = mechanism, layout

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        y = x.permute(0, 2, 3, 1)                                           # (B, H, W, C)
        if self.layout == "seq":
            y = self.mechanism(y.reshape(B, H * W, C)).reshape(B, H, W, C)   # (B, N, C) -> (B, H, W, C)
        else:
            y = self.mechanism(y)                                           # (B, H, W, C)
        return y.permute(0, 3, 1, 2)                                        # (B, C, H, W)


class AttentionLayer(nn.Module):
    """The code's PAM_CAM_Layer: conv3x3 (2 dim -> dim) -> BN -> PReLU -> attention -> conv3x3 -> BN -> PReLU.

    `mechanism` is a registered 2-D mechanism name (e.g. "danet_pam", "danet_cam"), a sequence one
    (run over the H W pixels, e.g. "mhsa"), or None (no attention: the guided=False ablation's block)."""

    def __init__(self, dim: int, num_heads: int, mechanism: str | None, options: dict | None = None):
        super().__init__()
        self.mechanism_name = mechanism
        if mechanism is None:
            attention: nn.Module = nn.Identity()
        else:
            spec = get_spec(mechanism)
            if spec.layout not in ("2d", "seq"):
                raise ValueError(f"MSGA: the attention must be a 2-D (channels-last) or sequence mechanism, "
                                 f"{mechanism!r} has layout {spec.layout!r}")
            attention = ChannelsLast(create(mechanism, dim, num_heads, **(options or {})), spec.layout)
        self.body = nn.Sequential(*conv_bn(2 * dim, dim), attention, *conv_bn(dim, dim))

    @property
    def attention(self) -> nn.Module:
        return self.body[3]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class GuidedStep(nn.Module):
    """One guided attention step over the four scales, with one semantic module shared by them.

    forward(inputs) with inputs a list of (B, 2 dim, h, w) maps -> (outputs [(B, dim, h, w)] per scale,
    encodings, reconstructions): out_s = conv1x1_s((PAM_s(x_s) + CAM_s(x_s)) * conv3x3_s(rec_s)).
    With guided=False: out_s = block_s(x_s) (no attention, no semantic module; encodings and
    reconstructions are empty lists)."""

    def __init__(self, dim: int, num_heads: int, *, guided: bool = True, position: str = "danet_pam",
                 channel: str = "danet_cam", position_options: dict | None = None,
                 channel_options: dict | None = None):
        super().__init__()
        self.guided = guided
        if guided:
            self.pam = nn.ModuleList(AttentionLayer(dim, num_heads, position, position_options) for _ in range(SCALES))
            self.cam = nn.ModuleList(AttentionLayer(dim, num_heads, channel, channel_options) for _ in range(SCALES))
            self.semantic = SemanticModule(2 * dim)
            self.conv_sem = nn.ModuleList(nn.Conv2d(2 * dim, dim, 3, padding=1) for _ in range(SCALES))
            self.conv_out = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(SCALES))
        else:
            self.block = nn.ModuleList(AttentionLayer(dim, num_heads, None) for _ in range(SCALES))

    def forward(self, inputs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        outs, encodings, reconstructions = [], [], []
        for s, x in enumerate(inputs):
            if not self.guided:
                outs.append(self.block[s](x))                               # (B, dim, h, w)
                continue
            encoding, rec = self.semantic(x)                                # (B, 8 dim, h/4, w/4), (B, 2 dim, h, w)
            attended = self.pam[s](x) + self.cam[s](x)                      # (B, dim, h, w)
            outs.append(self.conv_out[s](attended * self.conv_sem[s](rec)))  # (B, dim, h, w)
            encodings.append(encoding)
            reconstructions.append(rec)
        return outs, encodings, reconstructions


class Backbone(nn.Module):
    """Ours (the code: ResNeXt-101): a stem conv3x3 (stride `stem_stride`) -> BN -> ReLU, then 4 stages of
    conv3x3 (stride 2) -> BN -> ReLU -> conv3x3 -> BN -> ReLU.

    x (B, in_channels, H, W) -> [(B, widths[s], H / (stem_stride 2^(s+1)), ...)] for s = 0..3 (ceil sizes):
    with the default stem_stride=2 the stages run at 1/4 .. 1/32, as ResNeXt's layer1..4."""

    def __init__(self, in_channels: int, widths: Sequence[int], stem_stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c = [], widths[0]
        for w in widths:
            stages.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                        *conv_bn(w, w, act="relu")))
            c = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)                                                    # (B, widths[0], H / stem, W / stem)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


@dataclass
class MSGAOutput:
    """Everything the loss needs. Predictions are logits (B, K, H, W) at the input size.

    step1: the four per-scale predictions from the projected features F_s (the code's predict1..4);
    step2: the four from the second guided step (predict1_2..4_2); final: mean of step2 (eval output).
    inputs1/2: the semantic modules' inputs per scale, encodings1/2 and reconstructions1/2 their
    outputs (empty lists with guided=False)."""

    step1: list[Tensor]
    step2: list[Tensor]
    final: Tensor
    inputs1: list[Tensor] = field(default_factory=list)
    inputs2: list[Tensor] = field(default_factory=list)
    encodings1: list[Tensor] = field(default_factory=list)
    encodings2: list[Tensor] = field(default_factory=list)
    reconstructions1: list[Tensor] = field(default_factory=list)
    reconstructions2: list[Tensor] = field(default_factory=list)


class MSGA(nn.Module):
    """Multi-scale self-guided attention network: images (B, in_channels, H, W) -> MSGAOutput.

    dim: the common width of every scale (the code: 64). num_heads: passed to the mechanisms (DANet's
    ignore it). position / channel: registered 2-D mechanism names (default DANet's PAM and CAM).
    guided=False: the ablation without attention and semantic modules (see the module docstring).
    widths: the backbone's stage widths (default dim * (1, 2, 4, 8)).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, dim: int = 16, num_heads: int = 1, *,
                 guided: bool = True, position: str = "danet_pam", channel: str = "danet_cam",
                 position_options: dict | None = None, channel_options: dict | None = None,
                 widths: Sequence[int] | None = None, stem_stride: int = 2):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes, 2)
        _check_int("dim", dim, 8)
        _check_int("num_heads", num_heads)
        if not isinstance(guided, bool):
            raise TypeError(f"MSGA: guided must be a bool, got {guided!r}")
        widths = tuple(dim * m for m in (1, 2, 4, 8)) if widths is None else tuple(widths)
        if len(widths) != SCALES:
            raise ValueError(f"MSGA: widths must name {SCALES} stage widths, got {widths!r}")
        for w in widths:
            _check_int("each of widths", w)
        self.in_channels, self.num_classes, self.dim, self.guided = in_channels, num_classes, dim, guided
        if stem_stride not in (1, 2):
            raise ValueError(f"MSGA: stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = stem_stride
        self.backbone = Backbone(in_channels, widths, stem_stride)
        self.down = nn.ModuleList(nn.Sequential(*conv_bn(w, dim, kernel=1)) for w in widths)
        self.fuse = MultiConv(SCALES * dim, dim)
        kw = dict(guided=guided, position=position, channel=channel, position_options=position_options,
                  channel_options=channel_options)
        self.step1 = GuidedStep(dim, num_heads, **kw)
        self.step2 = GuidedStep(dim, num_heads, **kw)
        self.predict1 = nn.ModuleList(nn.Conv2d(dim, num_classes, 1) for _ in range(SCALES))
        self.predict2 = nn.ModuleList(nn.Conv2d(dim, num_classes, 1) for _ in range(SCALES))

    def forward(self, x: Tensor) -> MSGAOutput:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSGA: expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        low = 16 * self.stem_stride
        if x.shape[2] < low or x.shape[3] < low:
            raise ValueError(f"MSGA: images must be at least {low} x {low} with stem_stride={self.stem_stride} (the "
                             f"fused map goes through two 2x poolings), got {tuple(x.shape[2:])}")
        check_finite("MSGA", x)
        size = x.shape[2:]
        features = self.backbone(x)                                         # [(B, w_s, H/2^(s+1), W/2^(s+1))]
        # The fused map's size: the first stage's, rounded down to a multiple of 4 (the semantic module).
        h, w = features[0].shape[2] // 4 * 4, features[0].shape[3] // 4 * 4
        down = [F.interpolate(p(f), size=(h, w), mode="bilinear", align_corners=False)
                for p, f in zip(self.down, features)]                       # [(B, dim, h, w)] x 4
        fused = self.fuse(torch.cat(down, 1))                               # (B, dim, h, w): F_MS
        inputs1 = [torch.cat((d, fused), 1) for d in down]                  # [(B, 2 dim, h, w)]
        attn1, enc1, rec1 = self.step1(inputs1)
        inputs2 = [torch.cat((d, a * fused), 1) for d, a in zip(down, attn1)]
        refined, enc2, rec2 = self.step2(inputs2)

        def up(logits: Tensor) -> Tensor:
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

        step1 = [up(p(d)) for p, d in zip(self.predict1, down)]             # [(B, K, H, W)]
        step2 = [up(p(r)) for p, r in zip(self.predict2, refined)]          # [(B, K, H, W)]
        final = torch.stack(step2).mean(0)                                  # (B, K, H, W)
        if not self.guided:
            inputs1, inputs2 = [], []
        return MSGAOutput(step1, step2, final, inputs1, inputs2, enc1, enc2, rec1, rec2)


def msga_loss(out: MSGAOutput, labels: Tensor, *, semantic_weight: float = SEMANTIC_WEIGHT,
              reconstruction_weight: float = RECONSTRUCTION_WEIGHT) -> tuple[Tensor, dict[str, Tensor]]:
    """The code's loss: sum_k CE(pred_k) over the 8 predictions + 0.25 sum_s MSE(enc1_s, enc2_s)
    + 0.1 sum over the 8 semantic calls MSE(input, reconstruction). labels (B, H, W) int64.

    Returns (loss, {"ce", "semantic", "reconstruction"}) (unweighted sums)."""
    if labels.dim() != 3 or labels.shape != out.final.shape[:1] + out.final.shape[2:]:
        raise ValueError(f"msga_loss: labels must be (B, H, W) = {tuple(out.final.shape[:1] + out.final.shape[2:])}, "
                         f"got {tuple(labels.shape)}")
    ce = sum(F.cross_entropy(p, labels) for p in out.step1 + out.step2)
    zero = out.final.new_zeros(())
    semantic = sum((F.mse_loss(a, b) for a, b in zip(out.encodings1, out.encodings2)), zero)
    reconstruction = sum((F.mse_loss(x, r) for x, r in zip(out.inputs1 + out.inputs2,
                                                           out.reconstructions1 + out.reconstructions2)), zero)
    loss = ce + semantic_weight * semantic + reconstruction_weight * reconstruction
    return loss, {"ce": ce, "semantic": semantic, "reconstruction": reconstruction}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MSGA", "MSGAOutput", "GuidedStep", "SemanticModule", "AttentionLayer", "Backbone", "MultiConv",
           "msga_loss", "parameter_count", "SEMANTIC_WEIGHT", "RECONSTRUCTION_WEIGHT"]
