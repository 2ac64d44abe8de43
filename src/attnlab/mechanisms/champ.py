"""Champ's guidance encoder: the per-guidance self-attention block (`champ_fusion`) and the full
multi-guidance encoder (`ChampGuidanceEncoder`, `ChampGuidanceFusion`, not registered).

Paper: Champ: Controllable and Consistent Human Image Animation with 3D Parametric Guidance
(Shenhao Zhu, Junming Leo Chen, Zuozhuo Dai, Qingkun Su, Yinghui Xu, Xun Cao, Yao Yao, Hao Zhu,
Siyu Zhu; ECCV 2024, arXiv 2403.14781). Sec. 3.3 "Multi-Layer Motion Fusion": each guidance map
(depth, normal, semantic map, DWpose skeleton) is encoded by its own small convolutional encoder
with a self-attention block, and the encoded guidances are summed into the denoising U-Net's input.
Source followed: the official code fudan-generative-vision/champ, `models/guidance_encoder.py::
GuidanceEncoder` (commit 02e5533), its `Transformer3DModel` (`models/transformer_3d.py`) with
one `TemporalBasicTransformerBlock` (`models/attention.py`, diffusers 0.24 `Attention` and
`FeedForward(activation_fn="geglu")`), and the sum in `models/champ_model.py::ChampModel.forward`
(`torch.stack(guidance_fea_lst).sum(0)`, added to `conv_in(noisy_latents)` in `models/unet_3d.py`).

What runs in the official code, and so here:
    GuidanceEncoder(c):  e = silu(conv_in(c))                     3x3, C_in -> 16
                         for each of the 6 `blocks`: e = silu(conv(e))
                             16->16, 16->32 /2, 32->32, 32->96 /2, 96->96, 96->256 /2 (3x3 convs)
                         e = attentions[-1](e)                    the block below, at 256 channels
                         return conv_out(e)                       3x3, 256 -> C_latent, zero-initialised
    ChampModel:          guidance_fea = sum over guidance types of GuidanceEncoder_type(c_type)
The official constructor also builds `attentions[0..4]` (one per conv) and `guidance_attention`,
but its forward runs only `attentions[-1]` ("FIXME: Temporarily only use the last attention"):
those modules hold checkpoint weights that never touch the output. Here they are not built
(see the key map for loading).

`champ_fusion` (registered, layout "2d"): the attention block the encoder runs, diffusers'
`Transformer3DModel(num_attention_heads=h, attention_head_dim=d, in_channels=C, norm_num_groups=g)`
on one image, channels-last x (B, H, W, C) -> (B, H, W, C):
    t  = proj_in(GroupNorm_g(x))                 1x1 conv C -> h d, as tokens (B, H W, h d)
    t  = t + to_out(MHSA(norm1(t)))              q, k, v = to_q/to_k/to_v(norm1(t)), softmax(q k^T / sqrt(d)) v
    t  = t + ff(norm3(t))                        GEGLU: a, g = proj(.).chunk(2); (a * gelu(g)) -> Linear
    y  = proj_out(t) + x                         1x1 conv h d -> C, the block's residual
Status: as the official block (no cross-attention: `cross_attention_dim=None`; no temporal
attention: `unet_use_temporal_attention=False`). Attention runs through `attnlab.ops.attention`
(hook_scores / hook_probs on the eager path). Not supported: causal, attn_mask, KV cache
(NotImplementedError).

Parameters (official names, so `load_state_dict` takes an official `attentions.5.` sub-dict as is):
    norm                                   GroupNorm(g, C, eps=1e-6)
    proj_in, proj_out                      Conv2d 1x1 (weights (out, in, 1, 1), applied to the
                                           channels-last tokens as a Linear with weight[:, :, 0, 0])
    transformer_blocks.0.norm1, .norm3     LayerNorm(h d), eps 1e-5
    transformer_blocks.0.attn1.to_q/to_k/to_v   Linear(h d, h d, bias=qkv_bias (official attention_bias=False))
    transformer_blocks.0.attn1.to_out.0    Linear(h d, h d) (bias); to_out.1 is its dropout
    transformer_blocks.0.ff.net.0.proj     Linear(h d, 2 * 4 h d): [value half | gate half]
    transformer_blocks.0.ff.net.2          Linear(4 h d, h d)
`num_heads` is the official `num_attention_heads` (8 in the encoder); `head_dim` defaults to
dim // num_heads as the encoder builds it (`channel_in // attention_num_heads`); with another
head_dim the block works at width h d between proj_in and proj_out, as diffusers'.

Checkpoint key map (official `guidance_encoder_<type>.pth`, a GuidanceEncoder state_dict):
- `ChampGuidanceEncoder`: conv_in.*, blocks.<0-5>.*, conv_out.* and attentions.<n-1>.* (n = the
  number of attentions, 6 for four block_out_channels) keep their names and shapes; `InflatedConv3d`
  is a Conv2d applied frame by frame, so its weights are plain Conv2d weights (NCHW kernels; the
  module permutes channels-last inputs to NCHW for them). attentions.<0..n-2>.* and
  guidance_attention.* are the blocks the official forward never runs:
  `ChampGuidanceEncoder.load_official_state_dict(sd)` drops exactly those (and returns their
  names) and loads the rest strictly. The unused slots of `attentions` are empty `nn.Identity`
  placeholders so that the block that runs keeps its official index.
- `ChampGuidanceFusion`: the guidance encoders are attributes `guidance_encoder_<type>`, as in
  `ChampModel`, so a ChampModel state_dict's `guidance_encoder_<type>.*` entries map one to one
  (`load_official_state_dict` drops the unused blocks there too).
- `champ_fusion` alone: the official `attentions.<n-1>.` prefix stripped.

Deviations:
- Images, not videos: the official modules take (B, C, F, H, W) and fold frames into the batch
  (`InflatedConv3d`, `rearrange("b c f h w -> (b f) c h w")`); here x is channels-last
  (B, H, W, C): fold frames into B before calling.
- Softmax in float32 for half-precision inputs (the official `upcast_attention=False` keeps it in
  fp16); GroupNorm and LayerNorm run in the input dtype, as the official.
- `attn_drop` (dropout on the attention probabilities) is an addition, default 0; the official
  `dropout` (on `to_out` and inside the feed-forward) is `proj_drop` here.
- Zero-initialised output: the official `conv_out` is zeroed (`zero_module`), so a fresh encoder
  outputs 0 (ControlNet-style: training starts from the unconditioned U-Net).
  `ChampGuidanceEncoder(zero_init_out=True)` keeps that default; `False` leaves PyTorch's init.
  The registered `champ_fusion` block has no zero-initialised part (diffusers' Transformer2D
  initialises proj_out normally), so a fresh one is not the identity.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import (check_dims, check_dropout, check_features, check_image, check_positive,
                             check_positive_int)
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import PRIORITY, attention
from attnlab.registry import MechanismSpec, register

NAME = "champ_fusion"


# --- parameter containers with the official (diffusers) names ---------------------------------
# The registered module computes everything itself (its hook points must be its own children);
# these only hold the weights under the names of diffusers' Attention / FeedForward / GEGLU.

class _Attention(nn.Module):
    """diffusers `Attention(query_dim=D, heads=h, dim_head=d)`: to_q, to_k, to_v, to_out.0 (+ to_out.1 dropout)."""

    def __init__(self, width: int, bias: bool, drop: float, factory: dict):
        super().__init__()
        self.to_q = nn.Linear(width, width, bias=bias, **factory)
        self.to_k = nn.Linear(width, width, bias=bias, **factory)
        self.to_v = nn.Linear(width, width, bias=bias, **factory)
        self.to_out = nn.ModuleList([nn.Linear(width, width, **factory), nn.Dropout(drop)])


class _GEGLU(nn.Module):
    """diffusers `GEGLU(D, 4D)`: proj = Linear(D, 8D), value half then gate half."""

    def __init__(self, width: int, hidden: int, factory: dict):
        super().__init__()
        self.proj = nn.Linear(width, 2 * hidden, **factory)


class _FeedForward(nn.Module):
    """diffusers `FeedForward(D, activation_fn="geglu")`: net = [GEGLU, Dropout, Linear(4D, D)]."""

    def __init__(self, width: int, mult: int, drop: float, factory: dict):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(width, mult * width, factory), nn.Dropout(drop),
                                  nn.Linear(mult * width, width, **factory)])


class _TransformerBlock(nn.Module):
    """`TemporalBasicTransformerBlock` without cross or temporal attention: norm1, attn1, norm3, ff."""

    def __init__(self, width: int, bias: bool, mult: int, drop: float, factory: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, **factory)
        self.attn1 = _Attention(width, bias, drop, factory)
        self.norm3 = nn.LayerNorm(width, **factory)
        self.ff = _FeedForward(width, mult, drop, factory)


def _conv1x1(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 Conv2d on channels-last x (..., C_in) -> (..., C_out): a Linear with weight[:, :, 0, 0]."""
    return F.linear(x, conv.weight[:, :, 0, 0], conv.bias)


