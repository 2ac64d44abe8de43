"""MEDUSA as a classifier: a residual CNN whose stages are gated by one shared self-attention body.

Paper: Aboutalebi, Pavlova, Gunraj, Shafiee, Sabri, Alaref & Wong, "MEDUSA: Multi-scale
Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image Analysis"
(arXiv 2110.06063, 2021; Frontiers in Medicine 8:821120, 2022). Official code: none; only a
TensorFlow checkpoint (COVID-Net CXR-3, lindawangg/COVID-Net docs/models.md) was released, and
only the abstract could be read here.
Status: a reconstruction. The paper's point, from its abstract: instead of "multiple isolated
lightweight attention mechanisms" placed at several points of a network, ONE self-attention
body of higher capacity, computed once, whose heads feed the different scales of the backbone
("single body, multi-scale heads"). That body is attnlab's `medusa` mechanism
(`attnlab.mechanisms.medusa.MedusaGate`; read its docstring for what is guessed in it). What
this file adds, all ours:

- The backbone: a small ResNet (He et al. 2016) for 28 x 28 grey images: a 3 x 3 stem
  (conv-BN-ReLU, `stem_width` channels) and one basic residual block per stage (conv3x3-BN-ReLU-
  conv3x3-BN + shortcut, 1 x 1 conv-BN where the shape changes, then ReLU), `widths`
  (16, 32, 64) with strides (1, 2, 2): 28 -> 28 -> 14 -> 7; global average pooling and a linear
  classifier. COVID-Net CXR-3's own backbone is a much larger CNN on 480 x 480 X-rays.
- Where the body reads and where the gates act: the body reads the stem's output (the image's
  first features, once per image); its head s gates stage s's output, X_s <- X_s * sigmoid(A_s)
  (the `residual=True` option: X_s (1 + sigmoid(A_s))), before stage s + 1 runs.
- `placement="isolated"`: the ablation the paper argues against: one separate `medusa` module
  per stage, each with its own body reading that stage's own output (the registered one-scale
  `medusa`, i.e. stage-local attention), same body width; `placement=None`: no attention at all
  (the bare backbone). The three differ only in the gates; parameter counts are in
  `parameter_count()` and the claim states them.
- The body's attention by name (`attention=`): "medusa" is MedusaGate's built-in MHSA; any other
  registered mechanism of layout "seq" (over the (H/p)(W/p) body tokens) or "2d" (over the token
  grid) is built with `attnlab.create(name, body_dim, num_heads)` and swapped in.

    net = MedusaNet(10)                       # shared body, built-in attention
    logits = net(images)                      # (B, 28, 28) or (B, 28, 28, 1) -> (B, 10)
    MedusaNet(10, placement=None)             # the same backbone without attention
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_finite
from attnlab.mechanisms.medusa import MedusaGate
from attnlab.registry import create, get_spec

PLACEMENTS = ("shared", "isolated", None)


class BasicBlock(nn.Module):
    """ResNet basic block, NCHW: relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_chans))

    def forward(self, x: Tensor) -> Tensor:                                 # (B, C_in, H, W)
        y = torch.relu(self.bn1(self.conv1(x)))                             # (B, C_out, H/s, W/s)
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))                             # (B, C_out, H/s, W/s)


def _body_attention(name: str, body_dim: int, num_heads: int) -> tuple[nn.Module | None, str]:
    """(module, layout) for the body's attention; "medusa" = MedusaGate's built-in MHSA (None)."""
    if name == "medusa":
        return None, "seq"
    spec = get_spec(name)
    if spec.layout not in ("seq", "2d"):
        raise ValueError(f"medusa_net: the body's attention must be a 'seq' or '2d' mechanism, "
                         f"got {name!r} (layout {spec.layout!r})")
    return create(name, body_dim, num_heads), spec.layout


