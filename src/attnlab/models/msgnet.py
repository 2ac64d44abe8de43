"""MSGNet: multi-scale inter-series correlations for multivariate time-series forecasting.

Paper: Cai, Wang, Chen, Zheng, Xie, Kong & Chen, "MSGNet: Learning Multi-Scale Inter-Series
Correlations for Multivariate Time Series Forecasting", AAAI 2024 (arXiv 2401.00423).
Official code: YoZhibo/MSGNet, `models/MSGNet.py` (Model, ScaleGraphBlock, FFT_for_Period),
`layers/MSGBlock.py` (GraphBlock, mixprop, Attention_Block, self_attention, FullAttention, Predict)
and `layers/Embed.py` (DataEmbedding with embed="timeF"); hyper-parameters from `scripts/ETTh1.sh`
and the defaults of `run_longExp.py`.
Status: the official forward, module for module, with attnlab's registered mechanisms in place of
its attention (default "mhsa" with the official q/k/v/o biases, 0.1 attention dropout and causal
mask), so any sequence mechanism can be swapped in by name.

    model = MSGNet(seq_len=96, pred_len=96, enc_in=7, d_model=32, d_ff=64, top_k=3, e_layers=1)
    y = model(x, x_mark)        # x (B, 96, 7) standardised values, x_mark (B, 96, 4) time features

The forward (what the official code does, ours where marked):
  1. per-window instance normalisation (Non-stationary Transformer): subtract the window mean,
     divide by sqrt(var + 1e-5) (biased variance); undone on the output.
  2. embedding: Conv1d(enc_in -> d_model, k=3, circular padding, no bias; kaiming-normal init) of the
     values + Linear(4 -> d_model, no bias) of the time features + sinusoidal positions; dropout.
  3. e_layers x (ScaleGraphBlock -> the shared LayerNorm).
     ScaleGraphBlock(x (B, T, d)): the top-k frequencies of |rfft(x)| over time (DC excluded) give
     periods p_i = T // f_i and weights = the mean amplitude of f_i per sample. For scale i (in order):
     x <- GraphBlock_i(x) (the official code overwrites x, so the graph blocks run in sequence and the
     residual below adds the LAST one's output); pad x with zeros to a multiple of p_i, fold it into
     (B * T'/p_i, p_i, d), run Attention_Block -> LayerNorm -> GELU over each period's p_i steps,
     unfold and cut to T. Output: sum_i softmax_i(weights) * out_i + x.
     GraphBlock(x): A = softmax_rows(ReLU(E1 E2)) with E1 (c_out, node_dim), E2 (node_dim, c_out);
     Conv2d(1 -> conv_channel, kernel (d_model - c_out + 1, 1)) turns the d_model rows into c_out
     nodes; mixprop (depth gcn_depth: h <- alpha x + (1 - alpha) D^-1 (A + I) h, outputs of every
     depth concatenated, 1x1 Conv2d -> skip_channel); GELU; Conv2d(skip_channel -> seq_len, kernel
     (1, seq_len)); Linear(c_out -> d_model); LayerNorm(x + out).
     Attention_Block(x): x + dropout(attention(x)) -> LayerNorm -> position-wise FFN (kernel-1 convs,
     here Linear: the same map) d_model -> d_ff -> d_model with GELU and dropout -> LayerNorm(x + y).
  4. Linear(d_model -> c_out), then Linear(seq_len -> pred_len) over time per variate (+ dropout).

Deviations (each stated, each with an option back to the official behaviour where it matters):
  - periods: the official FFT_for_Period averages the amplitudes over the BATCH, so a window's
    periods depend on which windows share its batch (and on the batch size at test time). Default
    here: per-sample periods (`periods="sample"`); `periods="batch"` is the official behaviour. The
    per-scale weights are per sample in both (as in the official code).
  - `predict_linear` (Linear(seq_len, seq_len + pred_len)) is built by the official Model but never
    used in its forward; it is omitted (the official parameter count is larger by its size).
  - GraphBlock's `.squeeze()` in the official code also drops the batch axis when B = 1; here only
    the kernel-1 axis is squeezed.
  - mixprop stores a dropout rate it never applies; so do we (no dropout there).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

PERIODS = ("sample", "batch")

# The official scripts/ETTh1.sh per horizon (look-back 96; every run: top_k 3, conv/skip channels 32,
# dropout 0.1, 8 heads, batch 32, Adam lr 1e-4 halved every epoch, 10 epochs, early stopping patience 3).
ETTH1_CONFIGS = {96: dict(d_model=32, d_ff=64, e_layers=1), 192: dict(d_model=32, d_ff=64, e_layers=1),
                 336: dict(d_model=32, d_ff=64, e_layers=2), 720: dict(d_model=16, d_ff=32, e_layers=1)}
# MSGNet's Table 1, ETTh1 (MSE, MAE) per horizon, for MSGNet and the DLinear row beside it.
ETTH1_PAPER = {"msgnet": {96: (0.390, 0.411), 192: (0.442, 0.442), 336: (0.480, 0.468), 720: (0.494, 0.488)},
               "dlinear": {96: (0.386, 0.400), 192: (0.437, 0.432), 336: (0.481, 0.459), 720: (0.519, 0.516)}}


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim) sin on even, cos on odd channels (Embed.py's PositionalEmbedding)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)                   # (L, 1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class DataEmbedding(nn.Module):
    """values (B, T, c_in), time features (B, T, n_time) or None -> (B, T, d_model)."""

    def __init__(self, c_in: int, d_model: int, *, n_time: int = 4, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.value = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.value.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.time = nn.Linear(n_time, d_model, bias=False) if n_time else None
        self.register_buffer("pe", sinusoidal_positions(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, x_mark: Tensor | None = None) -> Tensor:
        out = self.value(x.transpose(1, 2)).transpose(1, 2)                         # (B, T, d)
        if x_mark is not None:
            if self.time is None:
                raise ValueError("DataEmbedding: built with n_time=0, got time features")
            out = out + self.time(x_mark)
        return self.drop(out + self.pe[: x.shape[1]])


def fft_periods(x: Tensor, k: int, mode: str = "sample") -> tuple[Tensor, Tensor]:
    """(periods (B, k) int64, amplitude weights (B, k)) of x (B, T, C): the top-k rfft frequencies
    f (DC excluded) of the amplitude averaged over channels, per sample ("sample") or over the batch
    too ("batch", the official FFT_for_Period); periods = T // f."""
    B, T, _ = x.shape
    amp = torch.fft.rfft(x, dim=1).abs().mean(-1)                                  # (B, F)
    if k > amp.shape[1] - 1:
        raise ValueError(f"fft_periods: top_k={k} needs more than {k} non-DC frequencies, a window of T={T} "
                         f"has {amp.shape[1] - 1}")
    if mode == "sample":
        score = amp.detach().clone()
        score[:, 0] = 0
        top = score.topk(k, dim=1).indices                                         # (B, k)
    elif mode == "batch":
        score = amp.detach().mean(0)
        score[0] = 0
        top = score.topk(k).indices.unsqueeze(0).expand(B, k)                       # (B, k), shared
    else:
        raise ValueError(f"fft_periods: mode must be one of {PERIODS}, got {mode!r}")
    return T // top, amp.gather(1, top)


