"""Large Kernel Attention (`lka`) and the VAN attention layer around it (`van`).

Paper: Visual Attention Network (Meng-Hao Guo, Cheng-Ze Lu, Zheng-Ning Liu, Ming-Ming Cheng,
Shi-Min Hu; Computational Visual Media 2023, arXiv 2202.09741).

LKA replaces self-attention by a decomposed large-kernel convolution whose output is used as an
attention map that multiplies the input (paper Eqs. (1)-(2)):

    Attention = Conv1x1(DW-D-Conv(DW-Conv(F))),    Output = Attention ⊗ F

A K x K convolution with dilation d is decomposed into a (2d - 1) x (2d - 1) depth-wise
convolution, a ceil(K / d) x ceil(K / d) depth-wise convolution with dilation d, and a 1 x 1
convolution (paper Sec. 3.2). The official setting K = 21, d = 3 gives a 5 x 5 DW conv (padding
2), a 7 x 7 DW conv with dilation 3 (padding 9) and a 1 x 1 conv: receptive field 23 x 23.
`van` is the VAN block's attention layer (official `Attention`): 1 x 1 conv, GELU, LKA, 1 x 1
conv and an inner shortcut, out = proj_2(LKA(GELU(proj_1(x)))) + x.

Status: official-code, Visual-Attention-Network/VAN-Classification `models/van.py::LKA` and
`::Attention` (an earlier version of that file names them `AttentionModule` and
`SpatialAttention`; same computation and parameter names). Every convolution has a bias.
Layout: x (B, H, W, C) channels-last -> (B, H, W, C); the module permutes to NCHW for the
convolutions and back. Any H, W >= 1 (the convolutions zero-pad, so the output has the input's
size). Not supported: causal attention, attn_mask, KV cache (image layers: check_features
refuses them with NotImplementedError).

Parameters (lka): `conv0` DW (C, 1, 2d-1, 2d-1) + bias (C,); `conv_spatial` DW dilated
(C, 1, k', k') + bias (C,), k' = ceil(K / d); `conv1` (C, C, 1, 1) + bias (C,).
van adds `proj_1` and `proj_2`, each (C, C, 1, 1) + bias (C,), and holds the LKA as
`spatial_gating_unit`.

Options: `kernel_size` K and `dilation` d pick the decomposition with the paper's formula
(default K = 21, d = 3, the official one). k' = ceil(K / d) must be odd so that the dilated
conv can pad to the same size ("same" padding d (k' - 1) / 2); e.g. K = 5, d = 2 gives 3 x 3 and
3 x 3 dilation 2 (receptive field 7), K = 9, d = 2 gives 3 x 3 and 5 x 5 dilation 2 (field 11),
K = 13, d = 3 gives 5 x 5 and 5 x 5 dilation 3 (field 17). d = 1 gives a 1 x 1 DW conv (a
per-channel scale) followed by a plain K x K DW conv.
`num_heads` is accepted because every mechanism takes it and is unused: LKA has no heads (its
attention map is per channel).

Deviations / readings chosen:
- Initialisation: the official `Block._init_weights` (which the VAN network applies to every
  conv of its blocks): weights normal(0, sqrt(2 / fan_out)), fan_out = k_h k_w C_out / groups,
  biases zero. The official `LKA` / `Attention` classes alone keep PyTorch's defaults; the
  network's init is used here because it is what the paper trains from.
- `attn_drop` (dropout on the attention map) and `proj_drop` (dropout on the output, for `van`
  after proj_2 and before the shortcut) are not in the official code; both default to 0, which
  is the official computation.
- `van` takes `shortcut=True` (official). `shortcut=False` drops the inner residual, for use in a
  block that adds its own residual (attnlab.models' pre-norm Block computes x + attn(norm(x));
  with the shortcut the block adds norm(x) too, as the official VAN block does: there
  x + layer_scale * Attention(BN(x)) also carries BN(x) through the inner shortcut).
- The official `u = x.clone()` is only a copy of the input; it is not needed here.
- GELU is the exact (erf) GELU, nn.GELU's default, as in the official code.

Checkpoint key map (no permutes needed: convolution weights are kept as nn.Conv2d, NCHW):
- The official VAN checkpoints (van_tiny, van_small, van_base, van_large in van.py's `model_urls`)
  hold, under `state_dict`, per block
  `block{s}.{j}.attn.proj_1.{weight,bias}`, `block{s}.{j}.attn.spatial_gating_unit.conv0.*`,
  `...spatial_gating_unit.conv_spatial.*`, `...spatial_gating_unit.conv1.*`,
  `block{s}.{j}.attn.proj_2.*`: strip the prefix `block{s}.{j}.attn.` and load into `van`
  (`load_state_dict` directly); strip `block{s}.{j}.attn.spatial_gating_unit.` and load into
  `lka`. The block's norms, layer scales and MLP are not part of the attention layer.
- HuggingFace transformers' (deprecated, removed in v5) `VanSpatialAttentionLayer`:
  `pre_projection.conv` -> `proj_1`, `attention_layer.attention.depth_wise` ->
  `spatial_gating_unit.conv0`, `attention_layer.attention.depth_wise_dilated` ->
  `spatial_gating_unit.conv_spatial`, `attention_layer.attention.point_wise` ->
  `spatial_gating_unit.conv1`, `post_projection` -> `proj_2`. The activation has no parameters.
"""
from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_image, check_positive_int
from attnlab.hooks import HookPoint
from attnlab.registry import MechanismSpec, register

