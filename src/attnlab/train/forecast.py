"""`attnlab forecast`: train a forecaster on a CSV in the ETT format with `attnlab train`'s loop, then
measure it on the test split and plot its forecasts against the truth.

    attnlab forecast --horizon 96                                  # MSGNet on ../shared/data/ett/ETTh1.csv
    attnlab forecast --csv my.csv --model dlinear --horizon 24 --lookback 96 --out runs/my
    attnlab forecast --horizon 96 --layers moh                     # MSGNet with MoH in its blocks

Defaults follow the official MSGNet ETTh1 script for the horizon (d_model, d_ff, e_layers:
attnlab.models.msgnet.ETTH1_CONFIGS; 8 heads, batch 32, lr 1e-4; DLinear lr 5e-3), trained for
--epochs passes over the training windows with warm-up-free cosine decay (the official code: Adam,
lr halved every epoch, early stopping on the validation loss; see `fit`). Writes into --out: the
training run (config, metrics, checkpoint), forecast.json (val and test MSE/MAE on the scaled data,
parameters, seconds), forecast.md and forecast.png (look-back, truth and forecast of a few test
windows, in the CSV's units).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from attnlab._io import save_figure, write_text
from attnlab.models.msgnet import ETTH1_CONFIGS
from attnlab.tasks import create_task
from attnlab.train.checkpoint import find_checkpoint, load_weights
from attnlab.train.config import TrainConfig, parse_layers
from attnlab.train.loop import TrainResult, train

DLINEAR_LR = 5e-3          # LTSF-Linear's ETTh1 script
MSGNET_LR = 1e-4           # MSGNet's run_longExp.py default


@dataclass
class Fitted:
    model: torch.nn.Module
    task: Any
    config: TrainConfig
    result: TrainResult
    val: dict
    test: dict
    seconds: float


def config_for(*, horizon: int, model: str = "msgnet", csv: str | None = None, lookback: int = 96,
               epochs: float = 2.0, lr: float | None = None, batch_size: int = 32, seed: int = 0,
               layers: Sequence | None = None, dim: int | None = None, num_heads: int = 8,
               block_options: dict | None = None, split: str | None = None, threads: int | None = 1) -> TrainConfig:
    """The TrainConfig of one forecaster: the official ETTh1 sizes for the horizon unless given."""
    task_options = {"horizon": horizon, "lookback": lookback, "model": model}
    if csv is not None:
        task_options["path"] = str(csv)
    if split is not None:
        task_options["split"] = split
    task = create_task("ett", seed=seed, **task_options)
    steps = max(1, int(round(epochs * task.epoch_steps(batch_size))))
    official = ETTH1_CONFIGS.get(horizon, ETTH1_CONFIGS[96])
    if model == "dlinear":
        layers, dim, mlp_ratio = [], dim or 8, 1.0
        lr = DLINEAR_LR if lr is None else lr
    else:
        dim = dim or official["d_model"]
        mlp_ratio = official["d_ff"] / official["d_model"]
        layers = list(layers) if layers else ["mhsa"] * official["e_layers"]
        lr = MSGNET_LR if lr is None else lr
    per_epoch = task.epoch_steps(batch_size)
    return TrainConfig(task="ett", task_options=task_options, layers=layers, dim=dim, num_heads=num_heads,
                       mlp_ratio=mlp_ratio, block_options=dict(block_options or {}), steps=steps,
                       batch_size=batch_size, lr=lr, min_lr_ratio=0.1, warmup=0, weight_decay=0.0, grad_clip=0.0,
                       eval_every=max(1, min(steps, per_epoch)), eval_batches=8, eval_batch_size=64,
                       log_every=max(1, per_epoch // 4), checkpoint_every=0, seed=seed, threads=threads)


def fit(config: TrainConfig, out_dir: str | Path | None = None, *, progress: bool = False,
        limit: int | None = None) -> Fitted:
    """Train `config` with attnlab.train, reload the final checkpoint (checked against the trainer's
    last evaluation), and measure it on the whole validation and test splits (batch 32, drop_last;
    `limit`: their first `limit` windows only, for quick checks)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnlab-forecast-") as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        result = train(config, folder, progress=progress)
        seconds = time.perf_counter() - t0
        task = create_task(config.task, **{"seed": config.seed, **config.task_options})
        model = task.build_model(config.dim, config.num_heads, config.layers, mlp_ratio=config.mlp_ratio,
                                 **config.block_options)
        load_weights(find_checkpoint(folder)[0], model)
    model.eval()
    check = task.evaluate(model, batches=config.eval_batches, batch_size=config.eval_batch_size)
    if abs(check["mse"] - result.final["val_mse"]) > 1e-5 * max(1.0, abs(check["mse"])):
        raise RuntimeError(f"the reloaded model gives val MSE {check['mse']}, the trainer reported "
                           f"{result.final['val_mse']}: the checkpoint is not the trained model")
    return Fitted(model, task, config, result, task.evaluate_split(model, "val", limit=limit),
                  task.evaluate_split(model, "test", limit=limit), seconds)