class MedusaNet(nn.Module):
    """Image classifier: ResNet stages gated by MEDUSA (one shared body, one head per stage).

    forward(images): (B, H, W) or (B, H, W, in_chans) float, channels-last -> logits (B, classes).
    Every stage's spatial size must be known up front (`image_size`), since the isolated
    ablation's per-stage bodies need sizes divisible by their stride (2 where the stage's side is
    even, else 1).
    """

    def __init__(self, num_classes: int, *, in_chans: int = 1, image_size: int = 28, stem_width: int = 16,
                 widths: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (1, 2, 2),
                 placement: str | None = "shared", attention: str = "medusa", body_dim: int = 64,
                 num_heads: int = 4, body_stride: int = 2, residual: bool = False, dropout: float = 0.0):
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("in_chans", in_chans), ("image_size", image_size),
                           ("stem_width", stem_width), ("body_dim", body_dim), ("num_heads", num_heads),
                           ("body_stride", body_stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"medusa_net: {arg} must be a positive int, got {value!r}")
        widths, strides = tuple(widths), tuple(strides)
        if not widths or len(widths) != len(strides):
            raise ValueError(f"medusa_net: widths and strides must be non-empty and of equal length, "
                             f"got widths={widths}, strides={strides}")
        if placement not in PLACEMENTS:
            raise ValueError(f"medusa_net: placement must be one of {PLACEMENTS}, got {placement!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"medusa_net: dropout must be in [0, 1), got {dropout!r}")
        if image_size % body_stride:
            raise ValueError(f"medusa_net: image_size={image_size} must be a multiple of body_stride={body_stride}")
        self.num_classes, self.in_chans, self.image_size = num_classes, in_chans, image_size
        self.placement, self.attention_name = placement, attention
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU())
        chans, sides, side = [stem_width, *widths], [], image_size
        self.stages = nn.ModuleList()
        for i, (c, s) in enumerate(zip(widths, strides)):
            self.stages.append(BasicBlock(chans[i], c, s))
            side = (side - 1) // s + 1                                      # conv3x3, padding 1, stride s
            sides.append(side)
        self.sides = tuple(sides)
        self.gate = None
        self.gates = None
        if placement == "shared":
            module, layout = _body_attention(attention, body_dim, num_heads)
            self.gate = MedusaGate(stem_width, widths, num_heads, body_dim=body_dim, stride=body_stride,
                                   residual=residual, attention=module, attention_layout=layout)
        elif placement == "isolated":
            gates = []
            for c, side in zip(widths, sides):
                module, layout = _body_attention(attention, body_dim, num_heads)
                gates.append(MedusaGate(c, (c,), num_heads, body_dim=body_dim, stride=2 if side % 2 == 0 else 1,
                                        residual=residual, attention=module, attention_layout=layout))
            self.gates = nn.ModuleList(gates)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, attention={self.attention_name!r}, sides={self.sides}"

    def parameter_count(self) -> dict[str, int]:
        """Parameters of the whole net and of its attention (the gates) alone."""
        gates = [m for m in (self.gate, self.gates) if m is not None]
        attention = sum(p.numel() for m in gates for p in m.parameters())
        return {"total": sum(p.numel() for p in self.parameters()), "attention": attention}

    def features(self, images: Tensor) -> list[Tensor]:
        """Each stage's (gated) output, channels-last: [(B, H_s, W_s, C_s)]."""
        given = tuple(images.shape)
        if images.dim() == 3 and self.in_chans == 1:
            images = images.unsqueeze(-1)                                   # (B, H, W, 1)
        if images.dim() != 4 or images.shape[-1] != self.in_chans or images.shape[1:3] != (self.image_size,) * 2:
            side = self.image_size
            raise ValueError(f"medusa_net: expected images (B, {side}, {side}, {self.in_chans}) channels-last"
                             f"{f' or (B, {side}, {side})' if self.in_chans == 1 else ''}, got {given}")
        if not images.is_floating_point():
            raise TypeError(f"medusa_net: expected floating point images, got {images.dtype}")
        check_finite("medusa_net", images, what="images")
        x = self.stem(images.permute(0, 3, 1, 2))                           # (B, C0, H, W)
        t = None
        if self.gate is not None:
            t = self.gate.body(x.permute(0, 2, 3, 1))                       # (B, H/p, W/p, D): once per image
        outs = []
        for s, stage in enumerate(self.stages):
            x = stage(x)                                                    # (B, C_s, H_s, W_s)
            if self.placement is not None:
                f = x.permute(0, 2, 3, 1)                                   # (B, H_s, W_s, C_s)
                f = self.gate.gate_scale(t, f, s) if t is not None else self.gates[s].gate([f])[0]
                x = f.permute(0, 3, 1, 2)                                   # (B, C_s, H_s, W_s)
            outs.append(x.permute(0, 2, 3, 1))
        return outs

    def forward(self, images: Tensor) -> Tensor:
        x = self.features(images)[-1]                                       # (B, H_S, W_S, C_S)
        return self.head(self.drop(x.mean(dim=(1, 2))))                     # (B, classes)


__all__ = ["MedusaNet", "BasicBlock", "PLACEMENTS"]
