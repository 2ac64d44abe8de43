"""ETT forecasting: multivariate long-horizon forecasting on the Electricity Transformer Temperature data.

    task = create_task("ett", horizon=96)                    # ../shared/data/ett/ETTh1.csv by default
    batch = task.batch("train", 0, 32)                       # x (32, 96, 7), x_mark (32, 96, 4), y (32, 96, 7)
    model = task.build_model(32, 8, ["mhsa"], mlp_ratio=2)   # MSGNet, one ScaleGraphBlock per layer
    task.evaluate_split(model, "test")                       # {"mse", "mae"} over the whole test split

Data: a CSV in the ETT format (a `date` column "YYYY-MM-DD HH:MM:SS", then the variates; the target
column is not treated specially: features "M", every variate in and out). Default file: $ATTNLAB_ETT,
else ../shared/data/ett/ETTh1.csv (from the working directory or the repository root).

The protocol of the Time-Series-Library / MSGNet code (data_provider/data_loader.py
Dataset_ETT_hour, data_factory.py, exp/exp_main.py), which the papers' tables use:
  - split "ett_hour" (ETTh*): 12/4/4 months of 30 days: train rows [0, 8640), val [8640 - L, 11520),
    test [11520 - L, 14400), L = the look-back (each later split starts L rows early so its first
    window's input may overlap the previous split); "ett_minute" (ETTm*) the same times 4; "ratio"
    (Dataset_Custom): 70/10/20% of the rows.
  - a StandardScaler (population std) fitted on the train rows scales every split; metrics are on
    the scaled data over all variates and horizon steps.
  - windows with stride 1: x = rows [i, i + L), y = rows [i + L, i + L + H); n = rows - L - H + 1.
  - time features (embed "timeF", freq "h"): hour/23, weekday/6, (day - 1)/30, (day of year - 1)/365,
    each minus 0.5 ("t" adds minute/59 first).
  - train: shuffled, drop_last batches (here: batch `index` is slice index mod epoch of a per-epoch
    permutation seeded by (seed, epoch)); test: in order, drop_last (the official loader drops the
    last partial batch of the TEST split too, so its metrics leave out up to batch_size - 1 windows).
Model: task option model="msgnet" (attnlab.models.msgnet; layers = one mechanism per ScaleGraphBlock,
dim = d_model, d_ff = mlp_ratio * dim, block options = MSGNet's keyword arguments) or "dlinear"
(attnlab.models.dlinear; no attention: layers must be empty, `--layers none`).
"""
from __future__ import annotations

import csv
import functools
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.dlinear import DLinear
from attnlab.models.msgnet import MSGNet
from attnlab.tasks import Batch, Task, register_task

ENV = "ATTNLAB_ETT"
DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "ett" / "ETTh1.csv"
MODELS = ("msgnet", "dlinear")
SPLIT_RULES = ("ett_hour", "ett_minute", "ratio")
TEST = "test"


def find_csv(path: str | os.PathLike | None = None) -> Path:
    """`path`, else $ATTNLAB_ETT, else ../shared/data/ett/ETTh1.csv from the working directory or the
    repository root; FileNotFoundError naming all three otherwise."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"ett: no CSV at {p} (expected a file in the ETT format: date + variates)")
        return p
    if os.environ.get(ENV):
        p = Path(os.environ[ENV]).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"ett: ${ENV}={p} is not a file")
        return p
    root = Path(__file__).resolve().parents[3]
    for base in (Path.cwd(), root):
        p = (base / DEFAULT_RELATIVE).resolve()
        if p.is_file():
            return p
    raise FileNotFoundError(f"ett: ETTh1.csv not found: pass path=..., set ${ENV}, or put the ETDataset file at "
                            f"{DEFAULT_RELATIVE} (relative to the working directory or {root})")


def read_csv(path: Path) -> tuple[list[datetime], np.ndarray, list[str]]:
    """(dates, values (rows, variates) float64, variate names) of an ETT-format CSV. Parsed once per
    process and file version (a claim builds the task many times); callers must not modify them."""
    p = Path(path).resolve()
    return _parsed(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, mtime_ns: int) -> tuple[list[datetime], np.ndarray, list[str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip().lower() != "date" or len(header) < 2:
            raise ValueError(f"ett: {path} must start with a header 'date,<variate>,...', got {header!r}")
        dates, rows = [], []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"ett: {path} line {n} has {len(row)} fields, the header has {len(header)}")
            try:
                dates.append(datetime.fromisoformat(row[0].strip()))
                rows.append([float(v) for v in row[1:]])
            except ValueError as e:
                raise ValueError(f"ett: {path} line {n}: {e}") from None
    values = np.asarray(rows, dtype=np.float64)
    values.setflags(write=False)                                                    # shared by the cache
    if not np.isfinite(values).all():
        raise ValueError(f"ett: {path} has missing or non-finite values")
    return dates, values, [h.strip() for h in header[1:]]


def time_features(dates: Sequence[datetime], freq: str = "h") -> np.ndarray:
    """(rows, 4) for "h" (hour, weekday, day of month, day of year), (rows, 5) for "t" (minute first),
    each scaled to [-0.5, 0.5] as the Time-Series-Library's timefeatures.py."""
    cols = [[d.hour / 23.0 - 0.5 for d in dates], [d.weekday() / 6.0 - 0.5 for d in dates],
            [(d.day - 1) / 30.0 - 0.5 for d in dates], [(d.timetuple().tm_yday - 1) / 365.0 - 0.5 for d in dates]]
    if freq == "t":
        cols.insert(0, [d.minute / 59.0 - 0.5 for d in dates])
    elif freq != "h":
        raise ValueError(f"ett: freq must be 'h' or 't', got {freq!r}")
    return np.asarray(cols, dtype=np.float64).T


