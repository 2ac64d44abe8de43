"""DLinear: a moving-average decomposition and two linear maps over time (the forecasting baseline).

Paper: Zeng, Chen, Zhang & Xu, "Are Transformers Effective for Time Series Forecasting?", AAAI 2023
(arXiv 2205.13504). Code: cure-lab/LTSF-Linear `models/DLinear.py`; the same file ships in
YoZhibo/MSGNet `models/DLinear.py`, whose ETTh1 numbers MSGNet's Table 1 lists beside its own.
Status: the code's forward. x (B, T, C) -> trend = moving average (kernel 25, stride 1, the ends
padded by repeating the first/last step (kernel - 1) // 2 times), seasonal = x - trend; each goes
through Linear(seq_len -> pred_len) over time (shared by the variates, or one per variate with
individual=True), and the two are summed. No attention: it is the baseline an attention network has
to beat.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def moving_average(x: Tensor, kernel: int) -> Tensor:
    """x (B, T, C) -> (B, T, C): the mean over `kernel` steps, ends padded with the edge values."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"moving_average: kernel must be a positive odd int, got {kernel}")
    pad = (kernel - 1) // 2
    x = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], 1)   # (B, T + 2 pad, C)
    return F.avg_pool1d(x.transpose(1, 2), kernel, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """x (B, seq_len, channels), x_mark ignored (accepted for the forecasting interface) -> (B, pred_len, channels)."""

    def __init__(self, seq_len: int = 96, pred_len: int = 96, channels: int = 7, *, kernel: int = 25,
                 individual: bool = False):
        super().__init__()
        self.seq_len, self.pred_len, self.channels, self.kernel = seq_len, pred_len, channels, kernel
        self.individual = individual
        n = channels if individual else 1
        self.seasonal = nn.ModuleList(nn.Linear(seq_len, pred_len) for _ in range(n))
        self.trend = nn.ModuleList(nn.Linear(seq_len, pred_len) for _ in range(n))

    def forward(self, x: Tensor, x_mark: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.channels:
            raise ValueError(f"DLinear: expected x of shape (B, {self.seq_len}, {self.channels}), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("DLinear: x has NaN or infinite values; fill or drop those steps first")
        trend = moving_average(x, self.kernel)
        seasonal, trend = (x - trend).transpose(1, 2), trend.transpose(1, 2)          # (B, C, T)
        if self.individual:
            out = torch.stack([s(seasonal[:, i]) + t(trend[:, i])
                               for i, (s, t) in enumerate(zip(self.seasonal, self.trend))], 1)
        else:
            out = self.seasonal[0](seasonal) + self.trend[0](trend)                  # (B, C, pred_len)
        return out.transpose(1, 2)                                                   # (B, pred_len, C)


__all__ = ["DLinear", "moving_average"]