class MixProp(nn.Module):
    """Mix-hop propagation over the node axis, channels last: x (B, nodes, T, C) -> (B, nodes, T, c_out).

    The official mixprop works on (B, C, nodes, T) with a 1x1 Conv2d; `mlp` keeps that layout's
    weight ((depth + 1) * c_in -> c_out, 1 x 1) so that weights copy across, and is applied as the
    linear map it is."""

    def __init__(self, c_in: int, c_out: int, depth: int = 2, alpha: float = 0.3):
        super().__init__()
        self.depth, self.alpha = depth, alpha
        self.mlp = nn.Conv2d((depth + 1) * c_in, c_out, kernel_size=1)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        B, n, T, C = x.shape
        adj = adj + torch.eye(adj.shape[0], device=x.device, dtype=adj.dtype)
        a = adj / adj.sum(1, keepdim=True)                                         # row-normalised (A + I)
        flat = x.reshape(B, n, T * C)
        keep = self.alpha * flat
        w = self.mlp.weight[:, :, 0, 0]                                             # (c_out, (depth + 1) C)
        out = F.linear(x, w[:, :C], self.mlp.bias)        # the 1x1 conv over the concatenation, term by term
        h = flat
        for i in range(1, self.depth + 1):
            h = torch.matmul(a, h).mul_(1 - self.alpha).add_(keep)  # official einsum("ncwl,vw->ncvl"): (B, n, T*C)
            out = out + F.linear(h.view(B, n, T, C), w[:, i * C:(i + 1) * C])
        return out                                                                  # (B, n, T, c_out)