def borders(rows: int, lookback: int, rule: str) -> dict[str, tuple[int, int]]:
    """{split: (first row, end row)} of train/val/test (each later split starts `lookback` rows early)."""
    if rule in ("ett_hour", "ett_minute"):
        unit = 30 * 24 * (4 if rule == "ett_minute" else 1)
        ends = (12 * unit, 16 * unit, 20 * unit)
        if rows < ends[2]:
            raise ValueError(f"ett: split {rule!r} needs {ends[2]} rows, the file has {rows} (use split='ratio')")
    elif rule == "ratio":
        n_train, n_test = int(rows * 0.7), int(rows * 0.2)
        ends = (n_train, rows - n_test, rows)
    else:
        raise ValueError(f"ett: split must be one of {SPLIT_RULES}, got {rule!r}")
    return {"train": (0, ends[0]), "val": (ends[0] - lookback, ends[1]), TEST: (ends[1] - lookback, ends[2])}


@register_task
class ETT(Task):
    name = "ett"
    kind = "regress"
    quality = "mse"
    higher_is_better = False
    causal = False
    description = "ETTh1 multivariate forecasting (look-back 96, horizon 96-720), MSE/MAE on scaled data"

    def __init__(self, seed: int = 0, *, path: str | None = None, horizon: int = 96, lookback: int = 96,
                 model: str = "msgnet", split: str | None = None, freq: str = "h"):
        super().__init__(seed)
        for name, v in (("horizon", horizon), ("lookback", lookback)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ett: {name} must be a positive int, got {v!r}")
        if model not in MODELS:
            raise ValueError(f"ett: model must be one of {MODELS}, got {model!r}")
        self.csv = find_csv(path)
        self.path = None if path is None else str(path)
        self.horizon, self.lookback, self.model, self.freq = horizon, lookback, model, freq
        self.split_rule = split or ("ett_minute" if self.csv.name.lower().startswith("ettm") else
                                    "ett_hour" if self.csv.name.lower().startswith("etth") else "ratio")
        dates, values, self.variates = read_csv(self.csv)
        self.borders = borders(len(values), lookback, self.split_rule)
        a, b = self.borders["train"]
        self.mean = values[a:b].mean(0)
        self.std = values[a:b].std(0)                                               # population std (StandardScaler)
        if (self.std == 0).any():
            bad = [v for v, s in zip(self.variates, self.std) if s == 0]
            raise ValueError(f"ett: variates {bad} are constant on the train rows; they cannot be standardised")
        self.data = torch.from_numpy((values - self.mean) / self.std).float()     # (rows, C)
        self.stamp = torch.from_numpy(time_features(dates, freq)).float()          # (rows, n_time)
        for split in ("train", "val", TEST):
            if self.num_windows(split) < 1:
                lo, hi = self.borders[split]
                raise ValueError(f"ett: the {split} split (rows {lo}-{hi}) is shorter than lookback + horizon "
                                 f"= {lookback + horizon}")

    # -- data ----------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.lookback

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "path": self.path, "horizon": self.horizon, "lookback": self.lookback,
                "model": self.model, "split": self.split_rule, "freq": self.freq}

    def num_windows(self, split: str) -> int:
        lo, hi = self._range(split)
        return hi - lo - self.lookback - self.horizon + 1

    def _range(self, split: str) -> tuple[int, int]:
        if split not in self.borders:
            raise ValueError(f"ett: split must be one of {tuple(self.borders)}, got {split!r}")
        return self.borders[split]

    def windows(self, split: str, starts: Tensor) -> Batch:
        """The windows starting at `starts` (window indices within the split)."""
        lo, _ = self._range(split)
        rows = lo + starts.view(-1, 1)                                              # (B, 1)
        past = rows + torch.arange(self.lookback).view(1, -1)                       # (B, L)
        future = rows + self.lookback + torch.arange(self.horizon).view(1, -1)      # (B, H)
        return {"x": self.data[past], "x_mark": self.stamp[past], "y": self.data[future]}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.generator(split, index)                                                # validates split and index
        n = self.num_windows(split)
        if split == "train":
            starts = self.train_starts(index, batch_size)
        else:
            starts = (index * batch_size + torch.arange(batch_size)) % n
        return self.windows(split, starts)

    def train_starts(self, index: int, batch_size: int) -> Tensor:
        """Window indices of training batch `index`: slice `index mod epoch` of the permutation of the
        training windows drawn for its epoch (seeded by the task seed and the epoch), drop_last."""
        n = self.num_windows("train")
        per_epoch = n // batch_size
        if per_epoch < 1:
            raise ValueError(f"ett: batch_size {batch_size} exceeds the {n} training windows")
        epoch, slot = divmod(index, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7_919 + 11)
        return torch.randperm(n, generator=g)[slot * batch_size:(slot + 1) * batch_size]

    def epoch_steps(self, batch_size: int) -> int:
        """Optimizer steps per pass over the training windows (drop_last)."""
        return self.num_windows("train") // batch_size

    # -- model and loss ------------------------------------------------------------------
    def accepts_no_layers(self) -> bool:
        return self.model == "dlinear"

    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], mlp_ratio: float = 2.0,
                    **block_options) -> nn.Module:
        if isinstance(layers, int):
            layers = ["mhsa"] * layers
        if self.model == "dlinear":
            if layers:
                raise ValueError(f"ett: DLinear has no attention layer; pass layers=[] (--layers none), got {layers!r}")
            return DLinear(self.lookback, self.horizon, self.channels, **block_options)
        if not layers:
            raise ValueError("ett: MSGNet needs one mechanism per ScaleGraphBlock (e.g. layers=['mhsa'])")
        from attnlab.models.transformer import parse_layer
        parsed = [parse_layer(l) for l in layers]
        opts = [o for _, o in parsed]
        if any(opts) and any(o != opts[0] for o in opts):
            raise ValueError("ett: MSGNet takes one set of attention options for every layer, got "
                             f"{opts} (give the same options to each, or none)")
        return MSGNet(self.lookback, self.horizon, self.channels, d_model=dim, d_ff=max(1, int(round(mlp_ratio * dim))),
                      e_layers=len(layers), num_heads=num_heads, attention=[n for n, _ in parsed],
                      attention_options=opts[0] or None, n_time=self.stamp.shape[1], **block_options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        pred = model(batch["x"], batch["x_mark"])                                   # (B, H, C)
        y = batch["y"]
        if pred.shape != y.shape:
            raise ValueError(f"ett: expected predictions of shape {tuple(y.shape)}, got {tuple(pred.shape)}")
        mse = F.mse_loss(pred.float(), y)
        with torch.no_grad():
            mae = (pred.float() - y).abs().mean().item()
        return mse, {"loss": mse.item(), "mse": mse.item(), "mae": mae}

    @torch.no_grad()
    def evaluate_split(self, model: nn.Module, split: str = TEST, *, batch_size: int = 32,
                       drop_last: bool = True, limit: int | None = None) -> dict[str, float]:
        """MSE and MAE over every window of `split` in order (the official test loop: batch_size 32,
        drop_last), on the scaled data; `limit`: only the first `limit` windows (quick checks)."""
        was = model.training
        model.eval()
        n = self.num_windows(split) if limit is None else min(int(limit), self.num_windows(split))
        end = (n // batch_size) * batch_size if drop_last else n
        se = ae = count = 0.0
        try:
            for s in range(0, end, batch_size):
                b = self.windows(split, torch.arange(s, min(s + batch_size, end)))
                err = model(b["x"], b["x_mark"]).float() - b["y"]
                se += float(err.pow(2).sum())
                ae += float(err.abs().sum())
                count += err.numel()
        finally:
            model.train(was)
        return {"mse": se / count, "mae": ae / count, "windows": int(count // (self.horizon * self.channels))}

    @torch.no_grad()
    def forecast(self, model: nn.Module, split: str = TEST, starts: Sequence[int] = (0,)) -> dict[str, np.ndarray]:
        """Inputs, predictions and truth of the windows at `starts`, back in the CSV's units."""
        was = model.training
        model.eval()
        try:
            b = self.windows(split, torch.as_tensor(list(starts)))
            pred = model(b["x"], b["x_mark"]).float()
        finally:
            model.train(was)
        unscale = lambda t: t.numpy() * self.std + self.mean                       # noqa: E731
        return {"x": unscale(b["x"]), "pred": unscale(pred), "y": unscale(b["y"]), "variates": self.variates}

__all__ = ["ETT", "find_csv", "read_csv", "time_features", "borders", "MODELS", "SPLIT_RULES"]
