"""Coordinate Attention (`coord_attn`).

Paper: Coordinate Attention for Efficient Mobile Network Design (Qibin Hou, Daquan Zhou,
Jiashi Feng; CVPR 2021, arXiv 2103.02907). It is the base of later "coordinate attention"
blocks (e.g. ReJSHand's).

Channel attention that keeps positions: the input is averaged along each spatial axis
(Eqs. (4)-(5)), the two strips share a 1 x 1 conv bottleneck (Eq. (6)), and split into a gate
per row and a gate per column (Eqs. (7)-(9)):

    z^h = mean over W (x)   (C, H),       z^w = mean over H (x)   (C, W)
    f = h_swish(BN(Conv1x1 C -> mip ([z^h, z^w])))              (mip, H + W), mip = max(8, C // r)
    g^h = sigmoid(Conv1x1 mip -> C (f^h)),  g^w = sigmoid(Conv1x1 mip -> C (f^w))
    out[c, i, j] = x[c, i, j] * g^w[c, j] * g^h[c, i]

Status: official-code, houqb/CoordAttention `coordatt.py::CoordAtt` with `oup = inp` (the
gating multiplies the input, so the output width must be the input's); all three convs biased,
h_swish(x) = x ReLU6(x + 3) / 6 (= F.hardswish). timm's `timm/layers/coord_attn.py::CoordAttn`
computes the same with `rd_channels=max(8, C // 32)`, `bias=True` (its defaults differ:
no bias, rd_channels from an SE-like ratio).
Layout: x (B, H, W, C) channels-last -> (B, H, W, C). The strip means are taken channels-last,
the small (B, C, H + W, 1) strip tensor goes through the NCHW convs and BatchNorm, and the gates
multiply the channels-last input directly (the full image is never permuted). Any H, W >= 1.
Not supported: causal attention, attn_mask, KV cache (check_features refuses them).
A pixel's output depends on its whole row and column (through the strip means), so the layer
sees the entire image along both axes.

Parameters: `conv1` (mip, C, 1, 1) + bias (mip,); `bn1` BatchNorm2d(mip); `conv_h` and `conv_w`
(C, mip, 1, 1) + bias (C,). PyTorch's default initialisation, as the official module.
Options: `reduction` (the official r, 32) and `min_channels` (the official floor 8):
mip = max(min_channels, C // reduction). `num_heads` is accepted because every mechanism takes
it and is unused (the gates are per channel).

Deviations: none in the computation. `attn_drop` (dropout on both gates) and `proj_drop`
(dropout on the output) are not in the official code and default to 0. Training-mode BatchNorm
normalises the strips over the batch and the H + W positions (as official); the contract suite
runs in eval mode.

Checkpoint key map: the official keys `conv1.{weight,bias}`, `bn1.{weight,bias,running_mean,
running_var,num_batches_tracked}`, `conv_h.*`, `conv_w.*` load directly (same names, NCHW conv
weights kept as nn.Conv2d; inside a network, strip the module's prefix first).
timm's CoordAttn (bias=True, rd_channels=mip, norm BatchNorm2d, act Hardswish) has the same
keys; with bias=False its checkpoints lack the conv biases (load with those set to zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_image, check_positive_int
from attnlab.hooks import HookPoint
from attnlab.registry import MechanismSpec, register

NAME = "coord_attn"


@register(MechanismSpec(
    name=NAME, paper="Coordinate Attention for Efficient Mobile Network Design", year=2021,
    family="conv", layout="2d", time="O(N C + (H + W) C mip)", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(), url="https://arxiv.org/abs/2103.02907",
    provenance="official-code", source="houqb/CoordAttention coordatt.py::CoordAtt (oup = inp)",
    test_kwargs=dict(), test_configs=(dict(reduction=4, min_channels=2),)))
class CoordinateAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): x times a per-(channel, row) and a per-(channel, column) gate.

    Hooks (attnlab.hooks): `hook_gates_h` (B, C, H, 1) and `hook_gates_w` (B, C, 1, W), the
    sigmoid gates; `hook_out` (B, H, W, C) the output (there is no output projection).
    No q, k, v and no softmax (`absent_hooks`).
    """

    hook_names = ("hook_gates_h", "hook_gates_w", "hook_out")
    eager_hook_names = ()
    absent_hooks = {
        **{n: "coordinate attention has no queries, keys or values: row and column means of the input "
              "give the gates (hook_gates_h, hook_gates_w)" for n in ("hook_q", "hook_k", "hook_v")},
        **{n: "coordinate attention has no softmax: its attention is two sigmoid gates "
              "(hook_gates_h, hook_gates_w)" for n in ("hook_scores", "hook_probs")},
    }

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 reduction: int = 32, min_channels: int = 8, device=None, dtype=None):
        super().__init__()
        check_positive_int(NAME, "dim", dim)
        check_positive_int(NAME, "num_heads", num_heads)
        check_positive_int(NAME, "reduction", reduction)
        check_positive_int(NAME, "min_channels", min_channels)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.reduction, self.min_channels = reduction, min_channels
        self.mip = max(min_channels, dim // reduction)
        self.conv1 = nn.Conv2d(dim, self.mip, 1, **factory)
        self.bn1 = nn.BatchNorm2d(self.mip, **factory)
        self.conv_h = nn.Conv2d(self.mip, dim, 1, **factory)
        self.conv_w = nn.Conv2d(self.mip, dim, 1, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_gates_h = HookPoint()  # (B, C, H, 1), one gate per channel and row
        self.hook_gates_w = HookPoint()  # (B, C, 1, W), one gate per channel and column
        self.hook_out = HookPoint()      # (B, H, W, C), the output

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mip={self.mip} (reduction={self.reduction}, min_channels={self.min_channels})"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        z_h = x.mean(2).transpose(1, 2)                                    # (B, C, H), mean over W
        z_w = x.mean(1).transpose(1, 2)                                    # (B, C, W), mean over H
        z = torch.cat([z_h, z_w], dim=2).unsqueeze(-1)                     # (B, C, H + W, 1)
        f = F.hardswish(self.bn1(self.conv1(z)))                           # (B, mip, H + W, 1)
        f_h, f_w = f.split([H, W], dim=2)                                  # (B, mip, H, 1), (B, mip, W, 1)
        g_h = self.hook_gates_h(self.conv_h(f_h).sigmoid())                # (B, C, H, 1)
        g_w = self.hook_gates_w(self.conv_w(f_w.transpose(2, 3)).sigmoid())  # (B, C, 1, W)
        g_h, g_w = self.attn_drop(g_h), self.attn_drop(g_w)
        # Channels-last gates: (B, C, H, 1) -> (B, H, 1, C), (B, C, 1, W) -> (B, 1, W, C).
        out = x * g_w.permute(0, 2, 3, 1) * g_h.permute(0, 2, 3, 1)        # (B, H, W, C), official order
        return self.proj_drop(self.hook_out(out))

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the three 1 x 1 convolutions' multiply-adds on the strips of an s x s image
        (s = sqrt(seq_len): conv1 on H + W positions, conv_h on H, conv_w on W), what
        FlopCounterMode counts; the strip means and the gating (O(N C)) are left out, and they are
        most of this layer's work. Backward: twice the forward."""
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        side = round(seq_len ** 0.5)
        if side * side != seq_len:
            raise ValueError(f"{NAME}: useful_flops needs seq_len = H * W of a square image, got {seq_len}")
        fwd = 2 * batch * (2 * side) * self.dim * self.mip * 2                # conv1 + (conv_h, conv_w)
        return fwd, 2 * fwd


__all__ = ["CoordinateAttention2d"]
