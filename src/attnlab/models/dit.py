"""A small class-conditional diffusion transformer (DiT) over any registered sequence mechanism.

Paper: Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023), Sec. 3.2, Fig. 3
(the adaLN-Zero block); the architecture as facebookresearch/DiT models.py (`DiT`, `DiTBlock`,
`FinalLayer`, `TimestepEmbedder`, `LabelEmbedder`, 2-D sin-cos positions from MAE).
Status: patchify (a p x p stride-p convolution), fixed 2-D sin-cos or learned positions,
sinusoidal timestep embedding -> MLP, a class table with a null class for classifier-free
guidance, adaLN-Zero blocks whose attention is `attnlab.create(mechanism, ...)`, the final
adaLN layer and unpatchify; DiT's initialisation (Xavier-uniform Linears, the modulation and
output layers at zero, N(0, 0.02) label table and timestep MLP).
Deviations: learn-sigma is off (the output is the noise prediction only, `out_channels ==
in_channels`); the null class always exists (index `num_classes`) and label dropout for
classifier-free guidance is the caller's (`drop_labels`, with an explicit generator) instead of
a global-RNG draw inside `forward`; a DiT block may use any 'seq' mechanism.

    dit = DiT(input_size=28, patch_size=4, in_channels=1, dim=64, num_heads=4, layers=4, num_classes=10)
    eps = dit(x_t, t, y)                    # x_t (B, 1, 28, 28), t (B,), y (B,) -> (B, 1, 28, 28)
    sched = NoiseSchedule()                  # DDPM's linear betas, T = 1000
    loss = sched.loss(dit, x0, y, generator=g)

Hook points for `attnlab.probes.capture`: the model has `.blocks` (an nn.ModuleList of
`DiTBlock`s with `.attn` and `.mlp`), and each block carries `hook_attn_out` / `hook_mlp_out`,
the gated branches it adds to the residual stream (gate * attn(...), gate * mlp(...)), so that
capture's `blocks.{l}.hook_attn_out` is what the attention adds to the residual, as on the
other models.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.hooks import HookPoint
from attnlab.models.transformer import LayerSpec, Mlp, parse_layer
from attnlab.registry import MechanismSpec, create, get_spec


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, C) * (1 + scale (B, C)) + shift (B, C), per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim) float32:
    [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim/2)), i < dim/2 (DiT's, from GLIDE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions (MAE's, as DiT uses) for a grid x grid patch map -> (grid*grid, dim).

    Token n = (row r, column c), row-major. The first dim/2 channels encode c, the last dim/2
    encode r, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4)), k < dim/4."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D positions need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))   # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")                                        # (grid, grid) each

    def one(pos: Tensor) -> Tensor:                                                  # (n,) -> (n, dim/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()                           # (grid*grid, dim)


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT Fig. 3, right). x (B, N, C), c (B, C) -> (B, N, C):

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)
        x = x + gate1 * attn(modulate(LN(x), shift1, scale1))
        x = x + gate2 * mlp(modulate(LN(x), shift2, scale2))

    LayerNorms without affine parameters (eps 1e-6), MLP with tanh-GELU, attention with qkv bias.
    With the modulation Linear at zero (the adaLN-Zero initialisation) every gate is 0 and the
    block is the identity.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mechanism: LayerSpec = "mhsa",
                 mechanism_options: dict | None = None, mlp_ratio: float = 4.0, act: str = "gelu_tanh"):
        super().__init__()
        name, options = parse_layer(mechanism)
        options.update(mechanism_options or {})
        spec = get_spec(name)
        if spec.layout != "seq":
            raise ValueError(f"DiTBlock needs a sequence mechanism (layout 'seq'), {name!r} has layout {spec.layout!r}")
        if "qkv_bias" in spec.options():
            options.setdefault("qkv_bias", True)                      # DiT: timm Attention(qkv_bias=True)
        if not mlp_ratio > 0:
            raise ValueError(f"DiTBlock: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.mechanism = name
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = create(name, dim, num_heads, **options)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.hook_attn_out = HookPoint()    # (B, N, C), gate1 * attn(...): what the attention adds
        self.hook_mlp_out = HookPoint()     # (B, N, C), gate2 * mlp(...): what the MLP adds

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)   # 6 x (B, C)
        x = x + self.hook_attn_out(gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.hook_mlp_out(gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """LN -> modulate(shift, scale from c) -> Linear to p*p*out_channels per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))      # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Class-conditional DiT predicting the noise: forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C, H, W).

    t: diffusion timesteps (integers or floats, as the NoiseSchedule's 0..T-1); y: class ids in
    [0, num_classes], where `null_class` (= num_classes) is the unconditional label of
    classifier-free guidance. layers: an int (that many "mhsa" blocks) or a list of layer specs
    (see attnlab.models.transformer.parse_layer). pos: "sincos" (fixed, DiT) or "learned".
    """

    def __init__(self, input_size: int = 28, patch_size: int = 4, in_channels: int = 1, dim: int = 64,
                 num_heads: int = 4, layers: int | Sequence[LayerSpec] = 4, *, num_classes: int = 10,
                 mlp_ratio: float = 4.0, pos: str = "sincos", freq_dim: int = 256):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DiT: patch_size {patch_size} must divide input_size {input_size}")
        if pos not in ("sincos", "learned"):
            raise ValueError(f"DiT: pos must be 'sincos' or 'learned', got {pos!r}")
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"DiT: layers must be a positive int or a list of layers, got {layers}")
            layers = ["mhsa"] * layers
        elif isinstance(layers, (str, dict, MechanismSpec)):
            raise TypeError(f"DiT: layers must be an int or a list of layers, got a single {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError("DiT: layers must not be empty")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels                                     # learn_sigma=False
        self.dim, self.num_heads, self.num_classes = dim, num_heads, num_classes
        self.null_class = num_classes
        self.grid = input_size // patch_size
        self.num_patches = self.grid ** 2
        self.freq_dim = freq_dim
        self.x_embedder = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(num_classes + 1, dim)                # + the null class
        if pos == "sincos":
            self.register_buffer("pos_embed", sincos_2d(dim, self.grid)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mechanism=layer, mlp_ratio=mlp_ratio) for layer in layers)
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels)
        self.initialize_weights(learned_pos=pos == "learned")

    def initialize_weights(self, *, learned_pos: bool = False) -> None:
        """DiT's initialisation: Xavier-uniform Linears with zero bias (the mechanisms' too), the
        patch convolution Xavier-uniform as a Linear, N(0, 0.02) labels and timestep MLP, and the
        adaLN modulations and the output Linear at zero (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if learned_pos:
            nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    @property
    def layer_names(self) -> list[str]:
        return [b.mechanism for b in self.blocks]

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> tokens (B, N, dim), N = (H/p)(W/p) row-major, positions added."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"DiT: expected x (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed     # (B, N, dim)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W): token n = (row, col), its p*p*C values laid out (p_row, p_col, C)."""
        B, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid
        x = x.reshape(B, g, g, p, p, c)                                        # (B, h, w, p, q, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                                  # (B, C, h, p, w, q)
        return x.reshape(B, c, g * p, g * p)

    def condition(self, t: Tensor, y: Tensor) -> Tensor:
        """c = MLP(timestep embedding(t)) + label table[y], (B, dim)."""
        if y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
            raise ValueError(f"DiT: y must be (B,) class ids (int64), got {tuple(y.shape)} {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"DiT: class ids must lie in [0, {self.num_classes}] ({self.num_classes} = null), "
                             f"got [{int(y.min())}, {int(y.max())}]")
        temb = self.t_embedder(timestep_embedding(t, self.freq_dim).to(self.t_embedder[0].weight.dtype))
        return temb + self.y_embedder(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"DiT: t and y must be (B,) = ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        h = self.patchify(x)                                                   # (B, N, dim)
        c = self.condition(t, y)                                               # (B, dim)
        for block in self.blocks:
            h = block(h, c)                                                    # (B, N, dim)
        return self.unpatchify(self.final_layer(h, c))                         # (B, C, H, W)

    def drop_labels(self, y: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """y with each label replaced by the null class with probability p (classifier-free guidance
        training, Ho & Salimans 2022; DiT's LabelEmbedder.token_drop)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop_labels: p must lie in [0, 1], got {p}")
        drop = torch.rand(y.shape, generator=generator, device=y.device) < p
        return torch.where(drop, torch.full_like(y, self.null_class), y)


class NoiseSchedule:
    """The DDPM forward process (Ho, Jain & Abbeel 2020, Sec. 2 and 4): betas linear from beta_1 to
    beta_T over T steps, alpha_bar_t = prod_{s <= t} (1 - beta_s), indices t = 0..T-1.

    q_sample: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4).
    loss: E || eps - eps_theta(x_t, t, y) ||^2 with t uniform (Eq. 14, the simple loss).
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"NoiseSchedule: need timesteps >= 1 and 0 < beta_start <= beta_end < 1, got "
                             f"{timesteps}, {beta_start}, {beta_end}")
        self.timesteps = timesteps
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)               # (T,) float64

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        ab = self.alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y), noise)


__all__ = ["DiT", "DiTBlock", "FinalLayer", "NoiseSchedule", "modulate", "timestep_embedding", "sincos_2d"]