class GraphBlock(nn.Module):
    """Adaptive graph convolution: x (B, T, d_model) -> (B, T, d_model).

    Parameters keep the official modules' shapes (start_conv, end_conv, gconv.mlp are Conv2d), so a
    state dict copies across; the forward applies them as the matmuls they are, channels last (the
    same result; mkldnn ran these conv shapes several times slower on CPU)."""

    def __init__(self, c_out: int, d_model: int, seq_len: int, *, conv_channel: int = 32, skip_channel: int = 32,
                 gcn_depth: int = 2, propalpha: float = 0.3, node_dim: int = 10):
        super().__init__()
        if d_model < c_out:
            raise ValueError(f"GraphBlock: d_model ({d_model}) must be >= the number of variates c_out ({c_out}): "
                             "its first conv maps the d_model rows onto c_out nodes")
        self.nodevec1 = nn.Parameter(torch.randn(c_out, node_dim))
        self.nodevec2 = nn.Parameter(torch.randn(node_dim, c_out))
        self.start_conv = nn.Conv2d(1, conv_channel, (d_model - c_out + 1, 1))
        self.gconv = MixProp(conv_channel, skip_channel, gcn_depth, propalpha)
        self.end_conv = nn.Conv2d(skip_channel, seq_len, (1, seq_len))
        self.linear = nn.Linear(c_out, d_model)
        self.norm = nn.LayerNorm(d_model)

    def adjacency(self) -> Tensor:
        return F.softmax(F.relu(self.nodevec1 @ self.nodevec2), dim=1)              # (c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        # start_conv, kernel (K, 1) along d_model: out[b, n, t, o] = sum_j W[o, 0, j, 0] x[b, t, n + j] + b[o]
        w1 = self.start_conv.weight[:, 0, :, 0]                                     # (conv, K)
        win = x.transpose(1, 2).unfold(1, w1.shape[1], 1)                           # (B, c_out, T, K)
        out = F.linear(win, w1, self.start_conv.bias)                               # (B, c_out, T, conv)
        out = F.gelu(self.gconv(out, self.adjacency()))                             # (B, c_out, T, skip)
        # end_conv, kernel (1, T): out[b, n, o] = sum_{c, t} W[o, c, 0, t] h[b, n, t, c] + b[o]
        n, C = out.shape[1], out.shape[3]
        w2 = self.end_conv.weight[:, :, 0, :].transpose(1, 2).reshape(-1, T * C)    # (seq_len, T * skip)
        out = F.linear(out.reshape(B, n, T * C), w2, self.end_conv.bias)            # (B, c_out, seq_len)
        return self.norm(x + self.linear(out.transpose(1, 2)))                      # (B, T, d_model)


def _default_attention_options(name: str, dropout: float) -> dict:
    """The official self_attention (biased q/k/v/o, attention dropout 0.1) when the mechanism is mhsa."""
    return {"qkv_bias": True, "attn_drop": 0.1} if name == "mhsa" else {}


class AttentionBlock(nn.Module):
    """Post-norm encoder layer around a registered mechanism: x (b, p, d) -> (b, p, d)."""

    def __init__(self, d_model: int, d_ff: int, num_heads: int = 8, *, attention: str = "mhsa",
                 attention_options: dict | None = None, causal: bool = True, dropout: float = 0.1):
        super().__init__()
        from attnlab.registry import create
        opts = _default_attention_options(attention, dropout) if attention_options is None else dict(attention_options)
        self.attention = create(attention, d_model, num_heads, **opts)
        self.causal = causal
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.attention(x, is_causal=self.causal)))
        y = self.drop(F.gelu(self.fc1(x)))
        return self.norm2(x + self.drop(self.fc2(y)))