PAPER = "Visual Attention Network"
URL = "https://arxiv.org/abs/2202.09741"
SOURCE = "Visual-Attention-Network/VAN-Classification models/van.py"


def decomposition(kernel_size: int, dilation: int, *, name: str = "lka") -> tuple[int, int]:
    """(DW kernel, DW-dilated kernel) of the paper's decomposition: (2d - 1, ceil(K / d)).

    The dilated kernel must be odd ("same" padding); a ValueError says which K, d give one.
    """
    check_positive_int(name, "kernel_size", kernel_size)
    check_positive_int(name, "dilation", dilation)
    dw = 2 * dilation - 1
    dwd = math.ceil(kernel_size / dilation)
    if dwd % 2 == 0:
        raise ValueError(f"{name}: kernel_size={kernel_size}, dilation={dilation} gives a dilated kernel "
                         f"ceil({kernel_size}/{dilation}) = {dwd}, which is even; it must be odd for "
                         f"same-size padding (e.g. kernel_size={(dwd + 1) * dilation} or "
                         f"{(dwd - 1) * dilation if dwd > 1 else dilation})")
    return dw, dwd


def _van_init_(conv: nn.Conv2d) -> None:
    """The official Block._init_weights for a conv: normal(0, sqrt(2 / fan_out)), zero bias."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv_flops(batch: int, pixels: int, dim: int, kernels: tuple[int, ...], pointwise: int) -> int:
    """2 x multiply-adds of depth-wise k x k convs and `pointwise` C x C 1 x 1 convs over N pixels."""
    return 2 * batch * pixels * dim * (sum(k * k for k in kernels) + pointwise * dim)


@register(MechanismSpec(
    name="lka", paper=PAPER, year=2022, family="conv", layout="2d",
    time="O(N C ((2d-1)^2 + ceil(K/d)^2 + C))", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(), url=URL,
    provenance="official-code", source=f"{SOURCE}::LKA (a.k.a. AttentionModule)",
    test_kwargs=dict(), test_configs=(dict(kernel_size=5, dilation=2),)))
class LargeKernelAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): x * Conv1x1(DWConv_dilated(DWConv(x))).

    Hooks (attnlab.hooks): `hook_attn` the attention map (B, C, H, W) before it multiplies the
    input, `hook_out` the product (B, C, H, W). No q, k, v and no softmax (`absent_hooks`).
    """

    hook_names = ("hook_attn", "hook_out")
    eager_hook_names = ()
    absent_hooks = {
        **{n: "LKA has no queries, keys or values: a convolution of the input is the attention map "
              "(hook_attn)" for n in ("hook_q", "hook_k", "hook_v")},
        **{n: "LKA has no softmax: the attention map is the raw output of the 1x1 conv (hook_attn), "
              "multiplying the input" for n in ("hook_scores", "hook_probs")},
    }
    NAME = "lka"

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 kernel_size: int = 21, dilation: int = 3, device=None, dtype=None):
        super().__init__()
        name = self.NAME
        check_positive_int(name, "dim", dim)
        check_positive_int(name, "num_heads", num_heads)
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        dw, dwd = decomposition(kernel_size, dilation, name=name)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.kernel_size, self.dilation = kernel_size, dilation
        self.kernels = (dw, dwd)
        self.conv0 = nn.Conv2d(dim, dim, dw, padding=dilation - 1, groups=dim, **factory)
        self.conv_spatial = nn.Conv2d(dim, dim, dwd, padding=dilation * (dwd - 1) // 2, groups=dim,
                                      dilation=dilation, **factory)
        self.conv1 = nn.Conv2d(dim, dim, 1, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_attn = HookPoint()     # (B, C, H, W), the attention map
        self.hook_out = HookPoint()      # (B, C, H, W), attention map * input
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv0, self.conv_spatial, self.conv1):
            _van_init_(conv)

    def extra_repr(self) -> str:
        dw, dwd = self.kernels
        return (f"dim={self.dim}, kernel_size={self.kernel_size}, dilation={self.dilation} "
                f"(DW {dw}x{dw}, DW-D {dwd}x{dwd} dilation {self.dilation}, 1x1)")

    def attend(self, u: Tensor) -> Tensor:
        """u (B, C, H, W) -> (B, C, H, W): the official LKA.forward on an NCHW tensor."""
        attn = self.conv1(self.conv_spatial(self.conv0(u)))                # (B, C, H, W)
        attn = self.attn_drop(self.hook_attn(attn))
        return self.hook_out(u * attn)                                     # (B, C, H, W)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(self.NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        # Contiguous NCHW: on CPU the depthwise convs' forward+backward ran 1.7x faster than on the
        # channels-last view (lka, 56 x 56 x 64, one thread; attnlab bench --spatial lka).
        out = self.attend(x.permute(0, 3, 1, 2).contiguous())              # (B, C, H, W)
        return self.proj_drop(out.permute(0, 2, 3, 1))                     # (B, H, W, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the convolutions' multiply-adds over N = seq_len = H * W pixels (what
        FlopCounterMode counts; the gating product and the biases, O(N C), are left out).
        Backward: twice the forward."""
        if causal:
            raise NotImplementedError(f"mechanism {self.NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{self.NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        fwd = _conv_flops(batch, seq_len, self.dim, self.kernels, pointwise=1)
        return fwd, 2 * fwd


@register(MechanismSpec(
    name="van", paper=PAPER, year=2022, family="conv", layout="2d",
    time="O(N C ((2d-1)^2 + ceil(K/d)^2 + 3 C))", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(), url=URL,
    provenance="official-code", source=f"{SOURCE}::Attention (a.k.a. SpatialAttention), with ::LKA",
    test_kwargs=dict(), test_configs=(dict(kernel_size=5, dilation=2, shortcut=False),)))
class VANAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): proj_2(LKA(GELU(proj_1(x)))) + x (shortcut=True).

    Hooks: `hook_out` the LKA output (B, C, H, W) before proj_2; the LKA's own `hook_attn` and
    `hook_out` are on `spatial_gating_unit`. No q, k, v and no softmax (`absent_hooks`).
    """

    hook_names = ("hook_out",)
    eager_hook_names = ()
    absent_hooks = {
        **{n: "VAN's attention has no queries, keys or values: the LKA map of the projected input "
              "(spatial_gating_unit.hook_attn) gates it" for n in ("hook_q", "hook_k", "hook_v")},
        **{n: "VAN's attention has no softmax: see spatial_gating_unit.hook_attn for the attention map"
           for n in ("hook_scores", "hook_probs")},
    }
    NAME = "van"

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 kernel_size: int = 21, dilation: int = 3, shortcut: bool = True, device=None, dtype=None):
        super().__init__()
        name = self.NAME
        check_positive_int(name, "dim", dim)
        check_positive_int(name, "num_heads", num_heads)
        check_dropout(name, attn_drop=attn_drop, proj_drop=proj_drop)
        decomposition(kernel_size, dilation, name=name)
        if not isinstance(shortcut, bool):
            raise TypeError(f"{name}: shortcut must be a bool, got {type(shortcut).__name__}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.shortcut = dim, num_heads, shortcut
        self.proj_1 = nn.Conv2d(dim, dim, 1, **factory)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LargeKernelAttention2d(dim, num_heads, attn_drop=attn_drop,
                                                          kernel_size=kernel_size, dilation=dilation,
                                                          **factory)
        self.proj_2 = nn.Conv2d(dim, dim, 1, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_out = HookPoint()      # (B, C, H, W), the LKA output before proj_2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _van_init_(self.proj_1)
        _van_init_(self.proj_2)
        self.spatial_gating_unit.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, shortcut={self.shortcut}"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(self.NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        u = x.permute(0, 3, 1, 2).contiguous()                             # (B, C, H, W), contiguous as in LargeKernelAttention2d
        y = self.activation(self.proj_1(u))                                # (B, C, H, W)
        y = self.hook_out(self.spatial_gating_unit.attend(y))              # (B, C, H, W)
        y = self.proj_drop(self.proj_2(y)).permute(0, 2, 3, 1)             # (B, H, W, C)
        return y + x if self.shortcut else y

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the convolutions' multiply-adds (LKA's and proj_1, proj_2) over N = seq_len
        pixels, as FlopCounterMode counts them; backward twice the forward."""
        if causal:
            raise NotImplementedError(f"mechanism {self.NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{self.NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        fwd = _conv_flops(batch, seq_len, self.dim, self.spatial_gating_unit.kernels, pointwise=3)
        return fwd, 2 * fwd


__all__ = ["LargeKernelAttention2d", "VANAttention2d", "decomposition"]
