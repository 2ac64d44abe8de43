"""Ultra-Lightweight Subspace Attention Module (`ulsam`).

Paper: ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural
Networks (Rajat Saini, Nandan Kumar Jha, Bedanta Das, Sparsh Mittal, C. Krishna Mohan;
WACV 2020, arXiv 2006.15102).

The channels are split into g subspaces (groups) F_1 ... F_g of C / g channels each. Every
subspace infers one spatial attention map from its own channels and re-weights itself:

    a_n = MaxPool3x3,s1,p1(ReLU(BN(DWConv1x1(F_n))))        (C/g, H, W)
    A_n = softmax_{H W}(ReLU(BN(PWConv1x1 C/g -> 1 (a_n))))   (1, H, W), sums to 1 over the pixels
    out_n = F_n * A_n + F_n                                    A_n broadcast over the C/g channels

and the outputs are concatenated along the channels in order.

Status: official-code, Nandan91/ULSAM `ulsam.py::SubSpace` and `::ULSAM`, vectorised: the g
subspaces run as one depth-wise conv over all C channels (a 1 x 1 depth-wise conv acts on each
channel alone, so g of them over C / g channels are one over C), one BatchNorm over C, one
grouped 1 x 1 conv C -> g with groups=g and one BatchNorm over g, instead of a loop over g
modules. The softmax runs in float32 (float64 for float64 input) and is cast back.
Layout: x (B, H, W, C) channels-last -> (B, H, W, C); the module permutes to NCHW for the
convolutions and back. Any H, W >= 1. Not supported: causal attention, attn_mask, KV cache
(check_features refuses them with NotImplementedError).

Parameters: `conv_dws` (C, 1, 1, 1) + bias (C,); `bn_dws` BatchNorm2d(C); `conv_point`
(g, C/g, 1, 1) + bias (g,); `bn_point` BatchNorm2d(g). PyTorch's default initialisation, as
the official module (it sets none).
Options: `groups` (the paper's g, the official `num_splits`); None (default) uses `num_heads`,
so that `create("ulsam", dim, num_heads)` splits the channels into one subspace per "head".
C must be divisible by g.

Deviations / readings chosen:
- BatchNorm momentum: the official code passes momentum=0.9, the Keras convention (keep 0.9 of
  the running average). In PyTorch the momentum is the weight of the new batch, so 0.9 makes the
  running statistics track mostly the last batch. PyTorch's default 0.1 (= Keras' 0.9) is used.
- The official ULSAM's `nout`, `h`, `w` arguments are stored and never used; there are none here.
- `attn_drop` (dropout on the attention maps A) and `proj_drop` (dropout on the output) are not
  in the official code; both default to 0, the official computation.
- The official file sets `torch.set_default_tensor_type(torch.cuda.FloatTensor)` at import; not
  here (device and dtype are the constructor's `device=`, `dtype=`).
- Training-mode BatchNorm normalises over the batch (as in the official code); the contract
  suite and the comparisons run in eval mode, where the running statistics apply per sample.

Checkpoint key map (official ULSAM(nin, nout, h, w, num_splits) -> this module, g = num_splits;
`convert_official_state_dict` does it): concatenate over the subspaces i = 0 .. g-1, in order,
along dim 0:
  subspaces.{i}.conv_dws.weight (C/g, 1, 1, 1) -> conv_dws.weight (C, 1, 1, 1), .bias likewise;
  subspaces.{i}.bn_dws.{weight,bias,running_mean,running_var} (C/g,) -> bn_dws.* (C,);
  subspaces.{i}.conv_point.weight (1, C/g, 1, 1) -> conv_point.weight (g, C/g, 1, 1), .bias (1,) -> (g,);
  subspaces.{i}.bn_point.{weight,bias,running_mean,running_var} (1,) -> bn_point.* (g,);
  subspaces.{i}.bn_*.num_batches_tracked -> bn_*.num_batches_tracked (the same in every subspace;
  subspace 0's is kept). Weights are NCHW conv weights in both; no permute.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab._checks import check_dropout, check_features, check_image, check_positive_int
from attnlab.hooks import HookPoint
from attnlab.registry import MechanismSpec, register

NAME = "ulsam"


_OFFICIAL_KEY = re.compile(r"^(?P<prefix>.*?)subspaces\.(?P<i>\d+)\.(?P<rest>(conv_dws|bn_dws|conv_point|bn_point)\..+)$")


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official ULSAM state dict (`subspaces.{i}.conv_dws.weight`, ...) -> this module's keys.

    Tensors of the g subspaces are concatenated along dim 0 in subspace order;
    `num_batches_tracked` is taken from subspace 0. Keys before `subspaces.` (a prefix such as
    `layer3.ulsam.`) must be the same for every entry and are dropped; other keys are refused.
    """
    groups: dict[str, dict[int, Tensor]] = {}
    prefixes = set()
    for key, value in state_dict.items():
        match = _OFFICIAL_KEY.match(key)
        if match is None:
            raise ValueError(f"{NAME}: {key!r} is not an official ULSAM key "
                             "(expected [prefix]subspaces.<i>.<conv_dws|bn_dws|conv_point|bn_point>.<name>)")
        prefixes.add(match["prefix"])
        groups.setdefault(match["rest"], {})[int(match["i"])] = value
    if len(prefixes) > 1:
        raise ValueError(f"{NAME}: the state dict mixes prefixes {sorted(prefixes)}; convert one ULSAM at a time")
    out = {}
    for rest, by_index in groups.items():
        order = sorted(by_index)
        if order != list(range(len(order))):
            raise ValueError(f"{NAME}: subspaces {order} hold {rest!r}; expected 0 .. {len(order) - 1}")
        if rest.endswith("num_batches_tracked"):
            out[rest] = by_index[0]
        else:
            out[rest] = torch.cat([by_index[i] for i in order], dim=0)
    return out