class ScaleGraphBlock(nn.Module):
    """x (B, T, d_model) -> (B, T, d_model): k scales of graph convolution + intra-period attention."""

    def __init__(self, seq_len: int, c_out: int, d_model: int, d_ff: int, *, top_k: int = 3, num_heads: int = 8,
                 attention: str = "mhsa", attention_options: dict | None = None, causal: bool = True,
                 dropout: float = 0.1, periods: str = "sample", conv_channel: int = 32, skip_channel: int = 32,
                 gcn_depth: int = 2, propalpha: float = 0.3, node_dim: int = 10):
        super().__init__()
        if periods not in PERIODS:
            raise ValueError(f"ScaleGraphBlock: periods must be one of {PERIODS}, got {periods!r}")
        self.seq_len, self.k, self.periods = seq_len, top_k, periods
        self.att = AttentionBlock(d_model, d_ff, num_heads, attention=attention, attention_options=attention_options,
                                  causal=causal, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.gconv = nn.ModuleList(GraphBlock(c_out, d_model, seq_len, conv_channel=conv_channel,
                                              skip_channel=skip_channel, gcn_depth=gcn_depth, propalpha=propalpha,
                                              node_dim=node_dim) for _ in range(top_k))

    def _attend(self, x: Tensor, p: int) -> Tensor:
        """Attention within each period of p steps: x (b, T, d) -> (b, T, d)."""
        b, T, d = x.shape
        length = -(-T // p) * p
        if length != T:
            x = torch.cat([x, x.new_zeros(b, length - T, d)], 1)                  # (b, length, d)
        out = x.reshape(b * length // p, p, d)                                      # (b * length/p, p, d)
        out = F.gelu(self.norm(self.att(out)))
        return out.reshape(b, length, d)[:, :T]                                     # (b, T, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        if T != self.seq_len:
            raise ValueError(f"ScaleGraphBlock: expected {self.seq_len} time steps, got {T}")
        periods, weights = fft_periods(x, self.k, self.periods)                      # (B, k), (B, k)
        res = []
        for i in range(self.k):
            x = self.gconv[i](x)                                                    # sequential, as the code
            col = periods[:, i]
            found = torch.unique(col)
            if found.numel() == 1:
                res.append(self._attend(x, int(found)))
                continue
            out = torch.empty_like(x)
            for p in found.tolist():                                                # windows of equal period
                rows = (col == p).nonzero().squeeze(1)
                out[rows] = self._attend(x[rows], int(p))
            res.append(out)
        res = torch.stack(res, -1)                                                  # (B, T, d, k)
        w = F.softmax(weights, dim=1).view(B, 1, 1, self.k)
        return (res * w).sum(-1) + x


class MSGNet(nn.Module):
    """x (B, seq_len, enc_in), x_mark (B, seq_len, n_time) or None -> (B, pred_len, c_out)."""

    def __init__(self, seq_len: int = 96, pred_len: int = 96, enc_in: int = 7, c_out: int | None = None, *,
                 d_model: int = 32, d_ff: int = 64, e_layers: int = 1, top_k: int = 3, num_heads: int = 8,
                 attention: str | list = "mhsa", attention_options: dict | None = None, causal: bool = True,
                 dropout: float = 0.1, periods: str = "sample", n_time: int = 4, conv_channel: int = 32,
                 skip_channel: int = 32, gcn_depth: int = 2, propalpha: float = 0.3, node_dim: int = 10,
                 individual: bool = False):
        super().__init__()
        c_out = enc_in if c_out is None else c_out
        names = [attention] * e_layers if isinstance(attention, str) else list(attention)
        if len(names) != e_layers:
            raise ValueError(f"MSGNet: {len(names)} attention names for e_layers={e_layers}")
        self.seq_len, self.pred_len, self.enc_in, self.c_out = seq_len, pred_len, enc_in, c_out
        self.embedding = DataEmbedding(enc_in, d_model, n_time=n_time, dropout=dropout)
        self.blocks = nn.ModuleList(
            ScaleGraphBlock(seq_len, c_out, d_model, d_ff, top_k=top_k, num_heads=num_heads, attention=name,
                            attention_options=attention_options, causal=causal, dropout=dropout, periods=periods,
                            conv_channel=conv_channel, skip_channel=skip_channel, gcn_depth=gcn_depth,
                            propalpha=propalpha, node_dim=node_dim) for name in names)
        self.layer_norm = nn.LayerNorm(d_model)                                     # shared by every layer
        self.projection = nn.Linear(d_model, c_out)
        self.individual = individual
        if individual:
            self.seq2pred = nn.ModuleList(nn.Linear(seq_len, pred_len) for _ in range(c_out))
        else:
            self.seq2pred = nn.Linear(seq_len, pred_len)
        self.pred_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, x_mark: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.enc_in:
            raise ValueError(f"MSGNet: expected x of shape (B, {self.seq_len}, {self.enc_in}), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            # one bad window would also move every window's periods in periods="batch" mode
            raise ValueError("MSGNet: x has NaN or infinite values; fill or drop those steps first")
        means = x.mean(1, keepdim=True).detach()                                    # (B, 1, C)
        x = x - means
        stdev = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)
        x = x / stdev
        h = self.embedding(x, x_mark)                                               # (B, T, d)
        for block in self.blocks:
            h = self.layer_norm(block(h))
        out = self.projection(h).transpose(1, 2)                                    # (B, c_out, T)
        if self.individual:
            out = torch.stack([lin(out[:, i]) for i, lin in enumerate(self.seq2pred)], 1)
        else:
            out = self.seq2pred(out)                                                # (B, c_out, pred_len)
        out = self.pred_drop(out).transpose(1, 2)                                   # (B, pred_len, c_out)
        return out * stdev[:, :1] + means[:, :1]


__all__ = ["ETTH1_CONFIGS", "ETTH1_PAPER", "MSGNet", "ScaleGraphBlock", "GraphBlock", "MixProp", "AttentionBlock", "DataEmbedding", "fft_periods",
           "sinusoidal_positions", "PERIODS"]
