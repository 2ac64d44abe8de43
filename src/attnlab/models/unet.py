"""A plain U-Net (no attention), the baseline of the MSGA claim.

Paper: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015). Status: the standard encoder-decoder with skip connections, ours at
small scale: `depth` levels of (conv3x3 -> BatchNorm -> ReLU) x 2 (padded, so the output has the
input's size; the paper's convs are unpadded), maxpool 2 down, ConvTranspose 2x2 up, the skip
concatenated, a 1 x 1 conv to the classes. Widths base * 2^level. BatchNorm is a later addition,
not in the paper; it is here because the networks it is compared with use it.

    model = UNet(in_channels=1, num_classes=3, base=24, depth=4)
    logits = model(images)              # (B, 1, H, W) -> (B, 3, H, W), H and W divisible by 2^(depth-1)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_finite


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class UNet(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, num_classes, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, base: int = 16, depth: int = 4):
        super().__init__()
        for name, v, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2), ("base", base, 1),
                             ("depth", depth, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"UNet: {name} must be an int >= {low}, got {v!r}")
        self.in_channels, self.depth = in_channels, depth
        widths = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth - 1))
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in range(depth - 1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        m = 2 ** (self.depth - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"UNet: expected (B, {self.in_channels}, H, W) with H, W divisible by {m}, "
                             f"got {tuple(x.shape)}")
        check_finite("UNet", x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))                 # (B, base 2^i, H / 2^i, W / 2^i)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth - 1)):
            x = self.up[i](x)                                        # (B, base 2^i, H / 2^i, W / 2^i)
            x = self.merge[i](torch.cat((skips.pop(), x), 1))        # (B, base 2^i, H / 2^i, W / 2^i)
        return self.head(x)


__all__ = ["UNet"]