@register(MechanismSpec(
    name=NAME, paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    year=2020, family="conv", layout="2d", time="O(N C)", memory="O(N C)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=(), url="https://arxiv.org/abs/2006.15102",
    provenance="official-code",
    source="Nandan91/ULSAM ulsam.py::SubSpace and ::ULSAM (vectorised over the subspaces; BN momentum 0.1)",
    test_kwargs=dict(), test_configs=(dict(groups=1), dict(groups=8))))
class ULSAMAttention2d(nn.Module):
    """x (B, H, W, C) -> (B, H, W, C): each of g channel groups times its own spatial softmax map, plus itself.

    Hooks (attnlab.hooks): `hook_scores` (B, g, H W) the softmax input (after the last ReLU),
    `hook_probs` (B, g, H W) the attention maps A (each row sums to 1), `hook_out` (B, H, W, C)
    the output (there is no output projection). No q, k, v (`absent_hooks`).
    """

    hook_names = ("hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ()
    absent_hooks = {n: "ULSAM has no queries, keys or values: each subspace's own features, through a "
                       "depth-wise and a point-wise 1x1 conv, give its softmax map (hook_scores)"
                    for n in ("hook_q", "hook_k", "hook_v")}

    def __init__(self, dim: int, num_heads: int = 8, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 groups: int | None = None, device=None, dtype=None):
        super().__init__()
        check_positive_int(NAME, "dim", dim)
        check_positive_int(NAME, "num_heads", num_heads)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        groups = num_heads if groups is None else check_positive_int(NAME, "groups", groups)
        if dim % groups:
            what = "num_heads (the default groups)" if groups == num_heads else "groups"
            raise ValueError(f"{NAME}: dim ({dim}) must be divisible by {what} ({groups})")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.groups = dim, num_heads, groups
        self.conv_dws = nn.Conv2d(dim, dim, 1, groups=dim, **factory)
        self.bn_dws = nn.BatchNorm2d(dim, **factory)
        self.conv_point = nn.Conv2d(dim, groups, 1, groups=groups, **factory)
        self.bn_point = nn.BatchNorm2d(groups, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_scores = HookPoint()   # (B, g, H W), softmax input
        self.hook_probs = HookPoint()    # (B, g, H W), attention maps, rows sum to 1
        self.hook_out = HookPoint()      # (B, H, W, C), the output

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache=None) -> Tensor:
        check_image(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, H, W, C = x.shape
        g = self.groups
        f = x.permute(0, 3, 1, 2)                                          # (B, C, H, W)
        a = F.relu(self.bn_dws(self.conv_dws(f)))                          # (B, C, H, W)
        a = F.max_pool2d(a, kernel_size=3, stride=1, padding=1)            # (B, C, H, W)
        a = F.relu(self.bn_point(self.conv_point(a)))                      # (B, g, H, W)
        scores = self.hook_scores(a.reshape(B, g, H * W))                  # (B, g, H W)
        probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(x.dtype)
        probs = self.attn_drop(self.hook_probs(probs))                     # (B, g, H W)
        # Each group's map multiplies its C/g channels: channels-last x (B, H, W, g, C/g).
        xg = x.reshape(B, H, W, g, C // g)                                 # (B, H, W, g, C/g)
        A = probs.reshape(B, g, H, W).permute(0, 2, 3, 1)[..., None]       # (B, H, W, g, 1)
        out = (xg * A + xg).reshape(B, H, W, C)                            # (B, H, W, C)
        return self.proj_drop(self.hook_out(out))

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int,
                     causal: bool) -> tuple[int, int]:
        """2 x the two 1 x 1 convolutions' multiply-adds over N = seq_len pixels (C each: the
        depth-wise one, and the grouped C -> g one), what FlopCounterMode counts; pooling, the
        softmax and the re-weighting (O(N C) too) are left out. Backward: twice the forward."""
        if causal:
            raise NotImplementedError(f"mechanism {NAME!r} does not support causal")
        if dim != self.dim:
            raise ValueError(f"{NAME}: useful_flops for dim={dim} asked of a module with dim={self.dim}")
        fwd = 2 * batch * seq_len * self.dim * 2
        return fwd, 2 * fwd


__all__ = ["ULSAMAttention2d", "convert_official_state_dict"]
