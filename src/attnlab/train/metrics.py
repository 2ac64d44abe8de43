"""What a run reports: metric windows, metrics.jsonl, the curves plot and the progress display.

metrics.jsonl holds one JSON object a line: {"type": "header"} (config, task, environment),
then {"type": "log"} every `log_every` steps (train metrics averaged over the window, lr,
tokens/s) and {"type": "eval"} every `eval_every` steps and at the end (train metrics since the
previous eval, val_* metrics); {"type": "resume"} where a run continued.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attnlab._env import gpu_name, software_and_machine
from attnlab._io import save_figure, write_text

TIMING_KEYS = ("elapsed", "tokens_per_s", "train_time")  # differ between runs; everything else is exact


class Window:
    """Running sums of per-step train metrics, train wall time and steps since the window opened."""

    def __init__(self, data: dict[str, Any] | None = None):
        data = data or {}
        self.sums: dict[str, float] = dict(data.get("sums", {}))
        self.steps: int = data.get("steps", 0)
        self.train_time: float = data.get("train_time", 0.0)

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.train_time += seconds

    def means(self) -> dict[str, float | None]:
        return {f"train_{k}": v / self.steps for k, v in self.sums.items()} if self.steps else {"train_loss": None}

    def state(self) -> dict[str, Any]:
        """What `Window(state)` continues from (saved in checkpoints)."""
        return {"sums": self.sums, "steps": self.steps, "train_time": self.train_time}


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What the numbers depend on; no hostname."""
    return {**software_and_machine(), "num_threads": torch.get_num_threads(), "device": str(device),
            "gpu": gpu_name(device), "world_size": world_size}


def now() -> str:
    """The local time as the records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when it does not exist), up to a line cut short by a kill."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break            # a line cut short by a kill: it and anything after are dropped
    return records


def records_until(records: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """What a run resumed at `step` keeps of its earlier records: headers, resumes, and steps up to `step`."""
    return [r for r in records if r.get("type") in ("header", "resume") or r.get("step", 0) <= step]


class MetricsLog:
    """The records of a run: kept in memory, and appended to metrics.jsonl when `path` is given."""

    def __init__(self, path: Path | None):
        self.path = path
        self.records: list[dict[str, Any]] = []

    def start(self, records: list[dict[str, Any]]) -> None:
        """Begin the file (replacing it) with these records."""
        self.records = list(records)
        if self.path is not None:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_curves(records: list[dict[str, Any]], quality: str, title: str, path: Path) -> None:
    """curves.png: train/val loss and the task's quality metric against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = [r for r in records if r.get("type") == "log"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_q = fig.subplots(1, 2)
    if logs:
        ax_loss.plot([r["step"] for r in logs], [r["train_loss"] for r in logs], label="train", alpha=0.8)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r.get("val_loss") for r in evals], marker="o", label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(True, alpha=0.3)
    key = f"val_{quality}"
    if logs and f"train_{quality}" in logs[-1] and quality != "loss":
        ax_q.plot([r["step"] for r in logs], [r.get(f"train_{quality}") for r in logs], label="train", alpha=0.8)
    if evals and key in evals[-1]:
        ax_q.plot([r["step"] for r in evals], [r.get(key) for r in evals], marker="o", label="val")
    ax_q.set_xlabel("step")
    ax_q.set_ylabel(quality)
    if ax_q.lines:
        ax_q.legend(fontsize=8)
    ax_q.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


class ProgressDisplay:
    """On stderr while a run trains: a live bar on a terminal, one line per eval otherwise, or nothing.

    Use as a context manager; `loss`, `evaluated` and `advanced` update it after the steps.
    """

    def __init__(self, enabled: bool, label: str, quality: str, steps: int, completed: int):
        self.enabled, self.label, self.quality, self.steps, self.completed = enabled, label, quality, steps, completed
        self.lines = False

    def __enter__(self) -> "ProgressDisplay":
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        err = Console(stderr=True)
        live = self.enabled and err.is_terminal
        self.lines = self.enabled and not err.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"),
                            TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=err, disable=not live, refresh_per_second=4)
        self.bar.__enter__()
        self.task = self.bar.add_task(escape(self.label), total=self.steps, completed=self.completed,
                                      loss="-", val="", speed="-")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def loss(self, value: float) -> None:
        self.bar.update(self.task, loss=f"{value:.4f}")

    def evaluated(self, record: dict[str, Any]) -> None:
        """An eval record: its val quality on the bar, or its numbers as one line."""
        value = record.get(f"val_{self.quality}", float("nan"))
        self.bar.update(self.task, val=f"val {self.quality} {value:.4g}")
        if self.lines:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and k not in TIMING_KEYS)
            print(f"[{record['elapsed']:7.1f} s] step {record['step']}/{self.steps}  {shown}",
                  file=sys.stderr, flush=True)

    def advanced(self, step: int, tokens_per_s: float) -> None:
        self.bar.update(self.task, completed=step, speed=f"{tokens_per_s:,.0f}")