def plot(path: Path, curves: dict[str, dict], *, windows: int = 3, variate: int = -1) -> Path:
    """Look-back, truth and each model's forecast of `windows` test windows for one variate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = next(iter(curves.values()))
    n = min(windows, first["pred"].shape[0])
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), squeeze=False)
    name = first["variates"][variate]
    for i in range(n):
        ax = axes[i, 0]
        L, H = first["x"].shape[1], first["y"].shape[1]
        ax.plot(range(L), first["x"][i, :, variate], color="0.5", lw=1, label="look-back")
        ax.plot(range(L, L + H), first["y"][i, :, variate], color="k", lw=1.2, label="truth")
        for label, c in curves.items():
            ax.plot(range(L, L + H), c["pred"][i, :, variate], lw=1.2, label=label)
        ax.set_ylabel(name)
        if i == 0:
            ax.legend(loc="upper left", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("hour")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=Path, default=None, help="an ETT-format CSV (default: $ATTNLAB_ETT or "
                   "../shared/data/ett/ETTh1.csv)")
    p.add_argument("--model", choices=["msgnet", "dlinear"], default="msgnet")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--lookback", type=int, default=96)
    p.add_argument("--split", choices=["ett_hour", "ett_minute", "ratio"], default=None,
                   help="split rule (default: from the file name: ETTh*, ETTm*, else 70/10/20%%)")
    p.add_argument("--layers", type=parse_layers, default=None, help="MSGNet: one mechanism per ScaleGraphBlock "
                   "(default: mhsa x the official e_layers)")
    p.add_argument("--dim", type=int, default=None, help="MSGNet d_model (default: the official one for the horizon)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training windows")
    p.add_argument("--lr", type=float, default=None, help=f"peak lr (default {MSGNET_LR} MSGNet, {DLINEAR_LR} DLinear)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--periods", choices=["sample", "batch"], default="sample",
                   help="MSGNet: per-window FFT periods, or the official batch-averaged ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-windows", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/forecast-MODEL-HORIZON)")


def main(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"forecast-{args.model}-{args.horizon}"
    try:
        config = config_for(horizon=args.horizon, model=args.model, csv=args.csv, lookback=args.lookback,
                            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                            layers=args.layers, dim=args.dim, num_heads=args.heads, split=args.split,
                            block_options={"periods": args.periods} if args.model == "msgnet" else None,
                            threads=args.threads)
        fitted = fit(config, out / "run", progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:
        print(f"attnlab forecast: {e}", file=sys.stderr)
        return 2
    task = fitted.task
    n = min(args.plot_windows, task.num_windows("test"))
    starts = [int(i * (task.num_windows("test") - 1) / max(1, n - 1)) for i in range(n)]
    curves = {args.model: task.forecast(fitted.model, "test", starts)}
    figure = plot(out / "forecast.png", curves, windows=n)
    params = sum(p.numel() for p in fitted.model.parameters())
    doc = {"csv": str(task.csv), "model": args.model, "horizon": args.horizon, "lookback": args.lookback,
           "split": task.split_rule, "config": config.to_dict(), "params": params, "val": fitted.val,
           "test": fitted.test, "train_seconds": fitted.seconds, "plotted_test_windows": starts}
    write_text(out / "forecast.json", json.dumps(doc, indent=1) + "\n")
    page = "\n".join([
        f"# {args.model} forecast, {task.csv.name}, look-back {args.lookback}, horizon {args.horizon}", "",
        f"{params:,} parameters; {config.steps} steps of {config.batch_size} ({args.epochs:g} epochs) in "
        f"{fitted.seconds:.0f} s; split {task.split_rule}; MSE/MAE on the standardised data, all variates.", "",
        "| split | windows | MSE | MAE |", "| --- | --- | --- | --- |",
        f"| val | {fitted.val['windows']} | {fitted.val['mse']:.4f} | {fitted.val['mae']:.4f} |",
        f"| test | {fitted.test['windows']} | {fitted.test['mse']:.4f} | {fitted.test['mae']:.4f} |", "",
        f"![forecasts]({figure.name})", ""])
    write_text(out / "forecast.md", page)
    print(page)
    print(f"attnlab forecast: wrote {out / 'forecast.md'}, {out / 'forecast.json'}, {figure}")
    return 0


__all__ = ["Fitted", "config_for", "fit", "plot", "add_arguments", "main", "DLINEAR_LR", "MSGNET_LR"]
