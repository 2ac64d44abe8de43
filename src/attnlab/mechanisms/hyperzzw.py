"""HyperZ·Z·W: slow-net hyper-kernels and the fast multi-branch layer of Terminator (`hyperzzw`).

Paper: HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction (Harvie
Zhang, HyperEvol AI Lab; arXiv 2401.17948, 2024). Official code: hyperevolnet/Terminator, read in
the fork lalalune/Terminator, which keeps the complete module code:
`models/modules/fast_multi_branch.py::FastMultiBranchLayer` (commit 67e773a), `magnet.py`,
`slow_net.py`, `local_conv.py`, `rgu.py`, `hyper_interact.py`, `hyperzzw.py`, `linear.py`, with the
sizes of `cfg/config.yaml`. Checked once against that code itself (run on CPU with its `.cuda()`
calls stubbed, official weights loaded here, float64, square images of the configured size): with
context="batch" equal to it to ~1e-6, which is the official run's float32 constants (its
linspace coordinates and its beta = 0.1 are float32 tensors); with those constants rounded the
same way the outputs agree bitwise and the gradients to 1e-12. context="sample" equals the
official layer run on each sample alone to the same precision.

Status: the official `FastMultiBranchLayer` (the attention replacement of an SFNE block), all ten
branches, per sample by default (see `context`). A slow network, a coordinate MLP over
[-1, 1]^D in MAGNet form (sinusoidal filters g_i(c) = sin(ω_i c) multiplying linear layers:
h_1 = g_1(c), h_{i+1} = g_{i+1}(c) ⊙ (W_i h_i + b_i) + p, out = W_o h + b_o, p a learned
per-position bias), generates hyper-kernels; the fast network uses them through HyperZ·Z·W:
the hyper-kernel W meets the activations Z elementwise (Z·W) and the result is applied to Z.
With Z = x (B, C, H, W) inside (NCHW):

    W_g  = slow_net_g(coords over H x W)                     (1, C, H, W)   global hyper-kernel
    Ŵ_g  = x ⊙ W_g                                                           "Z·W" (global_ctx_hk)
    fast = IS(RGU_2(Ŵ_g) + RGU(x)),  mixer_x = IS(mlp(x)),  x_hci = IS(HCI(x))
    out = Ŵ_g @ fast,  out_x = Ŵ_g @ mixer_x,  out_eca = Ŵ_g @ x_hci          global "dot product":
                                                   a matrix product over the (H, W) plane, per channel
    out_glu = sigmoid(out) ⊙ out,   x_hyper = HyperInteract(out, x)
    K_j  = slow_net_l_j(z_j),  local_j = GELU(S(mix_j(K_j ⊛ z'_j))) + bias_j  local HyperZ·Z·W, j = 1..4
           (z_j, z'_j) = (x, x_hci), (x_hci, x), (mixer_x, x), (x, mixer_x); k_j = 3, 9, 5, 7
    y = bottleneck([out, local_2, fast, out_x, local_1, out_glu, local_3, out_eca, local_4, x_hyper])

IS = instance standardisation (InstanceNorm2d, no affine), S = the local branch's standardisation,
⊛ = depthwise convolution (padding (k - 1) // 2), mlp / mix_j / bottleneck = 1 x 1 convolutions.
RGU (recursive gated unit): y = W_y(GELU(IS(W_k z ⊙ W_q(W_v z))) + p). HCI (hyper-channel
interaction): x ⊙ sigmoid(ȳ ⊙ w_c ⊙ ȳ), ȳ the channel means, w_c a 1-D slow-net kernel over the
C channel coordinates. HyperInteract: x ⊙ sigmoid((ȳ_s ⊙ w_s ⊙ ȳ_s)(ȳ_c ⊙ w_c ⊙ ȳ_c)) from the
spatial and channel means of `out`. The local kernel K_j is context-dependent (MAGNet_L): the
context z_j is average-pooled to k x k, reduced to the slow net's width (fast_reduce), passed
through fast_fc1 and GELU, and multiplies each hidden layer of the coordinate MLP, after a
"renormalisation" h <- 1.0 · h + 0.1 · h / ||h|| (per hidden channel over the k x k grid).

`context` (the one behavioural option):
- "sample" (default): every sample gets its own local kernels and its own statistics, i.e. the
  official computation run on each sample as a batch of one. The local hyper-kernels are built
  from that sample's pooled context, the local branch's standardisation S is per sample and
  channel over H x W (what the official BatchNorm computes at batch size 1), and the
  renormalisation runs per sample. An output never depends on another sample (batch invariance).
- "batch": the official behaviour. MAGNet_L averages the reduced context over the batch
  (`x_gap.mean(axis=0)`), so one set of local kernels serves the whole batch, and S is
  `BatchNorm2d(track_running_stats=False, affine=False)`, which uses the batch's statistics in
  eval mode too: every output depends on the other samples of the batch. Equal to "sample" at
  batch size 1 (tested).

Layout: x (B, H, W, C) channels-last -> (B, H, W, C); everything runs in NCHW inside (one permute
in, one out). num_heads is accepted for the shared interface and unused (there are no heads);
proj_drop (the house dropout on the output, default 0) is not in the official layer.
H * W >= 2 (the standardisations need two pixels). The slow networks (coordinate MLPs and the
local kernels' context path) run in float32 (float64 for float64 input) and their kernels are cast
to x's dtype: sinusoids of large arguments are meaningless in bfloat16.
Not supported: causal, attn_mask, KV cache (check_features refuses them).

Deviations / readings chosen:
- Sizes. The official layer only runs on square images whose side equals the configured global
  kernel size (cfg kernel_g.size = kernel_gs_hi.size = 32 for CIFAR): the global hyper-kernels and
  the per-position biases p of MAGNet_G and RGU are `global_size` x `global_size`, and
  `torch.matmul` over the (H, W) plane needs H == W. Here the coordinate grid is built at the
  input's own H x W (linspace(-1, 1, H) x linspace(-1, 1, W), as the official grid at
  H = W = global_size), and each p is resampled to H x W bilinearly with align_corners=True
  (grid points land on grid points; the identity at H = W = global_size, where the computation is
  the official one exactly). For H != W the plane product contracts the first min(H, W) columns
  of Ŵ_g with the first min(H, W) rows of the other factor (zero-padding both to a square and
  cropping back); the official code raises there.
- Chang et al.'s initialisation (output layer scaled by sqrt(1 / kernel points)) is applied at
  construction with the configured sizes (global_size^2, k^2, C); the official code applies it at
  the first forward from that input's size, and since its `initialized` flag is not saved it would
  rescale loaded weights again on the first forward after `load_state_dict`.
- MAGNet_L's renormalisation weights alpha = 1, beta = 0.1 are plain Python lists of
  nn.Parameter in the official code, never registered (not trained, not saved, not moved): they
  are constants here. Its first term uses `out.data.clone()`, a stop-gradient: the forward value
  is h + 0.1 h / ||h|| but only the second term passes gradients. `renorm_detach=True` keeps that
  (official); False lets the first term pass gradients as well (same forward).
- omega_0 (the sinusoids' frequency scale) is read by the official code from the kernel configs
  but is absent from the released cfg/config.yaml; the default 1.0 here is attnlab's choice.
  MAGNet's Gamma(alpha, beta) frequency draws use the official alpha = 6 / (layer + 1), beta = 1.
- The bottleneck maps the 10 C concatenated channels to C (the mechanism's width); the official
  block widens to C * bottleneck_factor (4, 3, 2, 2, 2 per block) and concatenates earlier blocks'
  outputs (x_pre, num_concat_pre): network-level, not part of this module. So is the SFNE block's
  G_IBS normalisation, GELU, dropout and bias after the layer, and the slow neural loss.
- The official `HyperZZW_L` class and its `fast_bias` are unused by FastMultiBranchLayer (it
  calls the slow nets and LocalConv directly, with bias1..4); they are not here.

Checkpoint key map (official FastMultiBranchLayer state_dict -> this module): the module tree
and parameter names are the official ones, all 1 x 1 "linear" layers are nn.Conv1d/nn.Conv2d as
there (weights (out, in, 1[, 1]), NCHW), so every key loads unchanged:
`slow_net_g.Kernel.{filters.i.linear, linears.i, output_linear}.{weight,bias}`,
`slow_net_g.Kernel.bias_p`; `slow_net_l{1..4}.Kernel.{filters.i.linear, linears.i, output_linear,
fast_reduce, fast_fc1, fast_linears_x.i}.*`, `.bias_pk`; `local_interact_conv_{1..4}.channel_mixer.*`;
`bias1..bias4`; `channel_mixer_mlp.*`; `bottleneck_layer.*` (loads when the official block has
bottleneck_factor 1 and num_concat_pre 0); `Fast_Kernel_rgu{,_2}.fast_linear_{k,v,q,y}.*`,
`.bias_p`; `channel_mixer_hci.slow_net_gc.Kernel.*`; `hyper_interact.slow_net_{gc,gs}.Kernel.*`.
Drop the official `*.train_length` buffers (they hold the kernel size). The BatchNorm/InstanceNorm
layers have no affine parameters and no running statistics, so there are no BN buffers.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_dropout, check_features, check_image, check_positive,
                             check_positive_int)
from attnlab.hooks import HookPoint
from attnlab.registry import MechanismSpec, register

NAME = "hyperzzw"
CONTEXTS = ("sample", "batch")
NETS = ("g", "l", "gc", "gc_hi", "gs_hi")
# Official cfg/config.yaml (blocks after the first): kernel_g, kernel_l, kernel_gc, kernel_gc_hi, kernel_gs_hi.
NO_HIDDEN = dict(g=64, l=32, gc=32, gc_hi=16, gs_hi=64)
NUM_LAYERS = dict(g=2, l=2, gc=2, gc_hi=2, gs_hi=2)
RENORM_ALPHA, RENORM_BETA = 1.0, 0.1     # MAGNet_L's unregistered alphas / betas (constants)


def _per_net(name: str, value, default: Mapping[str, int]) -> dict[str, int]:
    """An int for every slow net, or a mapping overriding some of the official per-net values."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(NETS))
        if unknown:
            raise ValueError(f"{NAME}: {name} keys must be among {NETS}, got {unknown}")
        out = {**default, **value}
    elif value is None:
        out = dict(default)
    else:
        out = dict.fromkeys(NETS, value)
    for net, v in out.items():
        check_positive_int(NAME, f"{name}[{net!r}]", v)
    return out


