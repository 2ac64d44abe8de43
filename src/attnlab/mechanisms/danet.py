"""DANet's position and channel attention modules (`danet_pam`, `danet_cam`).

Paper: Dual Attention Network for Scene Segmentation (Fu, Liu, Tian, Li, Bao, Fang, Lu; CVPR 2019,
arXiv 1809.02983). The two modules, as the authors released them (junfu1115/DANet
`encoding/nn/da_att.py`, the same code as `encoding/nn/attention.py`) and as Sinha & Dolz copied
them unchanged into "Multi-scale self-guided attention for medical image segmentation" (2019,
sinAshish/Multi-Scale-Attention `src/models/attention.py::PAM_Module, CAM_Module`). In the NCHW
notation of that code, X (B, C, N) with N = H W pixels:

    PAM (position attention, Sec. 3.2):  Q = W_q X + b_q, K = W_k X + b_k  (C/8 rows each),
                                         V = W_v X + b_v  (C rows),
                                         S = Q^T K  (N x N, no 1/sqrt(d)),  A = softmax over keys,
                                         Y = gamma * V A^T + X
    CAM (channel attention, Sec. 3.3):   E = X X^T  (C x C),
                                         A = softmax(rowmax(E) - E)  (the code's "energy_new"),
                                         Y = gamma * A X + X

with gamma a (1,) parameter that the official code initialises to 0, so that a fresh module is
the identity.

Status: both modules as the official code computes them. PAM runs through
`attnlab.ops.attention` (one head, scale 1.0): on the sdpa and flex backends the N x N matrix is
never formed. CAM's C x C matrix is built in float32 (float64 for float64 input) from a float32
energy. Not supported (image layers; check_features refuses them): causal, attn_mask, KV cache.

Layout: x (B, H, W, C) channels-last -> (B, H, W, C). Pixels are taken in row-major order, the
order of the official `view(B, C, H * W)`, so H and W are not transposed anywhere.

Parameters and options:
- `num_heads`: accepted because every attnlab mechanism takes it, and unused: DANet's modules
  have one head. PAM's `heads` option (default 1, the official module) splits the C/8 query/key
  channels and the C value channels into `heads` contiguous groups, one attention per group;
  this multi-head form is an attnlab extension, not in the paper.
- PAM: `query_conv`, `key_conv` (Conv2d C -> C // reduction, 1 x 1, biased), `value_conv` (Conv2d
  C -> C, 1 x 1, biased), `gamma` (1,). `reduction=8` is the official C/8 (floor division, as
  `in_dim // 8`). `qkv_bias=True` is the official biased convs. `attn_drop` is dropout on the
  attention probabilities, `proj_drop` (both modules) dropout on the attention branch
  gamma * out before the residual; both 0 by default, as the official code, which has neither.
- CAM: `gamma` (1,) only: no projections.
- `gamma_init=0.0` (both): the official zero init. Any other value starts the module away from
  the identity (the spec's test_kwargs use 0.5 so that the shared suites see attention at work).

Checkpoint key map (official state_dict -> attnlab, shapes equal, no transposes):
- PAM keys are the official ones: `query_conv.weight` (C/8, C, 1, 1), `query_conv.bias`,
  `key_conv.weight`, `key_conv.bias`, `value_conv.weight` (C, C, 1, 1), `value_conv.bias`,
  `gamma` (1,). The 1 x 1 convs are kept as nn.Conv2d modules and applied to the channels-last
  pixels as a matmul with `weight[:, :, 0, 0]` (no permute to NCHW is needed). DANet's
  `head.sa.<key>` (DANetHead's PAM) and Multi-Scale-Attention's `pam_attention_*.attn.3.<key>`
  (the PAM inside PAM_CAM_Layer's Sequential) load after stripping that prefix.
- CAM: `gamma` (1,). DANet's `head.sc.gamma`, Multi-Scale-Attention's
  `cam_attention_*.attn.3.gamma`.
- No BatchNorm buffers: the BN/ReLU/conv layers around the modules in DANetHead and
  PAM_CAM_Layer belong to the network, not to these modules. `heads` > 1 changes no key.

Deviations / readings:
- PAM on the fused backends: SDPA's CPU flash kernel and FlexAttention need q, k and v of one
  width, while PAM's queries and keys are C/8 wide and its values C wide (SDPA on CPU would
  otherwise fall back to its math path, which forms the N x N matrix). There q and k are
  zero-padded to the value width: q.k is unchanged (the padded products are exact zeros); on
  CPU this makes the score work 8x the unpadded one (PAM still ran 3.4x faster than the
  materialised softmax at 96 x 96). On CUDA with the sdpa backend they are padded only to a
  multiple of 8 (the memory-efficient kernel takes a narrower q/k at such widths; unverified on
  a GPU so far). On the reference backend nothing is padded and the hooks see the official widths.
- CAM: softmax(rowmax(E) - E) equals softmax(-E) (a softmax does not change when a row is
  shifted); the official form is kept as written, and hook_scores carries rowmax(E) - E. E sums
  H W products, so in bfloat16 it would lose most of its digits: E, the softmax and A X are
  computed in float32 (float64 input: float64) and the result cast back.
- CAM has no `backend` option: its attention is over the C channels with the N pixels as the
  feature width, small (C x C) and cheaper eager than through SDPA (whose fused kernels would
  compute E in the input dtype).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_image, check_positive_int
from attnlab.hooks import HookPoint
from attnlab.ops import default_backend
from attnlab.ops.sdpa import PRIORITY, attention
from attnlab.registry import MechanismSpec, register

PAM, CAM = "danet_pam", "danet_cam"
_PAPER = "Dual Attention Network for Scene Segmentation"
_URL = "https://arxiv.org/abs/1809.02983"


def _finite(name: str, arg: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: {arg} must be a finite number, got {value!r}")
    return float(value)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@register(MechanismSpec(
    name=PAM, paper=_PAPER, year=2019, family="softmax", layout="2d",
    time="O(N^2 C)", memory="O(N C) (sdpa, flex); O(N^2) (reference)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url=_URL, provenance="official-code",
    source=("junfu1115/DANet encoding/nn/da_att.py::PAM_Module, as copied into "
            "sinAshish/Multi-Scale-Attention src/models/attention.py::PAM_Module"),
    test_kwargs=dict(gamma_init=0.5),
    test_configs=(dict(gamma_init=0.5, heads=2, reduction=4),)))
class DANetPositionAttention2d(nn.Module):
    """x (B, H, W, C) -> gamma * PAM(x) + x, (B, H, W, C); attention over the N = H W pixels.

    Hooks (attnlab.hooks), shapes with h = `heads`, N = H W: hook_q, hook_k (B, h, N, C/8/h),
    hook_v (B, h, N, C/h), hook_scores / hook_probs (B, h, N, N) on the reference backend only,
    hook_out (B, h, N, C/h) before gamma and the residual.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 1, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, heads: int = 1, reduction: int = 8, gamma_init: float = 0.0,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_positive_int(PAM, "dim", dim)
        check_positive_int(PAM, "num_heads", num_heads)      # unused: see the module docstring
        check_positive_int(PAM, "heads", heads)
        check_positive_int(PAM, "reduction", reduction)
        check_dropout(PAM, attn_drop=attn_drop, proj_drop=proj_drop)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"{PAM}: qkv_bias must be a bool, got {type(qkv_bias).__name__}")
        qk_dim = dim // reduction
        if qk_dim == 0:
            raise ValueError(f"{PAM}: dim // reduction must be >= 1 (query/key width), got dim={dim}, "
                             f"reduction={reduction}")
        if qk_dim % heads or dim % heads:
            raise ValueError(f"{PAM}: heads={heads} must divide the query/key width dim // reduction = {qk_dim} "
                             f"and the value width dim = {dim}")
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{PAM}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.heads, self.qk_dim = dim, num_heads, heads, qk_dim
        self.reduction = reduction
        self.attn_drop = attn_drop
        self.backend = backend
        self.query_conv = nn.Conv2d(dim, qk_dim, kernel_size=1, bias=qkv_bias, **factory)
        self.key_conv = nn.Conv2d(dim, qk_dim, kernel_size=1, bias=qkv_bias, **factory)
        self.value_conv = nn.Conv2d(dim, dim, kernel_size=1, bias=qkv_bias, **factory)
        self.gamma = nn.Parameter(torch.full((1,), _finite(PAM, "gamma_init", gamma_init), **factory))
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()        # (B, h, N, C/8/h)
        self.hook_k = HookPoint()        # (B, h, N, C/8/h)
        self.hook_v = HookPoint()        # (B, h, N, C/h)
        self.hook_scores = HookPoint()   # (B, h, N, N): q k^T, unscaled (reference backend only)
        self.hook_probs = HookPoint()    # (B, h, N, N): softmax over keys (reference backend only)
        self.hook_out = HookPoint()      # (B, h, N, C/h): per-head V A^T, before gamma and + x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_dim={self.qk_dim}, reduction={self.reduction}"

    def _qk_width(self, device: torch.device, dq: int, dv: int) -> int:
        """The width q and k are zero-padded to for the backend that will run (see Deviations)."""
        backend = self.backend or default_backend()
        if backend == "reference":
            return dq
        if backend == "flex" or device.type != "cuda":
            return dv                        # flex and CPU flash: q, k and v of one width
        # CUDA's memory-efficient kernel takes a narrower q/k, but (as its checks read) only at a
        # multiple of 8 in half precision, 4 in float32; 8 covers both. Unpadded, a C/8 of 2 or 4
        # would send SDPA to its math path, which forms the N x N matrix.
        return min(dv, -(-dq // 8) * 8)

    @staticmethod
    def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
        """A 1 x 1 Conv2d on channels-last pixels x (..., C_in) -> (..., C_out)."""
        return F.linear(x, conv.weight[:, :, 0, 0], conv.bias)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(PAM, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        N, h = H * W, self.heads
        pixels = x.reshape(B, N, C)                                          # (B, N, C), row-major pixels
        q = self._conv1x1(self.query_conv, pixels)                           # (B, N, C/8)
        k = self._conv1x1(self.key_conv, pixels)                             # (B, N, C/8)
        v = self._conv1x1(self.value_conv, pixels)                           # (B, N, C)
        dq, dv = self.qk_dim // h, C // h
        q = self.hook_q(q.reshape(B, N, h, dq).transpose(1, 2))              # (B, h, N, C/8/h)
        k = self.hook_k(k.reshape(B, N, h, dq).transpose(1, 2))              # (B, h, N, C/8/h)
        v = self.hook_v(v.reshape(B, N, h, dv).transpose(1, 2))              # (B, h, N, C/h)
        width = self._qk_width(x.device, dq, dv)
        if width != dq:
            pad = (0, width - dq)
            q, k = F.pad(q, pad), F.pad(k, pad)                              # (B, h, N, width), q.k unchanged
        out = attention(q, k, v, scale=1.0, dropout_p=self.attn_drop if self.training else 0.0,
                        backend=self.backend, scores_hook=self.hook_scores, probs_hook=self.hook_probs)
        out = self.hook_out(out)                                             # (B, h, N, C/h)
        out = out.transpose(1, 2).reshape(B, H, W, C)                        # (B, H, W, C)
        return self.proj_drop(self.gamma * out) + x

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds, N = seq_len = H W pixels: the three 1 x 1 convs 2 N C (2 C/8 + C),
        scores 2 N^2 C/8 and the weighted sum 2 N^2 C (the unpadded widths: zero padding is not
        useful work). Backward: twice the forward. `num_heads` is not used (see the docstring)."""
        if causal:
            raise NotImplementedError(f"mechanism {PAM!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{PAM}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        B, N, C, c = batch, seq_len, self.dim, self.qk_dim
        fwd = 2 * B * N * C * (2 * c + C) + 2 * B * N * N * (c + C)
        return fwd, 2 * fwd


@register(MechanismSpec(
    name=CAM, paper=_PAPER, year=2019, family="channel", layout="2d",
    time="O(N C^2)", memory="O(N C + C^2)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(),
    url=_URL, provenance="official-code",
    source=("junfu1115/DANet encoding/nn/da_att.py::CAM_Module, as copied into "
            "sinAshish/Multi-Scale-Attention src/models/attention.py::CAM_Module"),
    test_kwargs=dict(gamma_init=0.5)))
class DANetChannelAttention2d(nn.Module):
    """x (B, H, W, C) -> gamma * CAM(x) + x, (B, H, W, C); attention over the C channels.

    The channels are the tokens and the N = H W pixels their features: q = k = v = X (B, C, N),
    with no projections. Always eager (no backend option), in float32 (float64 for float64 input).
    Hooks, as one head: hook_q, hook_k, hook_v (B, 1, C, N) (the same tensor X, each hookable on
    its own), hook_scores (B, 1, C, C) = rowmax(E) - E, hook_probs (B, 1, C, C), hook_out
    (B, 1, C, N) = A X before gamma and the residual.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ()

    def __init__(self, dim: int, num_heads: int = 1, *, proj_drop: float = 0.0, gamma_init: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int(CAM, "dim", dim)
        check_positive_int(CAM, "num_heads", num_heads)      # unused: one channel attention
        check_dropout(CAM, proj_drop=proj_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dim, self.num_heads = dim, num_heads
        self.gamma = nn.Parameter(torch.full((1,), _finite(CAM, "gamma_init", gamma_init),
                                             device=device, dtype=dtype))
        self.hook_q = HookPoint()        # (B, 1, C, N): X, channels as tokens
        self.hook_k = HookPoint()        # (B, 1, C, N): X
        self.hook_v = HookPoint()        # (B, 1, C, N): X
        self.hook_scores = HookPoint()   # (B, 1, C, C): rowmax(E) - E, E = X X^T (the softmax input)
        self.hook_probs = HookPoint()    # (B, 1, C, C): softmax over the last axis
        self.hook_out = HookPoint()      # (B, 1, C, N): A X, before gamma and + x

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(CAM, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        N = H * W
        compute = _compute_dtype(x.dtype)
        xc = x.reshape(B, 1, N, C).transpose(-2, -1).to(compute)            # (B, 1, C, N): NCHW's X
        q, k, v = self.hook_q(xc), self.hook_k(xc), self.hook_v(xc)         # (B, 1, C, N) each
        energy = q @ k.transpose(-2, -1)                                     # (B, 1, C, C): E = X X^T
        scores = self.hook_scores(energy.amax(-1, keepdim=True) - energy)    # (B, 1, C, C): "energy_new"
        probs = self.hook_probs(scores.softmax(-1))                          # (B, 1, C, C)
        out = self.hook_out(probs @ v)                                       # (B, 1, C, N)
        out = out.squeeze(1).transpose(1, 2).reshape(B, H, W, C)             # (B, H, W, C)
        return (self.proj_drop(self.gamma.to(compute) * out) + x.to(compute)).to(x.dtype)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds, N = seq_len pixels: E = X X^T 2 N C^2 and A X 2 N C^2.
        Backward: twice the forward. `num_heads` is not used."""
        if causal:
            raise NotImplementedError(f"mechanism {CAM!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{CAM}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        fwd = 4 * batch * seq_len * self.dim ** 2
        return fwd, 2 * fwd
