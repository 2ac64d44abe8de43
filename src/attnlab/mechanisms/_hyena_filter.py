"""The pieces of Hyena's implicit long filter that `hyena` (1-D) and `hyena2d` (HyenaND) share.

Written after HazyResearch/safari `standalone_hyena.py` (Sin, PositionalEmbedding,
ExponentialModulation, HyenaFilter.implicit_filter), which Itamarzimm/HyenaND `hyena2d.py` copies.
Attribute names are the official ones so that official state_dicts load unchanged:

- `PositionalEmbedding.z` (1, l_max, emb_dim): [t, Re exp(-i f w), Im exp(-i f w)] with
  t = linspace(0, 1, l_max), w = 2 pi k / l_max (k = 0 .. l_max - 1) and `bands = (emb_dim - 1) / 2`
  frequencies f = linspace(1e-4, bands - 1, bands). A *parameter* in the official code (it is
  registered with lr_pos_emb = 1e-5, not 0); `learn=False` makes it a buffer (the official
  lr_pos_emb=0). `t` (1, l_max, 1) is a buffer.
- `Sin.freq` (1, width): sin(freq * x), initialised to w. The official MLP reuses ONE Sin module
  after every Linear (so one freq vector), which `implicit_mlp` keeps: state_dict holds the same
  tensor under `implicit_filter.1.freq`, `.3.freq`, `.5.freq`, as the official one does.
- `ExponentialModulation.deltas` (1, 1, D): linspace(log(target) / slow_decay_pct,
  log(target) / fast_decay_pct, D); the filter is multiplied by exp(-t |deltas|) + shift. A
  buffer in the official default (modulation_lr = 0), a parameter with `learn_deltas=True`.

The official OptimModule also tags these tensors with per-parameter optimizer hints (`_optim`:
lr 1e-3 and weight decay 0 for the filter MLP, lr 1e-5 for z) that the safari trainer reads;
attnlab's trainer has no such hook and they are not set here (see the mechanism docstrings).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the filters and FFTs run in: float64 for float64, else float32 (torch.fft has
    no bfloat16, and half FFTs need power-of-two sizes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positional_features(emb_dim: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(z (1, seq_len, emb_dim), t (1, seq_len, 1)) in float64, as safari's PositionalEmbedding."""
    bands = (emb_dim - 1) // 2
    t = torch.linspace(0, 1, seq_len, dtype=torch.float64)[None, :, None]               # (1, L, 1)
    w = 2 * math.pi * torch.arange(seq_len, dtype=torch.float64)[None, :, None] / seq_len  # (1, L, 1)
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]          # (1, 1, bands)
    # exp(-i f w) = cos(f w) - i sin(f w)
    z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)                      # (1, L, emb_dim)
    return z, t


class Sin(nn.Module):
    """sin(freq * x) with a learned frequency per feature (safari `Sin`, train_freq=True)."""

    def __init__(self, dim: int, w: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(w), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """z (1, l_max, emb_dim), the implicit filter's input, and t (1, l_max, 1) in [0, 1]."""

    def __init__(self, emb_dim: int, seq_len: int, *, learn: bool = True, device=None, dtype=None):
        super().__init__()
        self.seq_len = seq_len
        z, t = positional_features(emb_dim, seq_len)
        z = z.to(device=device, dtype=dtype or torch.get_default_dtype())
        t = t.to(device=device, dtype=dtype or torch.get_default_dtype())
        if learn:
            self.z = nn.Parameter(z)
        else:
            self.register_buffer("z", z)
        self.register_buffer("t", t)


class ExponentialModulation(nn.Module):
    """h -> h * (exp(-t |deltas|) + shift) per channel (safari `ExponentialModulation`).

    `register_deltas=False` (HyenaND window_mode "no") keeps no deltas at all; `learn_shift=True`
    (HyenaND window_mode "learn") makes shift a (1, 1, D) parameter initialised uniform in [0, 1).
    """

    def __init__(self, d_model: int, *, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, modulate: bool = True, shift: float = 0.0,
                 learn_deltas: bool = False, learn_shift: bool = False, register_deltas: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.modulate = modulate
        dtype = dtype or torch.get_default_dtype()
        if register_deltas:
            max_decay = math.log(target) / fast_decay_pct
            min_decay = math.log(target) / slow_decay_pct
            deltas = torch.linspace(min_decay, max_decay, d_model, dtype=torch.float64)[None, None]  # (1, 1, D)
            deltas = deltas.to(device=device, dtype=dtype)
            if learn_deltas:
                self.deltas = nn.Parameter(deltas)
            else:
                self.register_buffer("deltas", deltas)
        if learn_shift:
            self.shift = nn.Parameter(torch.rand(1, 1, d_model, device=device, dtype=dtype))
        else:
            self.shift = float(shift)

    def window(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """(1, L, D): exp(-t |deltas|), in `dtype`."""
        return torch.exp(-t.to(dtype) * self.deltas.to(dtype).abs())

    def shift_as(self, dtype: torch.dtype):
        return self.shift.to(dtype) if isinstance(self.shift, Tensor) else self.shift

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        """h (1, L, D) modulated along L (t (1, L, 1))."""
        if not self.modulate:
            return h
        return h * (self.window(t, h.dtype) + self.shift_as(h.dtype))


def implicit_mlp(in_dim: int, width: int, out_dim: int, num_inner_mlps: int, act: Sin,
                 *, device=None, dtype=None) -> nn.Sequential:
    """Linear(in, width), act, [Linear(width, width), act] * num_inner_mlps, Linear(width, out, no bias),
    the one `act` module reused after every hidden Linear (as the official code)."""
    factory = dict(device=device, dtype=dtype)
    layers: list[nn.Module] = [nn.Linear(in_dim, width, **factory), act]
    for _ in range(num_inner_mlps):
        layers += [nn.Linear(width, width, **factory), act]
    layers.append(nn.Linear(width, out_dim, bias=False, **factory))
    return nn.Sequential(*layers)


def run_mlp(mlp: nn.Sequential, z: Tensor, dtype: torch.dtype) -> Tensor:
    """The implicit MLP on z, every parameter cast to `dtype` (float32 for a bfloat16 module)."""
    h = z.to(dtype)
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype))
        else:
            h = torch.sin(layer.freq.to(dtype) * h)
    return h