def _pointwise(conv: nn.Module, z: Tensor) -> Tensor:
    """A 1 x 1 convolution ("Linear1d/2d" of the official code) in z's dtype."""
    w = conv.weight.to(z.dtype)
    b = None if conv.bias is None else conv.bias.to(z.dtype)
    return F.conv1d(z, w, b) if w.dim() == 3 else F.conv2d(z, w, b)


def _coords(sizes: tuple[int, ...], dtype, device) -> Tensor:
    """(1, D, *sizes): the official linspace_grid, coordinates in [-1, 1] per axis ('ij' order)."""
    axes = [torch.linspace(-1.0, 1.0, s, dtype=dtype, device=device) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _resample(p: Tensor, size: tuple[int, int]) -> Tensor:
    """A (1, 1, S, S) per-position bias on the H x W grid (the identity when (H, W) == (S, S))."""
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    return F.interpolate(p, size=size, mode="bilinear", align_corners=True)


def plane_matmul(a: Tensor, b: Tensor) -> Tensor:
    """(B, C, H, W) x (B, C, H, W) -> (B, C, H, W): torch.matmul over the (H, W) plane per channel,
    the official global product. For H != W the first min(H, W) columns of `a` meet the first
    min(H, W) rows of `b` (both zero-padded to a square, the product cropped back)."""
    H, W = a.shape[-2:]
    if H == W:
        return a @ b
    m = min(H, W)
    return a[..., :, :m] @ b[..., :m, :]                                     # (B, C, H, m) @ (B, C, m, W)


# --- the slow networks (coordinate MLPs, MAGNet form) ------------------------------------------

class MAGNetLayer(nn.Module):
    """g(c) = sin(W c + b): W (hidden, D) drawn as torch's default init times 2π ω0 γ, γ ~ Gamma."""

    def __init__(self, data_dim: int, hidden_channels: int, omega_0: float, alpha: float, beta: float,
                 factory: dict):
        super().__init__()
        conv = nn.Conv1d if data_dim == 1 else nn.Conv2d
        self.linear = conv(data_dim, hidden_channels, 1, bias=True, **factory)
        gamma = torch.distributions.Gamma(torch.tensor(float(alpha)), torch.tensor(float(beta))).sample(
            (hidden_channels, data_dim))                                      # (hidden, D)
        with torch.no_grad():
            scale = 2 * math.pi * omega_0 * gamma.view(hidden_channels, data_dim, *((1,) * data_dim))
            self.linear.weight.mul_(scale.to(self.linear.weight))
            self.linear.bias.zero_()

    def forward(self, coords: Tensor) -> Tensor:
        return torch.sin(_pointwise(self.linear, coords))


class MAGNet(nn.Module):
    """The MAGNet coordinate MLP: filters[0..L], linears[0..L-1], output_linear, position bias.

    kind "G" (2-D grid, `bias_p` (1, 1, S, S)), "GC" (1-D channel grid, `bias_p` (1, 1, C)) or
    "L" (2-D k x k local kernel, `bias_pk`, plus the context path fast_reduce / fast_fc1 /
    fast_linears_x and the renormalisation).
    """

    def __init__(self, kind: str, data_dim: int, kernel_size: int, hidden_channels: int, out_channels: int,
                 num_layers: int, omega_0: float, factory: dict, context_channels: int = 0,
                 alpha: float = 6.0, beta: float = 1.0):
        super().__init__()
        self.kind, self.data_dim, self.kernel_size = kind, data_dim, kernel_size
        self.hidden_channels = hidden_channels
        conv = nn.Conv1d if data_dim == 1 else nn.Conv2d
        self.linears = nn.ModuleList([conv(hidden_channels, hidden_channels, 1, **factory)
                                      for _ in range(num_layers)])
        self.output_linear = conv(hidden_channels, out_channels, 1, **factory)
        self.filters = nn.ModuleList([MAGNetLayer(data_dim, hidden_channels, omega_0, alpha / (layer + 1), beta,
                                                  factory) for layer in range(num_layers + 1)])
        for lin in self.linears:
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
            nn.init.constant_(lin.bias, 1.0)
        nn.init.kaiming_uniform_(self.output_linear.weight, nonlinearity="linear")
        nn.init.zeros_(self.output_linear.bias)
        # Chang et al. (2020) as the official chang_initialization, here at construction.
        with torch.no_grad():
            self.output_linear.weight.mul_(math.sqrt(1.0 / kernel_size ** data_dim))
        bias_shape = (1, 1) + (kernel_size,) * data_dim
        if kind == "L":
            self.bias_pk = nn.Parameter(torch.zeros(bias_shape, **factory))
            self.fast_reduce = nn.Conv2d(context_channels, hidden_channels, 1, **factory)
            self.fast_fc1 = nn.Conv2d(hidden_channels, hidden_channels, 1, **factory)
            self.fast_linears_x = nn.ModuleList([conv(hidden_channels, hidden_channels, 1, **factory)
                                                 for _ in range(num_layers)])
            for lin in self.fast_linears_x:
                nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
                nn.init.constant_(lin.bias, 1.0)
        else:
            self.bias_p = nn.Parameter(torch.zeros(bias_shape, **factory))

    def forward(self, coords: Tensor, bias: Tensor, ctx: Tensor | None = None, detach: bool = True) -> Tensor:
        """coords (1, D, *grid), bias broadcastable to (1, hidden, *grid) -> (n, out, *grid).

        kind "L": ctx (n, hidden, k, k) is the processed context; each hidden layer is
        renormalised and multiplied by fast_linears_x[i](ctx), so the result has n rows.
        """
        out = self.filters[0](coords)                                         # (1, hidden, *grid)
        for i in range(1, len(self.filters)):
            out = self.filters[i](coords) * _pointwise(self.linears[i - 1], out) + bias
            if self.kind == "L":
                out = _renormalise(out, detach)
                out = out * _pointwise(self.fast_linears_x[i - 1], ctx)       # (n, hidden, k, k)
        return _pointwise(self.output_linear, out)                            # (n, out, *grid)


def _renormalise(out: Tensor, detach: bool) -> Tensor:
    """MAGNet_L's s_renormalization: alpha h + beta h / ||h||, the norm per row and hidden channel
    over the k x k grid (the official norm is over (rows, k, k) with one row: the same there).
    The official first term is `out.data.clone()` (no gradient) when `detach`."""
    first = out.detach() if detach else out
    norm = out.flatten(2).norm(dim=-1).clamp_min(1e-12)[..., None, None]     # F.normalize's eps
    return RENORM_ALPHA * first + RENORM_BETA * (out / norm)


class SlowNet(nn.Module):
    """Holds the coordinate MLP as `Kernel`, as the official SlowNet_G / SlowNet_GC / SlowNet_L."""

    def __init__(self, kernel: MAGNet):
        super().__init__()
        self.Kernel = kernel


# --- the fast network's parts -------------------------------------------------------------------

class LocalConv(nn.Module):
    """Depthwise convolution with a hyper-kernel, 1 x 1 channel mixer, standardisation, GELU."""

    def __init__(self, in_channels: int, kernel_size: int, factory: dict):
        super().__init__()
        self.padding = (kernel_size - 1) // 2
        self.channel_mixer = nn.Conv2d(in_channels, in_channels, 1, **factory)
        nn.init.kaiming_normal_(self.channel_mixer.weight)
        nn.init.zeros_(self.channel_mixer.bias)

    def forward(self, local_hk: Tensor, z: Tensor, context: str) -> Tensor:
        """local_hk (n, C, k, k) with n = B ("sample") or 1 ("batch"), z (B, C, H, W)."""
        B, C, H, W = z.shape
        k = local_hk.shape[-1]
        if context == "batch":
            feat = F.conv2d(z, local_hk.reshape(C, 1, k, k), padding=self.padding, groups=C)    # (B, C, H, W)
        else:   # one kernel per (sample, channel): the batch folds into the groups
            feat = F.conv2d(z.reshape(1, B * C, H, W), local_hk.reshape(B * C, 1, k, k),
                            padding=self.padding, groups=B * C).reshape(B, C, H, W)
        feat = _pointwise(self.channel_mixer, feat)
        if context == "batch":    # BatchNorm2d(track_running_stats=False): batch statistics, always
            feat = F.batch_norm(feat, None, None, training=True, momentum=1.0, eps=1e-5)
        else:                     # the same standardisation with each sample as its own batch
            feat = F.instance_norm(feat, eps=1e-5)
        return F.gelu(feat)


class RGU(nn.Module):
    """Recursive gated unit: W_y(GELU(IS(W_k z ⊙ W_q(W_v z))) + p), p (1, 1, S, S)."""

    def __init__(self, in_channels: int, bias_size: int, factory: dict):
        super().__init__()
        for name in ("k", "v", "q", "y"):
            lin = nn.Conv2d(in_channels, in_channels, 1, **factory)
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
            nn.init.zeros_(lin.bias)
            setattr(self, f"fast_linear_{name}", lin)
        self.bias_p = nn.Parameter(torch.zeros(1, 1, bias_size, bias_size, **factory))

    def forward(self, z: Tensor) -> Tensor:
        out_k = _pointwise(self.fast_linear_k, z)
        out_v = _pointwise(self.fast_linear_v, z)
        out_q = F.gelu(F.instance_norm(out_k * _pointwise(self.fast_linear_q, out_v), eps=1e-5))
        out_q = out_q + _resample(self.bias_p.to(z.dtype), tuple(z.shape[-2:]))
        return _pointwise(self.fast_linear_y, out_q)


def _channel_kernel(net: SlowNet, C: int, dtype, device) -> Tensor:
    """(1, C) kernel over the C channel coordinates from a 1-D MAGNet_GC."""
    kernel = net.Kernel
    coords = _coords((C,), dtype, device)                                     # (1, 1, C)
    return kernel(coords, kernel.bias_p.to(dtype)).reshape(1, C)


class HyperChannelInteract(nn.Module):
    """x ⊙ sigmoid(ȳ ⊙ w_c ⊙ ȳ), ȳ = x's channel means (HyperZZW_2E on channels)."""

    def __init__(self, channel: int, hidden: int, num_layers: int, omega_0: float, factory: dict):
        super().__init__()
        self.slow_net_gc = SlowNet(MAGNet("GC", 1, channel, hidden, 1, num_layers, omega_0, factory))

    def forward(self, x: Tensor, slow_dtype) -> Tensor:
        B, C = x.shape[:2]
        y = x.mean(dim=(2, 3))                                                # (B, C)
        hk = _channel_kernel(self.slow_net_gc, C, slow_dtype, x.device).to(x.dtype)   # (1, C)
        score = torch.sigmoid(y * hk * y)                                     # (B, C)
        return x * score[:, :, None, None]


class HyperInteract(nn.Module):
    """z ⊙ sigmoid((ȳ_s ⊙ w_s ⊙ ȳ_s)(ȳ_c ⊙ w_c ⊙ ȳ_c)): spatial x channel scores from y."""

    def __init__(self, channel: int, size: int, hidden_c: int, hidden_s: int, num_layers_c: int,
                 num_layers_s: int, omega_0: float, factory: dict):
        super().__init__()
        self.slow_net_gc = SlowNet(MAGNet("GC", 1, channel, hidden_c, 1, num_layers_c, omega_0, factory))
        self.slow_net_gs = SlowNet(MAGNet("G", 2, size, hidden_s, 1, num_layers_s, omega_0, factory))

    def forward(self, y: Tensor, z: Tensor, slow_dtype) -> Tensor:
        B, C, H, W = y.shape
        y_c = y.mean(dim=(2, 3))                                              # (B, C)
        hk_c = _channel_kernel(self.slow_net_gc, C, slow_dtype, y.device).to(y.dtype)  # (1, C)
        score_c = y_c * hk_c * y_c                                            # (B, C)
        y_s = y.mean(dim=1, keepdim=True)                                     # (B, 1, H, W)
        kernel = self.slow_net_gs.Kernel
        hk_s = kernel(_coords((H, W), slow_dtype, y.device), _resample(kernel.bias_p.to(slow_dtype), (H, W)))
        score_s = y_s * hk_s.to(y.dtype) * y_s                                # (B, 1, H, W)
        return z * torch.sigmoid(score_s * score_c[:, :, None, None])         # (B, C, H, W)


# --- the layer ----------------------------------------------------------------------------------

@register(MechanismSpec(
    name=NAME, paper="HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction",
    year=2024, family="hyper-kernel", layout="2d",
    time="O(N C^2 + N C sqrt(N) + N C k^2)", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(),
    url="https://arxiv.org/abs/2401.17948",
    provenance="official-code",
    source=("hyperevolnet/Terminator as kept in the fork lalalune/Terminator (commit 67e773a): "
            "models/modules/fast_multi_branch.py::FastMultiBranchLayer with magnet.py::MAGNet_G/MAGNet_GC/"
            "MAGNet_L, slow_net.py::SlowNet_G/SlowNet_GC/SlowNet_L, local_conv.py::LocalConv, rgu.py::RGU, "
            "hyper_interact.py::HyperChannelInteract/HyperInteract; sizes from cfg/config.yaml; "
            "per-sample local context by default (context='batch' is the official batch mean)"),
    test_kwargs=dict(global_size=8, local_kernel_sizes=(3, 5, 3, 5), no_hidden=8),
    test_configs=(dict(global_size=4, local_kernel_sizes=(3, 3, 3, 3), no_hidden=6, num_layers=1,
                       renorm_detach=False),)))
class HyperZZW2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): the Terminator fast multi-branch layer (HyperZ·Z·W).

    Hooks (attnlab.hooks): the hyper-kernels and the concatenated branches; there is no q, k, v
    or attention matrix (absent_hooks says why).
    """

    hook_names = ("hook_global_hk", "hook_global_ctx_hk", "hook_local_hk_1", "hook_local_hk_2",
                  "hook_local_hk_3", "hook_local_hk_4", "hook_out")
    eager_hook_names = ()
    absent_hooks = {
        **{name: "no queries, keys or values: hyper-kernels from coordinate MLPs meet the activations "
                 "elementwise (hook_global_hk, hook_global_ctx_hk, hook_local_hk_j)"
           for name in ("hook_q", "hook_k", "hook_v")},
        **{name: "no softmax and no token-by-token matrix: the global branches multiply (H, W) planes "
                 "per channel (plane_matmul)" for name in ("hook_scores", "hook_probs")},
    }

    def __init__(self, dim: int, num_heads: int = 8, *, proj_drop: float = 0.0, global_size: int = 32,
                 local_kernel_sizes: tuple[int, int, int, int] = (3, 9, 5, 7),
                 no_hidden: int | Mapping[str, int] | None = None, num_layers: int | Mapping[str, int] | None = None,
                 omega_0: float = 1.0, context: str = "sample", renorm_detach: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_positive_int(NAME, "dim", dim)
        check_positive_int(NAME, "num_heads", num_heads)
        self.global_size = check_positive_int(NAME, "global_size", global_size)
        sizes = tuple(local_kernel_sizes) if isinstance(local_kernel_sizes, (tuple, list)) else None
        if sizes is None or len(sizes) != 4 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0
                                                    for k in sizes):
            raise ValueError(f"{NAME}: local_kernel_sizes must be four odd positive ints (branches l1..l4), "
                             f"got {local_kernel_sizes!r}")
        hidden = _per_net("no_hidden", no_hidden, NO_HIDDEN)
        layers = _per_net("num_layers", num_layers, NUM_LAYERS)
        check_positive(NAME, "omega_0", omega_0)
        check_dropout(NAME, proj_drop=proj_drop)
        if not isinstance(context, str) or context not in CONTEXTS:
            raise ValueError(f"{NAME}: context must be one of {CONTEXTS}, got {context!r}")
        if not isinstance(renorm_detach, bool):
            raise TypeError(f"{NAME}: renorm_detach must be a bool, got {type(renorm_detach).__name__}")
        self.dim, self.num_heads = dim, num_heads
        self.local_kernel_sizes = sizes
        self.no_hidden, self.num_layers = hidden, layers
        self.omega_0 = float(omega_0)
        self.context, self.renorm_detach = context, renorm_detach
        factory = dict(device=device, dtype=dtype)
        C, S = dim, self.global_size

        self.slow_net_g = SlowNet(MAGNet("G", 2, S, hidden["g"], C, layers["g"], omega_0, factory))
        for j, k in enumerate(sizes, start=1):
            setattr(self, f"slow_net_l{j}", SlowNet(MAGNet("L", 2, k, hidden["l"], C, layers["l"], omega_0, factory,
                                                           context_channels=C)))
        for j, k in enumerate(sizes, start=1):
            setattr(self, f"local_interact_conv_{j}", LocalConv(C, k, factory))
        self.bias1, self.bias2, self.bias3, self.bias4 = (nn.Parameter(torch.zeros(1, **factory)) for _ in range(4))
        self.channel_mixer_mlp = nn.Conv2d(C, C, 1, **factory)
        self.bottleneck_layer = nn.Conv2d(10 * C, C, 1, **factory)
        for lin in (self.channel_mixer_mlp, self.bottleneck_layer):
            nn.init.kaiming_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.Fast_Kernel_rgu = RGU(C, S, factory)
        self.Fast_Kernel_rgu_2 = RGU(C, S, factory)
        self.channel_mixer_hci = HyperChannelInteract(C, hidden["gc"], layers["gc"], omega_0, factory)
        self.hyper_interact = HyperInteract(C, S, hidden["gc_hi"], hidden["gs_hi"], layers["gc_hi"],
                                            layers["gs_hi"], omega_0, factory)
        self.proj_drop = nn.Dropout(proj_drop)     # attnlab's; the official layer has none (0 by default)
        # Identity hook points for probes; shapes in comments (NCHW inside; n = B, or 1 with context="batch").
        self.hook_global_hk = HookPoint()      # (1, C, H, W), the global hyper-kernel W_g
        self.hook_global_ctx_hk = HookPoint()  # (B, C, H, W), Z·W = x ⊙ W_g
        self.hook_local_hk_1 = HookPoint()     # (n, C, k_1, k_1), local hyper-kernel of branch l1
        self.hook_local_hk_2 = HookPoint()     # (n, C, k_2, k_2)
        self.hook_local_hk_3 = HookPoint()     # (n, C, k_3, k_3)
        self.hook_local_hk_4 = HookPoint()     # (n, C, k_4, k_4)
        self.hook_out = HookPoint()            # (B, 10 C, H, W), the concatenated branches before the bottleneck

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, global_size={self.global_size}, local_kernel_sizes={self.local_kernel_sizes}, "
                f"context={self.context!r}")

    def local_kernel(self, j: int, z: Tensor, slow_dtype) -> Tensor:
        """Branch j's hyper-kernel from context z (B, C, H, W): (B, C, k, k), or (1, C, k, k) with
        context="batch" (the official batch mean of the reduced context)."""
        kernel = getattr(self, f"slow_net_l{j}").Kernel
        k = kernel.kernel_size
        ctx = F.adaptive_avg_pool2d(z.to(slow_dtype), (k, k))                 # (B, C, k, k)
        ctx = _pointwise(kernel.fast_reduce, ctx)                             # (B, hidden, k, k)
        if self.context == "batch":
            ctx = ctx.mean(dim=0, keepdim=True)                               # (1, hidden, k, k)
        ctx = F.gelu(_pointwise(kernel.fast_fc1, ctx))
        coords = _coords((k, k), slow_dtype, z.device)                        # (1, 2, k, k)
        hk = kernel(coords, kernel.bias_pk.to(slow_dtype), ctx, self.renorm_detach)   # (n, C, k, k)
        return getattr(self, f"hook_local_hk_{j}")(hk.to(z.dtype))

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        if H * W < 2:
            raise ValueError(f"{NAME}: needs at least two pixels (H * W >= 2) for its standardisations, "
                             f"got H={H}, W={W} (shape {tuple(x.shape)})")
        if B == 0:
            return x.new_zeros(x.shape)
        slow_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = x.permute(0, 3, 1, 2)                                             # (B, C, H, W)

        # Global hyper-kernel over the H x W coordinate grid, then Z·W.
        kernel = self.slow_net_g.Kernel
        global_hk = kernel(_coords((H, W), slow_dtype, x.device), _resample(kernel.bias_p.to(slow_dtype), (H, W)))
        global_hk = self.hook_global_hk(global_hk.to(x.dtype))                # (1, C, H, W)
        global_ctx_hk = self.hook_global_ctx_hk(z * global_hk)                # (B, C, H, W)

        fast = F.instance_norm(self.Fast_Kernel_rgu_2(global_ctx_hk) + self.Fast_Kernel_rgu(z), eps=1e-5)
        mixer_x = F.instance_norm(_pointwise(self.channel_mixer_mlp, z), eps=1e-5)
        x_hci = F.instance_norm(self.channel_mixer_hci(z, slow_dtype), eps=1e-5)

        # Global HyperZ·Z·W: the context-dependent kernel times three fast features, plane by plane.
        out = plane_matmul(global_ctx_hk, fast)
        out_x = plane_matmul(global_ctx_hk, mixer_x)
        out_eca = plane_matmul(global_ctx_hk, x_hci)
        out_glu = torch.sigmoid(out) * out
        x_hyper = self.hyper_interact(out, z, slow_dtype)

        # Local HyperZ·Z·W: (kernel context, convolved input) per branch, as the official layer.
        pairs = ((z, x_hci), (x_hci, z), (mixer_x, z), (z, mixer_x))
        local = []
        for j, (ctx, inp) in enumerate(pairs, start=1):
            hk = self.local_kernel(j, ctx, slow_dtype)
            conv = getattr(self, f"local_interact_conv_{j}")
            local.append(conv(hk, inp, self.context) + getattr(self, f"bias{j}").to(x.dtype))

        cat = torch.cat([out, local[1], fast, out_x, local[0], out_glu, local[2], out_eca, local[3], x_hyper],
                        dim=1)                                                # (B, 10 C, H, W)
        y = _pointwise(self.bottleneck_layer, self.hook_out(cat))             # (B, C, H, W)
        return self.proj_drop(y.permute(0, 2, 3, 1))                          # (B, H, W, C)

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds of every convolution and matrix product (what FlopCounterMode
        counts), for N = seq_len = S^2 pixels of a square image; backward twice the forward.

        Per forward: slow nets (batch-independent, except the local context path), the 1 x 1
        layers 2 B N C^2 (x 13: mlp, 2 RGUs x 4, 4 local mixers) plus the bottleneck 20 B N C^2,
        three plane products 2 B C N S, four depthwise convolutions 2 B C N k^2.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        S = math.isqrt(seq_len)
        if S * S != seq_len:
            raise ValueError(f"{NAME}: useful_flops needs seq_len = H * W of a square image, got {seq_len}")
        B, N, C = batch, seq_len, self.dim
        hid, lay = self.no_hidden, self.num_layers

        def mlp(points: int, data_dim: int, hidden: int, layers: int, out: int) -> int:
            return 2 * points * ((layers + 1) * data_dim * hidden + layers * hidden * hidden + hidden * out)

        n = B if self.context == "sample" else 1
        fwd = mlp(N, 2, hid["g"], lay["g"], C) + mlp(C, 1, hid["gc"], lay["gc"], 1)
        fwd += mlp(C, 1, hid["gc_hi"], lay["gc_hi"], 1) + mlp(N, 2, hid["gs_hi"], lay["gs_hi"], 1)
        for k in self.local_kernel_sizes:
            h, L, kk = hid["l"], lay["l"], k * k
            fwd += 2 * kk * ((L + 1) * 2 * h + h * h * (1 + (L - 1) * n) + n * h * C)   # coordinate MLP
            fwd += 2 * kk * (B * C * h + n * h * h + L * n * h * h)                   # context path
            fwd += 2 * B * C * N * kk                                                   # depthwise conv
        fwd += 13 * 2 * B * N * C * C + 2 * B * N * 10 * C * C + 3 * 2 * B * C * N * S
        return fwd, 2 * fwd