@register(MechanismSpec(
    name=NAME, paper="Champ: Controllable and Consistent Human Image Animation with 3D Parametric Guidance",
    year=2024, family="softmax", layout="2d",
    time="O(N^2 d h + N C h d + N (h d)^2), N = H W", memory="O(N h d) (sdpa); O(N^2 h) (reference)",
    exact=False, causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2403.14781",
    provenance="official-code",
    source=("fudan-generative-vision/champ models/guidance_encoder.py::GuidanceEncoder (the attentions[-1] "
            "block its forward runs: models/transformer_3d.py::Transformer3DModel with one "
            "models/attention.py::TemporalBasicTransformerBlock, diffusers 0.24 Attention + GEGLU FeedForward); "
            "guidances summed as models/champ_model.py::ChampModel.forward"),
    test_kwargs=dict(norm_num_groups=8, qkv_bias=True)))
class ChampGuidanceAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): GroupNorm, 1x1 in, [self-attention, GEGLU FFN] pre-norm
    residual over the H W tokens, 1x1 out, plus x. Softmax in float32 (float64 for float64 input).

    Hooks (attnlab.hooks): hook_scores and hook_probs on the eager path (`backend="reference"`).
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, head_dim: int | None = None, norm_num_groups: int = 32,
                 ff_mult: int = 4, scale: float | None = None, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if head_dim is None:
            head_dim = check_dims(NAME, dim, num_heads)
        else:
            check_positive_int(NAME, "dim", dim)
            check_positive_int(NAME, "num_heads", num_heads)
            check_positive_int(NAME, "head_dim", head_dim)
        check_positive_int(NAME, "norm_num_groups", norm_num_groups)
        if dim % norm_num_groups:
            raise ValueError(f"{NAME}: norm_num_groups ({norm_num_groups}) must divide dim ({dim})")
        check_positive_int(NAME, "ff_mult", ff_mult)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"{NAME}: qkv_bias must be a bool, got {type(qkv_bias).__name__}")
        if scale is not None:
            scale = check_positive(NAME, "scale", scale)
        if backend is not None and backend not in PRIORITY:
            raise ValueError(f"{NAME}: backend must be one of {PRIORITY} or None, got {backend!r}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.norm_num_groups, self.ff_mult = norm_num_groups, ff_mult
        self.scale, self.backend, self.attn_drop = scale, backend, attn_drop
        inner = self.inner_dim
        self.norm = nn.GroupNorm(norm_num_groups, dim, eps=1e-6, affine=True, **factory)
        self.proj_in = nn.Conv2d(dim, inner, kernel_size=1, **factory)
        self.transformer_blocks = nn.ModuleList([_TransformerBlock(inner, qkv_bias, ff_mult, proj_drop, factory)])
        self.proj_out = nn.Conv2d(inner, dim, kernel_size=1, **factory)
        self.hook_q = HookPoint()        # (B, h, N, d), N = H W
        self.hook_k = HookPoint()        # (B, h, N, d)
        self.hook_v = HookPoint()        # (B, h, N, d)
        self.hook_scores = HookPoint()   # (B, h, N, N), the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, N), the softmax output (eager path only)
        self.hook_out = HookPoint()      # (B, h, N, d), per-head outputs before to_out.0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"norm_num_groups={self.norm_num_groups}")

    def _attend(self, t: Tensor) -> Tensor:
        """attn1 on the normalised tokens t (B, N, h d) -> (B, N, h d)."""
        attn1 = self.transformer_blocks[0].attn1
        B, N, _ = t.shape
        h, d = self.num_heads, self.head_dim
        q = attn1.to_q(t).reshape(B, N, h, d).transpose(1, 2)              # (B, h, N, d)
        k = attn1.to_k(t).reshape(B, N, h, d).transpose(1, 2)              # (B, h, N, d)
        v = attn1.to_v(t).reshape(B, N, h, d).transpose(1, 2)              # (B, h, N, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out = attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0,
                        backend=self.backend, scores_hook=self.hook_scores, probs_hook=self.hook_probs)
        out = self.hook_out(out)                                           # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, h * d)                     # (B, N, h d)
        return attn1.to_out[1](attn1.to_out[0](out))

    def _feed_forward(self, t: Tensor) -> Tensor:
        ff = self.transformer_blocks[0].ff
        value, gate = ff.net[0].proj(t).chunk(2, dim=-1)                   # 2 x (B, N, mult h d)
        return ff.net[2](ff.net[1](value * F.gelu(gate)))                  # (B, N, h d)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        block = self.transformer_blocks[0]
        # GroupNorm on a contiguous NCHW copy: torch 2.13's CPU group_norm backward segfaults on a
        # channels-last-strided input that does not require grad (weights only, e.g. an image batch).
        normed = self.norm(x.permute(0, 3, 1, 2).contiguous())             # (B, C, H, W)
        normed = normed.permute(0, 2, 3, 1)                                # (B, H, W, C)
        t = _conv1x1(normed, self.proj_in).reshape(B, H * W, self.inner_dim)  # (B, N, h d)
        t = t + self._attend(block.norm1(t))
        t = t + self._feed_forward(block.norm3(t))
        y = _conv1x1(t.reshape(B, H, W, self.inner_dim), self.proj_out)    # (B, H, W, C)
        return y + x

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the multiply-adds, for N = seq_len = H W pixels, D = h d.

        Forward: proj_in and proj_out 2 * 2 N C D, q/k/v/to_out 4 * 2 N D^2, scores and weighted
        sum 4 N^2 D, GEGLU feed-forward 2 N D (2 m D) + 2 N (m D) D with m = ff_mult.
        Backward: twice the forward.
        """
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim or num_heads != self.num_heads:
            raise ValueError(f"{NAME}: useful_flops for dim={dim}, num_heads={num_heads} asked of a module "
                             f"with dim={self.dim}, num_heads={self.num_heads}")
        B, N, C, D, m = batch, seq_len, self.dim, self.inner_dim, self.ff_mult
        fwd = B * (4 * N * C * D + 8 * N * D * D + 4 * N * N * D + 4 * m * N * D * D + 2 * m * N * D * D)
        return fwd, 2 * fwd


# --- the full encoder (not registered: its output is (B, H/8, W/8, C_latent)) -----------------

ENCODER = "ChampGuidanceEncoder"


class ChampGuidanceEncoder(nn.Module):
    """One guidance map (B, H, W, C_in) channels-last -> (B, H / 2^k, W / 2^k, C_latent), k the
    number of stride-2 steps (len(block_out_channels) - 1; 3 by default: H/8 for the SD latent).

    The official `GuidanceEncoder` forward: conv_in, SiLU; each conv of `blocks`, SiLU; the last
    attention block (`champ_fusion` at block_out_channels[-1] channels, norm_num_groups=32);
    conv_out (zero-initialised unless zero_init_out=False). Output spatial size: each stride-2
    3x3 conv with padding 1 maps H to ceil(H / 2).
    """

    def __init__(self, guidance_embedding_channels: int, guidance_input_channels: int = 3,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256), attention_num_heads: int = 8, *,
                 zero_init_out: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_positive_int(ENCODER, "guidance_embedding_channels", guidance_embedding_channels)
        check_positive_int(ENCODER, "guidance_input_channels", guidance_input_channels)
        channels = tuple(block_out_channels)
        if len(channels) < 2:
            raise ValueError(f"{ENCODER}: block_out_channels needs at least 2 entries (the official forward "
                             f"runs attentions[-1], which exists from 2 on), got {block_out_channels!r}")
        for c in channels:
            check_positive_int(ENCODER, "block_out_channels entries", c)
        if not isinstance(zero_init_out, bool):
            raise TypeError(f"{ENCODER}: zero_init_out must be a bool, got {type(zero_init_out).__name__}")
        factory = dict(device=device, dtype=dtype)
        self.guidance_input_channels = guidance_input_channels
        self.guidance_embedding_channels = guidance_embedding_channels
        self.block_out_channels = channels
        self.conv_in = nn.Conv2d(guidance_input_channels, channels[0], 3, padding=1, **factory)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1, **factory))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2, **factory))
        # The official builds one attention per conv and runs only the last; the others are
        # parameter-free placeholders that keep the last at its official index.
        n = len(self.blocks)
        self.attentions = nn.ModuleList([nn.Identity() for _ in range(n - 1)])
        self.attentions.append(ChampGuidanceAttention2d(channels[-1], attention_num_heads, norm_num_groups=32,
                                                        backend=backend, **factory))
        self.conv_out = nn.Conv2d(channels[-1], guidance_embedding_channels, 3, padding=1, **factory)
        if zero_init_out:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @property
    def attention(self) -> ChampGuidanceAttention2d:
        """The attention block the forward runs (attentions[-1])."""
        return self.attentions[-1]

    def unused_official_keys(self, state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
        """Keys of an official GuidanceEncoder state_dict (under `prefix`) that belong to the blocks
        its forward never runs: attentions.<0..n-2>.* and guidance_attention.*."""
        last = len(self.attentions) - 1
        unused = []
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.startswith("guidance_attention."):
                unused.append(key)
            elif rest.startswith("attentions."):
                index = rest.split(".", 2)[1]
                if index.isdigit() and int(index) != last:
                    unused.append(key)
        return unused

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load an official `guidance_encoder_<type>.pth` state_dict strictly, after dropping the
        weights of the blocks its forward never runs; returns the dropped keys."""
        unused = set(self.unused_official_keys(state_dict))
        self.load_state_dict({k: v for k, v in state_dict.items() if k not in unused}, strict=True)
        return sorted(unused)

    def forward(self, condition: Tensor) -> Tensor:
        check_image(ENCODER, condition, self.guidance_input_channels, what="condition")
        e = F.silu(self.conv_in(condition.permute(0, 3, 1, 2)))            # (B, 16, H, W)
        for conv in self.blocks:
            e = F.silu(conv(e))                                            # (B, c, H', W')
        e = self.attention(e.permute(0, 2, 3, 1))                          # (B, H', W', c_last) channels-last
        e = self.conv_out(e.permute(0, 3, 1, 2))                           # (B, C_latent, H', W')
        return e.permute(0, 2, 3, 1)                                       # (B, H', W', C_latent)


