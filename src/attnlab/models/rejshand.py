"""ReJSHand's feature-interaction block (FeatureChatBlock) in a 2-D -> 3-D hand-keypoint lifter.

Paper: An, Dai, Ansari, Liang, Zeng, Tsintotas, Fu & Zhang, "ReJSHand: Efficient Real-Time Hand Pose
Estimation and Mesh Reconstruction Using Refined Joint and Skeleton Features" (arXiv 2503.05995, 2025).
Official code: github.com/daishipeng/ReJSHand, `models/modules.py::FeatureChatBlock` and `MeshHead`
(read, not copied). Status: the block is the official code's computation; the lifter around it is ours.

What is the code's (`FeatureChatBlock`, with its attention created by name so any registered sequence
mechanism can stand in for the official one):

    s   = x                                       x: (B, J, C) joint tokens
    h   = Conv1d(C, C, kernel 1)(x)               the code's "SemanticGraphCNN": a 1 x 1 convolution over the
                                                  joint axis, i.e. a per-token Linear with bias; it mixes
                                                  channels, never joints (no graph, no adjacency)
    h   = MHSA_8 heads(h) + s                     q, k, v and out projections all Linear with bias, softmax
                                                  (q k^T / sqrt(d)), no dropout, NO LayerNorm anywhere
    h   = Linear(C, C)(h)
    out = ReLU(h + s)

so the residual of both sums is the block's *input* `s` (not the convolution's output), the attention reads
the convolution's output, and there is no normalisation. attnlab's `mhsa` with `qkv_bias=True` is exactly the
official `MultiHeadSelfAttention` (one fused biased qkv Linear instead of three; same function), and is the
default here (`DEFAULT_ATTENTION_OPTIONS`). The official block hard-codes 8 heads; `num_heads=8` is the default.

How the code uses it (`MeshHead`, not reproduced): image features of a FastViT-MA36 backbone, upsampled by a
stride-4 transposed convolution (256 channels) plus sine positions, are sampled at the 21 predicted 2-D keypoints
(grid_sample) -> 21 tokens of 256 + a learned position embedding (trunc-normal, std 0.02) -> Linear ->
FeatureChatBlock(256) -> a Linear over the token axis 21 -> 84 tokens -> Linear to 128 -> FeatureChatBlock(128) ->
84 -> 336 tokens -> Linear to 64 -> FeatureChatBlock(64) -> 336 -> 778 tokens -> Linear(64, 3) per token: the
778 MANO vertices; the 21 joints are MANO's J_regressor applied to them plus 5 fingertip vertices. So the code
stacks three blocks, one per stage (token dims 256 / 128 / 64), and its regression head is per vertex. Losses: L1
on the 2-D keypoints (weight 1), 3-D joints (10) and vertices (10).

Coordinate attention: the paper's abstract names "a coordinate attention layer" beside the multi-head
self-attention in the feature-interaction part; the released code has none (no coordinate attention anywhere in
the repository), and the paper text that could be read here (the abstract and summaries of it) does not say
exactly where it sits. Coordinate attention (Hou et al. 2021; attnlab's registered `coord_attn`) is a 2-D
mechanism: it averages a (B, H, W, C) map along each axis and gates every channel per row and per column. On
image features (where a coordinate attention layer is normally placed) it cannot go here: this lifter has no
image. Twenty-one tokens in a line have no rows and columns, but a hand's do: the 20 non-wrist joints form a
5 x 4 grid (finger x joint level: MCP/CMC, PIP, DIP, tip in the FreiHAND order), so ours (`coord_attn=True`,
`FingerGridCoordAttention`) applies `coord_attn` to that grid (H = finger, W = level); the wrist token passes
ungated. The row gate is then per finger, the column gate per joint level, each from means over the other axis:
it mixes joints (through the means), which the 1 x 1 convolution does not. Where: after the convolution, before
the attention (our choice). It is an option, off by default; it is not the paper's layer.

What is ours: the lifter `ReJSHandLifter` (2-D keypoints (B, 21, 3) = (u, v, visible) -> a Linear embedding to
`dim` + a learned position embedding (trunc-normal std 0.02, as the code's) -> `len(layers)` FeatureChatBlocks at
a fixed 21 tokens and width -> Linear(dim, 3) per joint, root-relative 3-D joints in the task's units). The code's
Linear after the position embedding is folded into the embedding (two Linears in a row). No mesh, no token
upsampling, no image features. The ablations (`FeatureChatBlock` options): `attention=None` (no attention: the
MHSA term is dropped, h = conv(x) + s), `conv=False` (the 1 x 1 convolution is the identity), `skip=False` (both
`+ s` are dropped: out = ReLU(fc(attn(conv(x))))). `MLPLifter` is the baseline: the 63 numbers flattened ->
Linear -> `depth` residual [Linear, ReLU] blocks -> Linear to 63 (after Martinez et al. 2017's "simple yet
effective baseline", without its BatchNorm and dropout), its width solved to match a lifter's parameters
(`mlp_width_for`).

    model = ReJSHandLifter(dim=64, num_heads=8, layers=["mhsa"] * 3)
    joints = model(keypoints)                       # (B, 21, 3) (u, v, visible) -> (B, 21, 3)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.registry import create, get_spec
from attnlab.models.transformer import parse_layer

NUM_JOINTS = 21
# The official MultiHeadSelfAttention: biased q, k, v (and out) projections.
DEFAULT_ATTENTION_OPTIONS = {"mhsa": {"qkv_bias": True}}
# FreiHAND / MANO order: 0 wrist, then thumb 1-4, index 5-8, middle 9-12, ring 13-16, pinky 17-20.
FINGER_GRID = (5, 4)


def _check_bool(what: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return value


class FingerGridCoordAttention(nn.Module):
    """Coordinate attention on the 5 x 4 finger grid of 21 hand-joint tokens (ours; see the module docstring).

    x (B, 21, C) -> (B, 21, C): tokens 1..20 as (B, 5 fingers, 4 levels, C) through the registered 2-D
    mechanism `mechanism` (default `coord_attn`), token 0 (the wrist) unchanged.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mechanism: str = "coord_attn", **options: Any):
        super().__init__()
        spec = get_spec(mechanism)
        if spec.layout != "2d":
            raise ValueError(f"FingerGridCoordAttention needs a 2-D mechanism (layout '2d'), {mechanism!r} has "
                             f"layout {spec.layout!r}")
        self.mechanism = mechanism
        self.attn = create(mechanism, dim, num_heads, **options)

    def forward(self, x: Tensor) -> Tensor:
        B, J, C = x.shape
        if J != NUM_JOINTS:
            raise ValueError(f"FingerGridCoordAttention: expected {NUM_JOINTS} joint tokens (B, 21, C), got "
                             f"shape {tuple(x.shape)}")
        H, W = FINGER_GRID
        grid = x[:, 1:].reshape(B, H, W, C)                                # (B, 5, 4, C): finger x level
        grid = self.attn(grid)                                             # (B, 5, 4, C)
        return torch.cat([x[:, :1], grid.reshape(B, H * W, C)], dim=1)     # (B, 21, C)


class FeatureChatBlock(nn.Module):
    """ReJSHand's FeatureChatBlock: x (B, J, C) -> (B, J, C) (see the module docstring for the formula).

    attention: a registered sequence mechanism (name, dict with "name", or (name, options)), default "mhsa"
               (with qkv_bias=True, the official projections); None drops the attention term (ablation).
    conv:      False replaces the 1 x 1 convolution by the identity (ablation).
    skip:      False drops both residual sums with the block input (ablation).
    coord_attn: True gates the convolution's output with coordinate attention on the finger grid (ours; needs
               J = 21); a dict passes options to `FingerGridCoordAttention` (e.g. reduction, min_channels).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, attention: Any = "mhsa", conv: bool = True,
                 skip: bool = True, coord_attn: bool | dict = False):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"FeatureChatBlock: dim must be a positive int, got {dim!r}")
        self.dim, self.num_heads = dim, num_heads
        self.use_conv, self.skip = _check_bool("FeatureChatBlock conv", conv), _check_bool("FeatureChatBlock skip", skip)
        # The code's SemanticGraphCNN: Conv1d(C, C, 1) on (B, C, J); kept as a Conv1d so its weights load as is.
        self.conv = nn.Conv1d(dim, dim, kernel_size=1) if conv else None
        if coord_attn is True or isinstance(coord_attn, dict):
            self.coord = FingerGridCoordAttention(dim, num_heads, **(coord_attn if isinstance(coord_attn, dict) else {}))
        elif coord_attn is False:
            self.coord = None
        else:
            raise TypeError(f"FeatureChatBlock: coord_attn must be a bool or a dict of options, got {coord_attn!r}")
        self.mechanism = None
        self.attn = None
        if attention is not None:
            name, options = parse_layer(attention)
            spec = get_spec(name)
            if spec.layout != "seq":
                raise ValueError(f"FeatureChatBlock: attention must be a sequence mechanism (layout 'seq'), {name!r} "
                                 f"has layout {spec.layout!r} (2-D ones go through coord_attn=)")
            options = {**DEFAULT_ATTENTION_OPTIONS.get(name, {}), **options}
            self.mechanism = name
            self.attn = create(name, dim, num_heads, **options)
        self.fc = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, attention={self.mechanism!r}, conv={self.use_conv}, "
                f"skip={self.skip}, coord_attn={self.coord is not None}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"FeatureChatBlock: expected joint tokens (B, J, {self.dim}), got shape {tuple(x.shape)}")
        s = x                                                              # (B, J, C): the "skeleton features"
        h = x
        if self.conv is not None:
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)               # (B, C, J) -> conv -> (B, J, C)
        if self.coord is not None:
            h = self.coord(h)                                              # (B, J, C), ours
        if self.attn is not None:
            h = self.attn(h)                                               # (B, J, C)
        if self.skip:
            h = h + s                                                      # "simplified interaction"
        h = self.fc(h)                                                     # (B, J, C)
        if self.skip:
            h = h + s                                                      # the residual connection
        return F.relu(h)


class ReJSHandLifter(nn.Module):
    """2-D hand keypoints -> root-relative 3-D joints: embed -> FeatureChatBlocks -> per-joint Linear head.

    x (B, J, in_dim) (the task's (u, v, visible)) -> (B, J, out_dim). `layers`: one entry per block, a
    mechanism (see FeatureChatBlock's `attention`) or None (a block without attention); an int n means
    ["mhsa"] * n. conv / skip / coord_attn go to every block.
    """

    def __init__(self, dim: int = 64, num_heads: int = 8, layers: int | Sequence[Any] = 3, *,
                 num_joints: int = NUM_JOINTS, in_dim: int = 3, out_dim: int = 3, conv: bool = True,
                 skip: bool = True, coord_attn: bool | dict = False, pos_std: float = 0.02):
        super().__init__()
        if isinstance(layers, int) and not isinstance(layers, bool):
            if layers < 1:
                raise ValueError(f"ReJSHandLifter: layers must be a positive int or a list, got {layers}")
            layers = ["mhsa"] * layers
        if isinstance(layers, (str, dict)) or not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError(f"ReJSHandLifter: layers must be a positive int or a non-empty list of mechanisms "
                            f"(None = no attention), got {layers!r}")
        for what, v in (("num_joints", num_joints), ("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ReJSHandLifter: {what} must be a positive int, got {v!r}")
        if coord_attn is not False and num_joints != NUM_JOINTS:
            raise ValueError(f"ReJSHandLifter: coord_attn needs the {NUM_JOINTS}-joint hand (its 5 x 4 finger grid), "
                             f"got num_joints={num_joints}")
        self.dim, self.num_joints, self.in_dim, self.out_dim = dim, num_joints, in_dim, out_dim
        self.embed = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_joints, dim))
        nn.init.trunc_normal_(self.pos, std=pos_std)
        self.blocks = nn.ModuleList(FeatureChatBlock(dim, num_heads, attention=layer, conv=conv, skip=skip,
                                                     coord_attn=coord_attn) for layer in layers)
        self.head = nn.Linear(dim, out_dim)

    @property
    def layer_names(self) -> list[str | None]:
        return [b.mechanism for b in self.blocks]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.num_joints, self.in_dim):
            raise ValueError(f"ReJSHandLifter: expected keypoints (B, {self.num_joints}, {self.in_dim}), got shape "
                             f"{tuple(x.shape)}")
        h = self.embed(x) + self.pos                                       # (B, J, C)
        for block in self.blocks:
            h = block(h)                                                   # (B, J, C)
        return self.head(h)                                                # (B, J, out_dim)


class MLPLifter(nn.Module):
    """The baseline: x (B, J, in_dim) flattened -> Linear -> depth x residual [Linear, ReLU] -> Linear -> (B, J, out_dim)."""

    def __init__(self, hidden: int = 256, depth: int = 2, *, num_joints: int = NUM_JOINTS, in_dim: int = 3,
                 out_dim: int = 3):
        super().__init__()
        for what, v in (("hidden", hidden), ("num_joints", num_joints), ("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MLPLifter: {what} must be a positive int, got {v!r}")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"MLPLifter: depth must be a non-negative int, got {depth!r}")
        self.num_joints, self.in_dim, self.out_dim = num_joints, in_dim, out_dim
        self.inp = nn.Linear(num_joints * in_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, num_joints * out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.num_joints, self.in_dim):
            raise ValueError(f"MLPLifter: expected keypoints (B, {self.num_joints}, {self.in_dim}), got shape "
                             f"{tuple(x.shape)}")
        B = x.shape[0]
        h = F.relu(self.inp(x.reshape(B, -1)))                             # (B, J * in_dim) -> (B, hidden)
        for layer in self.hidden:
            h = h + F.relu(layer(h))                                       # (B, hidden)
        return self.out(h).reshape(B, self.num_joints, self.out_dim)       # (B, J * out_dim) -> (B, J, out_dim)


def mlp_params(hidden: int, depth: int, *, num_joints: int = NUM_JOINTS, in_dim: int = 3, out_dim: int = 3) -> int:
    """MLPLifter's parameter count."""
    return (num_joints * in_dim + 1) * hidden + depth * (hidden + 1) * hidden + (hidden + 1) * num_joints * out_dim


def mlp_width_for(params: int, depth: int = 2, **kwargs) -> int:
    """The MLPLifter width whose parameter count is closest to `params`."""
    if not isinstance(params, int) or params < 1:
        raise ValueError(f"mlp_width_for: params must be a positive int, got {params!r}")
    a = depth
    b = (kwargs.get("num_joints", NUM_JOINTS) * (kwargs.get("in_dim", 3) + kwargs.get("out_dim", 3)) + 1 + depth)
    c = kwargs.get("num_joints", NUM_JOINTS) * kwargs.get("out_dim", 3) - params
    # params = depth h^2 + (J (in + out) + 1 + depth) h + J out: the positive root of a h^2 + b h + c = 0.
    guess = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    lo = max(1, int(guess) - 2)
    return min(range(lo, lo + 5), key=lambda h: abs(mlp_params(h, depth, **kwargs) - params))


__all__ = ["FeatureChatBlock", "FingerGridCoordAttention", "ReJSHandLifter", "MLPLifter", "mlp_params",
           "mlp_width_for", "NUM_JOINTS", "FINGER_GRID", "DEFAULT_ATTENTION_OPTIONS"]