FUSION = "ChampGuidanceFusion"


class ChampGuidanceFusion(nn.Module):
    """Several guidance maps -> the sum of their encodings (B, H/8, W/8, C_latent), as ChampModel.

    `guidance_types` names one encoder each, stored as `guidance_encoder_<type>` (ChampModel's
    attribute names, so its state_dict keys map one to one). forward takes either one tensor
    (B, H, W, sum C_in) whose channels are the guidances concatenated in `guidance_types` order
    (ChampModel.forward splits `multi_guidance_cond` the same way, along its channel axis), or
    a mapping {type: (B, H, W, C_in)} with every type. The official inference defaults: four
    types (depth, normal, semantic_map, dwpose), 3 input channels each, C_latent = 320.
    """

    def __init__(self, guidance_types: Sequence[str] = ("depth", "normal", "semantic_map", "dwpose"),
                 guidance_embedding_channels: int = 320, guidance_input_channels: int | Sequence[int] = 3,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256), attention_num_heads: int = 8, *,
                 zero_init_out: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        types = [guidance_types] if isinstance(guidance_types, str) else list(guidance_types)
        if not types or any(not isinstance(t, str) or not t.isidentifier() for t in types) or len(set(types)) != len(types):
            raise ValueError(f"{FUSION}: guidance_types must be distinct identifiers, at least one, "
                             f"got {guidance_types!r}")
        if isinstance(guidance_input_channels, int) and not isinstance(guidance_input_channels, bool):
            in_channels = [guidance_input_channels] * len(types)
        else:
            in_channels = list(guidance_input_channels)
            if len(in_channels) != len(types):
                raise ValueError(f"{FUSION}: guidance_input_channels has {len(in_channels)} entries for "
                                 f"{len(types)} guidance types {types}")
        self.guidance_types = types
        self.guidance_input_channels = in_channels
        for t, c in zip(types, in_channels):
            setattr(self, f"guidance_encoder_{t}",
                    ChampGuidanceEncoder(guidance_embedding_channels, c, block_out_channels, attention_num_heads,
                                         zero_init_out=zero_init_out, backend=backend, device=device, dtype=dtype))

    def encoder(self, guidance_type: str) -> ChampGuidanceEncoder:
        return getattr(self, f"guidance_encoder_{guidance_type}")

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load the `guidance_encoder_<type>.*` entries of a ChampModel state_dict (other keys, e.g.
        the U-Nets', are ignored), dropping the weights of blocks the official forward never runs;
        returns the dropped guidance-encoder keys."""
        dropped = []
        for t in self.guidance_types:
            prefix = f"guidance_encoder_{t}."
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            dropped += [prefix + k for k in self.encoder(t).load_official_state_dict(sub)]
        return dropped

    def forward(self, guidance: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(guidance, Mapping):
            missing = [t for t in self.guidance_types if t not in guidance]
            extra = sorted(set(guidance) - set(self.guidance_types))
            if missing or extra:
                raise ValueError(f"{FUSION}: expected guidances {self.guidance_types}, missing {missing}, "
                                 f"unknown {extra}")
            parts = [guidance[t] for t in self.guidance_types]
        else:
            check_image(FUSION, guidance, sum(self.guidance_input_channels), what="guidance")
            parts = torch.split(guidance, self.guidance_input_channels, dim=-1)   # each (B, H, W, C_in)
        encoded = [self.encoder(t)(part) for t, part in zip(self.guidance_types, parts)]
        shapes = {tuple(e.shape) for e in encoded}
        if len(shapes) != 1:
            raise ValueError(f"{FUSION}: the guidances encode to different shapes {sorted(shapes)}; "
                             "give every guidance map the same batch, height and width")
        return torch.stack(encoded, dim=0).sum(0)                          # (B, H', W', C_latent)
