"""`attnlab arena`: train every mechanism on the tasks it can run at one small size, time it, rank it.

    attnlab arena                                            # the default run (below)
    attnlab arena --quick                                    # seconds: 20 steps of the MQAR sweep
    attnlab arena --mechanisms mhsa,moh,minimal --seeds 0,1,2
    attnlab arena --tasks assoc_recall,selective_copy --steps 1200 --seq-lens 512,2048

For each task, mechanism and seed, a model of `--layers` blocks of that one mechanism is trained
with `attnlab.train.train` for `--steps` AdamW steps (nothing written to disk), `--jobs`
models at a time in worker processes of one thread each; its quality is the task's headline metric
(`task.quality`) on the task's validation batches after the last step, and its learning curve (six
evaluations) is kept. Then one layer of each mechanism is timed in fresh processes by the
measuring code of `attnlab bench` (`bench.measure`): forward and forward+backward at every N in
`--seq-lens` (B=1, width `--dim`, `--heads` heads, causal when the task is; a 2-D mechanism on an
s x s image of N = s^2 pixels, so its N must be a perfect square), and the peak memory of one
forward+backward. A mechanism runs on every task it can: causal tasks take the mechanisms with
a causal mode, image tasks also take the 2-D mechanisms (on the patch grid, `Block(grid=...)`);
the rest are listed as skipped with the reason. A mechanism that raises while training is a
"failed" row with its error, never the end of the arena.

The default run (measured in the README) has three tasks:
- `mqar_sweep`: multi-query associative recall at 2, 4, 8 and 16 key-value pairs (16 keys, 16
  values) in 64 tokens, with a random gap between the pairs and the queries; one model per
  mechanism trains on the mixture and its accuracy is broken down by pair count and by the
  distance from a query back to its key (Zoology's difficulty sweep, in one training run). mhsa
  solves every point (>= 0.99; tests/arena/test_leaderboard.py checks it), so each other row shows
  where that mechanism stops: a sliding window once keys leave its reach, a fixed-size state as the
  pairs grow.
- `tinyshakespeare`: character-level validation loss at context 32 (real text; the bigram
  count model scores 2.48 nats/char on the same split).
- `fashion_mnist` (or `digits` where its data are missing): 7 x 7 patches, a 4 x 4 grid, mean
  pooled; every sequence mechanism, causal or not, and halo2d / neighborhood2d on the grid.
  (hierarchical gets no tree here, and without one it is exactly mhsa: its row matches mhsa's.)
Models are attention only (`--mlp-ratio 0`, so the mechanism is what differs), 2 layers of width
64 with 4 heads, 600 AdamW steps of 64 at lr 3e-3 with 60 warm-up steps, one thread each. (Before
the models' initialisation was fixed, this default sat at lr 1e-2 and no model solved MQAR; at
1e-2 the fixed mhsa reaches 0.37, at 3e-3 1.0.) Ranks closer than the spread over seeds
(`--seeds 0,1,2`) are ties, marked "=" in the table; with one seed there is no spread and close
ranks may be noise.

Output folder (default arena-results/<timestamp>):
    arena.json  {"format", "command", "options", "environment", "tasks", "rows", "skipped", "wall_s"}
        options      every setting of the run (the resolved defaults included)
        environment  torch/attnlab/python versions, CPU, threads of training and of the timing
                     processes, load average (1, 5, 15 min) at the start and at the end
        tasks        [{"name", "options", "quality", "higher_is_better", "causal", "seq_len"}]
        rows         one per (task, mechanism), best first within each task:
                     rank (1 = best; None when failed; ties share a rank), tie (within the
                     spread of the row above), curves ({seed: [[step, quality], ...]}),
                     difficulty ({"pairs": {P: quality}, "distance": {"lo-hi": quality}}, {} for
                     tasks without a breakdown), task, mechanism, options, status ("ok" or
                     "failed"), error, quality_metric, higher_is_better, quality (mean over the
                     seeds that trained), quality_std (sample standard deviation, None with one
                     seed), quality_per_seed, seeds, failed_seeds [{seed, error}], params,
                     tokens_per_s and train_s (means over seeds: training tokens per second of
                     train time, and wall seconds of the whole train call), final (every val_*
                     metric, mean over seeds), timing: [{seq_len, status ("ok" or "skipped"),
                     reason (why not timed, or why memory/FLOPs were not measured), fwd_ms,
                     fwd_bwd_ms (medians), fwd_ms_iqr, fwd_bwd_ms_iqr, repeats, peak_mem_mb,
                     mem_method, flops_fwd, flops_bwd}] (one layer, B=1; [] with --no-timing)
        skipped      [{"task", "mechanism", "reason"}]
    arena.png   per task, quality against one layer's forward+backward time at the largest N
                (error bars: the standard deviation over seeds)
    difficulty.png  per task with a breakdown: quality against pair count and against distance,
                a line per mechanism
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab import bench
from attnlab._args import float_above, int_at_least, int_list, key_value
from attnlab._checks import check_int
from attnlab._env import gpu_name, loadavg, software_and_machine
from attnlab._io import default_out, describe_error, fmt, save_figure
from attnlab.registry import get_spec, list_specs
from attnlab.tasks import create_task, get_task
from attnlab.train import TrainConfig, TrainInterrupted, train

FORMAT = 2
# The default run: MQAR over a difficulty sweep (the causal sequence mechanisms), character-level
# tiny-shakespeare (the same, on real text), and Fashion-MNIST patches (every sequence mechanism,
# causal or not, and the 2-D ones on the 4 x 4 patch grid). See the module docstring for the sizes.
DEFAULT_TASKS = ("mqar_sweep", "tinyshakespeare", "fashion_mnist")
# Arena-size options of tasks, used unless --task-option sets them (see the module docstring).
DEFAULT_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "mqar_sweep": {"seq_len": 64, "pairs": [2, 4, 8, 16], "num_keys": 16, "num_values": 16},
    "assoc_recall": {"num_pairs": 8, "num_queries": 8, "num_keys": 16, "num_values": 16},
    "tinyshakespeare": {"context": 32},
    "fashion_mnist": {"patch": 7},
    "digits": {"patch": 2},
}
# A default task whose data are missing on this machine is replaced by one that always exists.
FALLBACK_TASKS = {"fashion_mnist": "digits"}
# Arena-size options of mechanisms (under --options): the 2-D windows must fit a 4 x 4 grid.
DEFAULT_MECHANISM_OPTIONS: dict[str, dict[str, Any]] = {
    "halo2d": {"block_size": 2, "halo_size": 1},
    "neighborhood2d": {"kernel_size": 3},
    "lka": {"kernel_size": 5, "dilation": 2},                      # 3x3 + 3x3 dilated 2: field 7 covers the grid
    "van": {"kernel_size": 5, "dilation": 2},
    "medusa": {"stride": 1},                                        # stride 2 would leave 2 x 2 tokens
    "convshare": {"kernel_size": 2, "padding": "valid"},            # 3 x 3 tokens attend
    "hyperzzw": {"global_size": 4, "local_kernel_sizes": (3, 3, 3, 3)},
}
QUICK_STEPS = 20
CURVE_POINTS = 6              # validation evaluations per model (the learning curve in arena.json)
DEFAULT_SEQ_LENS = (256, 1024)
DEFAULT_TIMING_BUDGET_S = 1.0     # timed seconds per sequence length (all mechanisms interleaved)
TIMING_PROCESS_TIMEOUT_S = 600
# One intra-op thread for training and timing: models this small gain nothing from a second one,
# and on a busy machine a second thread made every step 5-15x slower (measured on 2 shared cores).
DEFAULT_THREADS = 1


@dataclass
class ArenaConfig:
    """One arena run. mechanisms=None: every layout='seq' mechanism; options: {mechanism: {option: value}}
    for every layer of that mechanism; task_options: applied to every task over DEFAULT_TASK_OPTIONS."""

    tasks: list = field(default_factory=lambda: list(DEFAULT_TASKS))
    mechanisms: list | None = None
    options: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    layers: int = 2
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 0.0
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 60
    eval_batches: int = 8
    eval_batch_size: int = 128
    seeds: list = field(default_factory=lambda: [0])
    seq_lens: list = field(default_factory=lambda: list(DEFAULT_SEQ_LENS))
    timing: bool = True
    timing_budget_s: float = DEFAULT_TIMING_BUDGET_S
    device: str = "cpu"
    threads: int | None = DEFAULT_THREADS
    jobs: int = field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)))

    def __post_init__(self):
        for name in ("layers", "dim", "heads", "steps", "batch_size", "eval_batches", "eval_batch_size", "jobs"):
            check_int(name, getattr(self, name), 1)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if self.mechanisms is not None and not self.mechanisms:
            raise ValueError("mechanisms must name at least one mechanism (or be None for all)")
        if "seed" in self.task_options:
            raise ValueError("the task seed follows each run's seed: give --seeds, not --task-option seed=...")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative ints, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        if not self.seq_lens or any(not isinstance(n, int) or n < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens must be positive ints, got {self.seq_lens!r}")
        if not (isinstance(self.timing_budget_s, (int, float)) and self.timing_budget_s > 0):
            raise ValueError(f"timing_budget_s must be a positive number, got {self.timing_budget_s!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")


# --- what runs ------------------------------------------------------------------------------------

def _takes(task_cls, key: str) -> bool:
    return key in inspect.signature(task_cls.__init__).parameters


def _is_image_task(task) -> bool:
    return hasattr(task, "image_size") and hasattr(task, "patch")


def _unfit(task, spec) -> str | None:
    """Why mechanism `spec` cannot train on `task` (None when it can)."""
    if spec.layout == "2d" and not _is_image_task(task):
        return f"{spec.name!r} is a 2-D mechanism and task {task.name!r} has no image grid"
    if task.causal and not spec.causal:
        return f"task {task.name!r} trains a causal model and {spec.name!r} has no causal mode (spec.causal=False)"
    return None


def _select(config: ArenaConfig, *, log=None) -> tuple[list, list[str], list[dict[str, str]]]:
    """(task instances for seed 0, mechanism names, skipped entries); ValueError/TypeError on bad names.

    A task option (--task-option KEY=VALUE) goes to every selected task whose constructor takes KEY.
    A default task whose data are missing (FALLBACK_TASKS) is replaced, with a log line.
    """

    classes = {name: get_task(name) for name in config.tasks}          # unknown task: the registry's error
    for key in config.task_options:
        if not any(_takes(cls, key) for cls in classes.values()):
            raise ValueError(f"no selected task takes the option {key!r} (tasks: {', '.join(config.tasks)})")
    tasks = []
    for name in config.tasks:
        def build(task_name: str):
            cls = get_task(task_name)
            options = {**DEFAULT_TASK_OPTIONS.get(task_name, {}),
                       **{k: v for k, v in config.task_options.items() if _takes(cls, k)}}
            return create_task(task_name, **options)
        try:
            tasks.append(build(name))
        except (FileNotFoundError, OSError, ImportError) as e:
            fallback = FALLBACK_TASKS.get(name)
            if fallback is None or fallback in config.tasks:
                raise ValueError(f"task {name!r} cannot load its data: {e}") from e
            if log is not None:
                log(f"task {name!r} cannot load its data ({describe_error(e)}); using {fallback!r} instead")
            tasks.append(build(fallback))
    if config.mechanisms is None:
        names = [s.name for s in list_specs(layout="seq")] + [s.name for s in list_specs(layout="2d")]
    else:
        names = list(dict.fromkeys(config.mechanisms))
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"mechanism names must be non-empty strings, got {name!r}")
            spec = get_spec(name)                    # unknown: ValueError with close names
            if spec.layout not in ("seq", "2d"):
                raise ValueError(f"the arena trains sequence and 2-D models; {name!r} has layout {spec.layout!r} "
                                 "(attnlab list --layout seq, attnlab list --layout 2d)")
    unknown = sorted(set(config.options) - set(names))
    if unknown:
        raise ValueError(f"--options names {unknown}, which the arena does not run (running: {', '.join(names)})")
    skipped = []
    for task in tasks:
        for name in names:
            reason = _unfit(task, get_spec(name))
            if reason:
                skipped.append({"task": task.name, "mechanism": name, "reason": reason})
    return tasks, names, skipped


def _mechanism_options(config: ArenaConfig, name: str) -> dict[str, Any]:
    base = name.split(":")[0]
    return {**DEFAULT_MECHANISM_OPTIONS.get(base, {}), **config.options.get(name, {})}


def _train_one(config: ArenaConfig, task_name: str, task_options: dict[str, Any], mechanism: str,
               seed: int) -> dict[str, Any]:
    """Train one model (in a worker process when config.jobs > 1): the row's per-seed numbers."""
    from rich.console import Console

    layer = {"name": mechanism, **_mechanism_options(config, mechanism)}
    train_config = TrainConfig(
        task=task_name, task_options=task_options,
        layers=[layer] * config.layers, dim=config.dim, num_heads=config.heads, mlp_ratio=config.mlp_ratio,
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup=min(config.warmup, config.steps),
        eval_every=max(1, config.steps // CURVE_POINTS), eval_batches=config.eval_batches,
        eval_batch_size=config.eval_batch_size, log_every=config.steps, checkpoint_every=0, seed=seed,
        device=config.device, threads=config.threads)
    t0 = time.perf_counter()
    result = train(train_config, None, progress=config.jobs == 1 and Console(stderr=True).is_terminal)
    quality = get_task(task_name).quality
    return {"seed": seed, "quality": result.final[f"val_{quality}"], "final": result.final,
            "curve": [[h["step"], h[f"val_{quality}"]] for h in result.history],
            "params": result.params, "tokens_per_s": result.tokens_per_s, "train_s": time.perf_counter() - t0}


def _timing_entries(measured: dict[str, Any], name: str, seq_lens: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in seq_lens:
        t = measured["timings"].get(n, {}).get(name, {"status": "skipped", "reason": "not measured"})
        m = measured["memories"].get((n, name), {})
        ok = t.get("status") == "ok"
        out.append({"seq_len": n, "status": "ok" if ok else "skipped",
                    # why it was not timed, or else why memory or FLOPs were not measured
                    "reason": m.get("reason") if ok else t.get("reason"),
                    "fwd_ms": bench.median(t.get("fwd_ms")), "fwd_bwd_ms": bench.median(t.get("fwd_bwd_ms")),
                    "fwd_ms_iqr": bench.iqr(t.get("fwd_ms")), "fwd_bwd_ms_iqr": bench.iqr(t.get("fwd_bwd_ms")),
                    "repeats": len(t.get("fwd_ms") or []),
                    "peak_mem_mb": m.get("peak_mem_mb"), "mem_method": m.get("mem_method"),
                    "flops_fwd": m.get("flops_fwd"), "flops_bwd": m.get("flops_bwd")})
    return out


def _aggregate(task, mechanism: str, options: dict, runs: list[dict], failures: list[dict]) -> dict[str, Any]:
    row: dict[str, Any] = {"rank": None, "task": task.name, "mechanism": mechanism, "options": options,
                           "status": "ok" if runs else "failed",
                           "error": None if runs else failures[0]["error"],
                           "quality_metric": task.quality, "higher_is_better": task.higher_is_better,
                           "seeds": [r["seed"] for r in runs], "failed_seeds": failures,
                           "quality": None, "quality_std": None, "quality_per_seed": [r["quality"] for r in runs],
                           "params": None, "tokens_per_s": None, "train_s": None, "final": {},
                           "curves": {}, "difficulty": {}}
    if runs:
        qualities = row["quality_per_seed"]
        row["quality"] = statistics.fmean(qualities)
        row["quality_std"] = statistics.stdev(qualities) if len(qualities) > 1 else None
        row["params"] = runs[0]["params"]
        row["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in runs)
        row["train_s"] = statistics.fmean(r["train_s"] for r in runs)
        row["final"] = {k: statistics.fmean(r["final"][k] for r in runs) for k in runs[0]["final"]}
        row["curves"] = {str(r["seed"]): r["curve"] for r in runs}
        row["difficulty"] = difficulty(row["final"], task.quality)
    return row


def difficulty(final: dict[str, float], quality: str) -> dict[str, dict[str, float]]:
    """The quality broken down by difficulty, from a task's val_{quality}_p{P} / _d{lo}_{hi} metrics.

    {"pairs": {"2": 1.0, "4": 0.98, ...}, "distance": {"0-8": 1.0, "8-16": 0.9, ...}} ({} for tasks
    without a breakdown), in increasing difficulty.
    """
    out: dict[str, dict[str, float]] = {}
    prefix = f"val_{quality}_"
    pairs, distance = [], []
    for key, value in final.items():
        if not key.startswith(prefix):
            continue
        tail = key[len(prefix):]
        if tail[:1] == "p" and tail[1:].isdigit():
            pairs.append((int(tail[1:]), value))
        elif tail[:1] == "d" and "_" in tail and all(p.isdigit() for p in tail[1:].split("_")):
            lo, hi = map(int, tail[1:].split("_"))
            distance.append((lo, hi, value))
    if pairs:
        out["pairs"] = {str(p): v for p, v in sorted(pairs)}
    if distance:
        out["distance"] = {f"{lo}-{hi}": v for lo, hi, v in sorted(distance)}
    return out


def rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one task, best quality first (by its direction), failed last; sets `rank` and `tie`.

    With several seeds, a row whose mean lies within the spread of the row ranked above it (the
    larger of the two standard deviations) is a tie: it shares that row's rank and `tie` is True.
    With one seed there is no spread and every row gets its own rank (`tie` False).
    """
    ok = [r for r in rows if r["status"] == "ok" and r["quality"] is not None and math.isfinite(r["quality"])]
    rest = [r for r in rows if r not in ok]
    ok.sort(key=lambda r: (-r["quality"] if r["higher_is_better"] else r["quality"], r["mechanism"]))
    for i, r in enumerate(ok, 1):
        prev = ok[i - 2] if i > 1 else None
        spread = max(prev.get("quality_std") or 0.0, r.get("quality_std") or 0.0) if prev else 0.0
        r["tie"] = bool(prev and spread > 0 and abs(prev["quality"] - r["quality"]) <= spread)
        r["rank"] = prev["rank"] if r["tie"] else i
    for r in rest:
        r["rank"], r["tie"] = None, False
    return ok + sorted(rest, key=lambda r: r["mechanism"])


def _environment(config: ArenaConfig, timing_env: dict[str, Any] | None) -> dict[str, Any]:
    threads = config.threads or torch.get_num_threads()
    return {**software_and_machine(), "train_threads": threads,
            "timing_threads": (timing_env or {}).get("num_threads"), "gpu": gpu_name(_device(config))}


def _device(config: ArenaConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


# --- the run --------------------------------------------------------------------------------------

def run(config: ArenaConfig, *, log=None) -> dict[str, Any]:
    """Train, time and rank; returns the arena.json document (writes nothing).

    `log(text)` gets a line per trained model and per measuring step (default: stderr).
    TrainInterrupted (Ctrl-C during training) propagates.
    """

    if log is None:
        def log(text: str) -> None:
            print(text, file=sys.stderr, flush=True)
    started, load_start = time.perf_counter(), loadavg()
    device = _device(config)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda, but torch.cuda.is_available() is False")
    tasks, names, skipped = _select(config, log=log)
    skipped_keys = {(s["task"], s["mechanism"]) for s in skipped}
    jobs = [(task, name) for task in tasks for name in names if (task.name, name) not in skipped_keys]
    for s in skipped:
        log(f"skip {s['task']} {s['mechanism']}: {s['reason']}")

    work = [(task, name, seed) for task, name in jobs for seed in config.seeds]
    results: dict[tuple[str, str], tuple[list, list]] = {(t.name, n): ([], []) for t, n in jobs}

    def record(task, name: str, seed: int, outcome: dict | BaseException, seconds: float, done: int) -> None:
        runs, failures = results[(task.name, name)]
        head = f"[{time.perf_counter() - started:6.1f} s] {done}/{len(work)} {task.name} {name} seed {seed}"
        if isinstance(outcome, BaseException):     # a mechanism that cannot train is a failed row, not the end
            failures.append({"seed": seed, "error": describe_error(outcome)})
            log(f"{head}: FAILED after {seconds:.1f} s: {describe_error(outcome)}")
            return
        runs.append(outcome)
        log(f"{head}: {task.quality} {outcome['quality']:.4f}, {outcome['params']:,} params, "
            f"{outcome['tokens_per_s']:,.0f} tokens/s, {outcome['train_s']:.1f} s")

    def args_of(task, name: str, seed: int) -> tuple:
        return (config, task.name, {k: v for k, v in task.options().items() if k != "seed"}, name, seed)

    if config.jobs == 1 or len(work) <= 1:
        for i, (task, name, seed) in enumerate(work, 1):
            t0 = time.perf_counter()
            try:
                outcome = _train_one(*args_of(task, name, seed))
            except TrainInterrupted:
                raise
            except Exception as e:
                outcome = e
            record(task, name, seed, outcome, time.perf_counter() - t0, i)
    else:
        # Worker processes, one intra-op thread each (config.threads): the models are small enough
        # that two processes on two cores train about twice as fast as one process with two threads.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=config.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_train_one, *args_of(*w)): (w, time.perf_counter()) for w in work}
            try:
                for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    (task, name, seed), t0 = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as e:
                        outcome = e
                    record(task, name, seed, outcome, time.perf_counter() - t0, i)
            except KeyboardInterrupt:
                for future in futures:
                    future.cancel()
                raise TrainInterrupted(2, 0, None, None) from None
    rows = []
    for task, name in jobs:
        runs, failures = results[(task.name, name)]
        runs.sort(key=lambda r: r["seed"])
        rows.append(_aggregate(task, name, _mechanism_options(config, name), runs, failures))

    # One layer of each mechanism that ran, timed causally where its task is causal.
    timing_env = None
    if config.timing:
        for causal in sorted({t.causal for t in tasks}):
            # The timing layer takes (B, N, C) tokens; a 2-D one sees them as a square image.
            timed = list(dict.fromkeys(n for t, n in jobs if t.causal == causal
                                       and get_spec(n).layout in ("seq", "2d")))
            if not timed:
                continue
            log(f"[{time.perf_counter() - started:6.1f} s] timing one layer of {len(timed)} mechanism(s) at "
                f"N={','.join(map(str, config.seq_lens))} ({'causal' if causal else 'not causal'}), "
                f"a fresh process each")
            job_common = {"heads": config.heads, "head_dim": config.dim // config.heads, "batch": 1,
                          "dtype": "float32", "causal": causal, "device": device, "threads": config.threads,
                          "timeout": TIMING_PROCESS_TIMEOUT_S}
            measured = bench.measure([{"name": n, "options": _mechanism_options(config, n)} for n in timed],
                                     list(config.seq_lens), job_common, baseline=None, warmup=1,
                                     budget_s=config.timing_budget_s,
                                     log=lambda text: log(f"[{time.perf_counter() - started:6.1f} s] {text}"))
            timing_env = timing_env or measured["env"]
            for row in rows:
                task = next(t for t in tasks if t.name == row["task"])
                if task.causal == causal and row["mechanism"] in timed:
                    row["timing"] = _timing_entries(measured, row["mechanism"], list(config.seq_lens))
    for row in rows:
        row.setdefault("timing", [])

    ranked = []
    for task in tasks:
        ranked += rank_rows([r for r in rows if r["task"] == task.name])
    environment = _environment(config, timing_env)
    environment["loadavg_start"], environment["loadavg_end"] = load_start, loadavg()
    return {"format": FORMAT, "options": {**asdict(config), "mechanisms": names},
            "environment": environment,
            "tasks": [{"name": t.name, "options": {k: v for k, v in t.options().items() if k != "seed"},
                       "quality": t.quality, "higher_is_better": t.higher_is_better, "causal": t.causal,
                       "seq_len": t.seq_len} for t in tasks],
            "rows": ranked, "skipped": skipped, "wall_s": time.perf_counter() - started}


# --- table and plot -------------------------------------------------------------------------------


def _quality_text(row: dict[str, Any]) -> str:
    if row["quality"] is None:
        return "-"
    text = f"{row['quality']:.4f}"
    return text + (f" ± {row['quality_std']:.4f}" if row["quality_std"] is not None else "")


def print_tables(doc: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table
    opts = doc["options"]
    seq_lens = opts["seq_lens"] if opts["timing"] else []
    for task in doc["tasks"]:
        rows = [r for r in doc["rows"] if r["task"] == task["name"]]
        direction = "higher" if task["higher_is_better"] else "lower"
        seeds = opts["seeds"]
        mlp = f"MLP ratio {opts['mlp_ratio']:g}" if opts["mlp_ratio"] else "no MLP"
        layers = f"{opts['layers']} layer{'s' if opts['layers'] > 1 else ''}"
        table = Table(title=f"attnlab arena: {task['name']} ({task['seq_len']} tokens); {layers} of "
                            f"the mechanism, {mlp}, dim {opts['dim']}, {opts['heads']} heads; {opts['steps']} steps "
                            f"of {opts['batch_size']}, lr {opts['lr']:g}; seed{'s' if len(seeds) > 1 else ''} "
                            f"{','.join(map(str, seeds))}; {doc['environment']['train_threads']} thread(s)")
        table.add_column("#", justify="right")
        table.add_column("mechanism", no_wrap=True)
        table.add_column(f"{task['quality']} ({direction} is better)" + (" mean ± std" if len(seeds) > 1 else ""),
                         justify="right")
        for col in ("params", "train tok/s"):
            table.add_column(col, justify="right")
        for n in seq_lens:
            table.add_column(f"fwd ms\nN={n}", justify="right")
            table.add_column(f"fwd+bwd ms\nN={n}", justify="right")
        if seq_lens:
            table.add_column(f"peak MB\nN={seq_lens[-1]}", justify="right")
        table.add_column("note")
        for r in rows:
            timing = {t["seq_len"]: t for t in r.get("timing", [])}
            cells = []
            notes = []
            for n in seq_lens:
                t = timing.get(n, {})
                cells += [fmt(t.get("fwd_ms"), ".2f"), fmt(t.get("fwd_bwd_ms"), ".2f")]
                if t.get("reason"):
                    notes.append(f"N={n}: {t['reason']}")
            if seq_lens:
                cells.append(fmt(timing.get(seq_lens[-1], {}).get("peak_mem_mb"), ".1f"))
            if r["status"] != "ok":
                notes.insert(0, f"failed: {r['error']}")
            elif r["failed_seeds"]:
                notes.insert(0, "failed seeds " + ", ".join(f"{f['seed']} ({f['error']})" for f in r["failed_seeds"]))
            rank = fmt(r["rank"], "d") + ("=" if r.get("tie") else "")
            table.add_row(rank, escape(r["mechanism"]), _quality_text(r), fmt(r["params"], ","),
                          fmt(r["tokens_per_s"], ",.0f"), *cells, escape("; ".join(notes)),
                          style="dim" if r["status"] != "ok" else None)
        console.print(table)
        _print_difficulty(task, rows, console)
    if any(r.get("tie") for r in doc["rows"]):
        console.print("a rank with '=' ties the row above it: the means differ by less than the larger standard "
                      "deviation over seeds", style="dim", highlight=False)
    elif len(doc["options"]["seeds"]) == 1:
        console.print("one seed: no spread, so close ranks may be noise (--seeds 0,1,2 gives mean ± std and ties)",
                      style="dim", highlight=False)
    if seq_lens:
        console.print("times: medians of one layer, B=1, float32, causal where the task is; peak MB: growth of a "
                      "fresh process's memory over one forward+backward of that layer", style="dim", highlight=False)
    if doc["skipped"]:
        console.print("skipped: " + "; ".join(f"{s['mechanism']} on {s['task']}: {s['reason']}"
                                              for s in doc["skipped"]), highlight=False, markup=False)


def _print_difficulty(task: dict[str, Any], rows: list[dict[str, Any]], console) -> None:
    """Per task with a difficulty breakdown: the quality at each pair count and query distance."""
    from rich.markup import escape
    from rich.table import Table
    ok = [r for r in rows if r["status"] == "ok" and r.get("difficulty")]
    if not ok:
        return
    axes = [(axis, list(ok[0]["difficulty"].get(axis, {}))) for axis in ("pairs", "distance")]
    table = Table(title=f"{task['name']}: {task['quality']} by difficulty (key-value pairs; tokens from a query "
                        "back to its key)")
    table.add_column("mechanism", no_wrap=True)
    for axis, keys in axes:
        for k in keys:
            table.add_column(f"{'P' if axis == 'pairs' else 'dist'}\n{k}", justify="right")
    for r in ok:
        cells = [fmt(r["difficulty"].get(axis, {}).get(k), ".3f") for axis, keys in axes for k in keys]
        table.add_row(escape(r["mechanism"]), *cells)
    console.print(table)


def _label_points(ax, points: list[tuple[float, float, str]], dpi: float) -> None:
    """Name each point to its upper right, moving a label up or down where it would cover another."""
    px = dpi / 72                                          # display pixels per typographic point
    placed: list[tuple[float, float, float, float]] = []  # label boxes in display pixels
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        X, Y = ax.transData.transform((x, y))
        width, height = (5.2 * len(name) + 4) * px, 10 * px
        for dy in (3, -11, 14, -22, 25, -33, 36):
            box = (X + 5 * px, Y + dy * px, X + 5 * px + width, Y + dy * px + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Quality against forward+backward time of one layer at the largest N, a subplot per task."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    tasks = doc["tasks"]
    colors = matplotlib.colormaps["tab20"].colors[::2] + matplotlib.colormaps["tab20"].colors[1::2]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    order = list(doc["options"]["mechanisms"])
    n_max = max(doc["options"]["seq_lens"]) if doc["options"]["timing"] else None
    fig = Figure(figsize=(7.5 * len(tasks), 5.2), dpi=120)
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        points = []
        for r in doc["rows"]:
            t = {e["seq_len"]: e for e in r.get("timing", [])}.get(n_max, {})
            if r["task"] == task["name"] and r["status"] == "ok" and t.get("fwd_bwd_ms"):
                points.append((t["fwd_bwd_ms"], r["quality"], r["quality_std"] or 0.0, r["mechanism"]))
        for x, y, err, name in points:          # a mechanism has the same colour in every subplot
            color = colors[order.index(name) % len(colors)] if name in order else "black"
            ax.errorbar([x], [y], yerr=[err] if err else None, fmt="o", capsize=3, color=color)
        if points:
            ax.set_xscale("log")
            ax.margins(x=0.12, y=0.1)
            xs = [p[0] for p in points]
            ax.xaxis.set_major_formatter(plain)   # plain milliseconds, not powers of ten
            ax.xaxis.set_minor_formatter(plain if max(xs) / min(xs) < 20 else NullFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.autoscale_view()
            _label_points(ax, [(x, y, name) for x, y, _, name in points], fig.dpi)
        else:
            ax.text(0.5, 0.5, "no mechanism both trained and timed", ha="center", va="center",
                    transform=ax.transAxes)
        direction = "higher" if task["higher_is_better"] else "lower"
        ax.set_xlabel(f"one layer forward + backward at N={n_max}, median ms (log)")
        ax.set_ylabel(f"{task['quality']} after {doc['options']['steps']} steps ({direction} is better)")
        seeds = doc["options"]["seeds"]
        layers = doc["options"]["layers"]
        ax.set_title(f"{task['name']}: {layers} layer{'s' if layers > 1 else ''}, dim {doc['options']['dim']}"
                     + (f"; mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"; seed {seeds[0]}"),
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_difficulty(doc: dict[str, Any], path: Path) -> bool:
    """Quality against difficulty, a line per mechanism: a row of (pairs, distance) panels per task
    with a breakdown. Returns False (and writes nothing) when no task has one."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for task in doc["tasks"]:
        rows = [r for r in doc["rows"] if r["task"] == task["name"] and r["status"] == "ok" and r.get("difficulty")]
        for axis in ("pairs", "distance"):
            if any(axis in r["difficulty"] for r in rows):
                panels.append((task, axis, rows))
    if not panels:
        return False
    colors = matplotlib.colormaps["tab20"].colors[::2] + matplotlib.colormaps["tab20"].colors[1::2]
    order = list(doc["options"]["mechanisms"])
    fig = Figure(figsize=(6.5 * len(panels), 4.8), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    seeds = doc["options"]["seeds"]
    for ax, (task, axis, rows) in zip(axes, panels):
        for r in rows:
            points = r["difficulty"].get(axis, {})
            labels, values = list(points), list(points.values())
            color = colors[order.index(r["mechanism"]) % len(colors)] if r["mechanism"] in order else "black"
            ax.plot(range(len(values)), values, marker="o", color=color, label=r["mechanism"])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("key-value pairs in the sequence" if axis == "pairs"
                      else "tokens from the query back to its key")
        ax.set_ylabel(f"{task['quality']} after {doc['options']['steps']} steps")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task['name']} ({task['seq_len']} tokens): by {axis}; "
                     + (f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return True


# --- command line ---------------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}")
    return list(dict.fromkeys(names))


def _seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            seed = -1
        if seed < 0:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive_float, non_negative_float = float_above(0), float_above(0, inclusive=True)
    d = ArenaConfig()
    positive = int_at_least(1)
    parser.add_argument("--tasks", type=_names, default=list(DEFAULT_TASKS), metavar="A,B,...",
                        help=f"tasks to train (default: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--mechanisms", type=_names, default=None, metavar="A,B,...",
                        help="mechanisms, 'name' or 'name:variant' (default: every layout='seq' mechanism)")
    parser.add_argument("--options", metavar="JSON",
                        help='mechanism options for every layer, e.g. \'{"moh": {"top_k": 2}}\'')
    parser.add_argument("--task-option", dest="task_option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="an option of every task, e.g. num_pairs=4 (repeatable; "
                        f"defaults: {json.dumps(DEFAULT_TASK_OPTIONS)})")
    parser.add_argument("--layers", type=positive, default=d.layers, help=f"blocks per model (default: {d.layers})")
    parser.add_argument("--dim", type=positive, default=d.dim, help=f"model width (default: {d.dim})")
    parser.add_argument("--heads", type=positive, default=d.heads, help=f"attention heads (default: {d.heads})")
    parser.add_argument("--mlp-ratio", type=non_negative_float, default=d.mlp_ratio,
                        help=f"MLP width / dim in each block; 0 = attention only (default: {d.mlp_ratio:g})")
    parser.add_argument("--steps", type=positive, default=d.steps, help=f"training steps (default: {d.steps})")
    parser.add_argument("--batch-size", type=positive, default=d.batch_size,
                        help=f"training batch size (default: {d.batch_size})")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    parser.add_argument("--warmup", type=int_at_least(0), default=d.warmup,
                        help=f"linear warm-up steps (default: {d.warmup})")
    parser.add_argument("--eval-batches", type=positive, default=d.eval_batches,
                        help=f"validation batches of {d.eval_batch_size} for the quality (default: {d.eval_batches})")
    parser.add_argument("--eval-batch-size", type=positive, default=d.eval_batch_size,
                        help=f"rows per validation batch (default: {d.eval_batch_size})")
    parser.add_argument("--seeds", type=_seeds, default=list(d.seeds), metavar="S,S,...",
                        help="seeds of weights and data; several give mean ± std (default: 0)")
    parser.add_argument("--seq-lens", type=int_list, default=list(DEFAULT_SEQ_LENS), metavar="N,N,...",
                        help=f"sequence lengths of the timing (default: {','.join(map(str, DEFAULT_SEQ_LENS))})")
    parser.add_argument("--timing-budget", type=positive_float, default=d.timing_budget_s, metavar="SECONDS",
                        help=f"timed seconds per sequence length (default: {d.timing_budget_s:g})")
    parser.add_argument("--no-timing", action="store_true", help="train and rank only; no timing or memory")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="(default: cpu)")
    parser.add_argument("--threads", type=positive, default=DEFAULT_THREADS,
                        help=f"torch intra-op threads for training and timing (default: {DEFAULT_THREADS}; "
                             "these models are too small to gain from more)")
    parser.add_argument("--jobs", type=positive, default=d.jobs,
                        help=f"models trained at once, each in its own process (default: {d.jobs}, "
                             "up to 2 of this machine's cores)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a seconds-long smoke run: {QUICK_STEPS} steps, MQAR sweep only unless --tasks, "
                             "one small validation batch, no timing")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: arena-results/<timestamp>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of the table")


def config_from_args(args: argparse.Namespace) -> ArenaConfig:
    options = {}
    if args.options:
        running = args.mechanisms if args.mechanisms is not None else \
            [s.name for s in list_specs(layout="seq")] + [s.name for s in list_specs(layout="2d")]
        options = bench.parse_options(args.options, running)
    quick = getattr(args, "quick", False)
    tasks = args.tasks
    if quick and tasks == list(DEFAULT_TASKS):
        tasks = ["mqar_sweep"]
    return ArenaConfig(tasks=tasks, mechanisms=args.mechanisms, options=options,
                       task_options=dict(args.task_option), layers=args.layers, dim=args.dim, heads=args.heads,
                       mlp_ratio=args.mlp_ratio, steps=QUICK_STEPS if quick else args.steps,
                       batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, QUICK_STEPS) if quick
                       else args.warmup, eval_batches=1 if quick else args.eval_batches,
                       eval_batch_size=32 if quick else args.eval_batch_size, seeds=args.seeds,
                       seq_lens=args.seq_lens, timing=not (args.no_timing or quick),
                       timing_budget_s=args.timing_budget, device=args.device, threads=args.threads,
                       jobs=getattr(args, "jobs", None) or ArenaConfig().jobs)


def command(config: ArenaConfig) -> str:
    """The `attnlab arena` command line that repeats `config` (every setting spelled out)."""
    d = config
    parts = ["attnlab", "arena", "--tasks", ",".join(d.tasks)]
    if d.mechanisms is not None:
        parts += ["--mechanisms", ",".join(d.mechanisms)]
    if d.options:
        parts += ["--options", json.dumps(d.options)]
    for key, value in d.task_options.items():
        parts += ["--task-option", f"{key}={json.dumps(value)}"]
    parts += ["--layers", str(d.layers), "--dim", str(d.dim), "--heads", str(d.heads),
              "--mlp-ratio", repr(float(d.mlp_ratio)), "--steps", str(d.steps), "--batch-size", str(d.batch_size),
              "--lr", repr(float(d.lr)), "--warmup", str(d.warmup), "--eval-batches", str(d.eval_batches),
              "--eval-batch-size", str(d.eval_batch_size), "--seeds", ",".join(map(str, d.seeds)),
              "--jobs", str(d.jobs)]
    if d.timing:
        parts += ["--seq-lens", ",".join(map(str, d.seq_lens)), "--timing-budget", repr(float(d.timing_budget_s))]
    else:
        parts.append("--no-timing")
    parts += ["--device", d.device] + (["--threads", str(d.threads)] if d.threads else [])
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        config = config_from_args(args)
        _select(config)                                   # every name and option checked before any work
    except (ValueError, TypeError) as e:
        print(f"attnlab arena: {e}", file=sys.stderr)
        return 2
    err = Console(stderr=True)
    try:
        doc = run(config, log=lambda text: err.print(text, highlight=False, markup=False, soft_wrap=True))
    except TrainInterrupted as e:
        print(f"attnlab arena: interrupted ({e}); nothing written", file=sys.stderr)
        return e.exit_code
    except (ValueError, TypeError) as e:
        print(f"attnlab arena: {e}", file=sys.stderr)
        return 2
    doc["command"] = command(config)
    out_dir = args.out if args.out is not None else default_out("arena-results")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "arena.json"]
    written[0].write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        for row in doc["rows"]:
            print(json.dumps(row))
    else:
        print_tables(doc, Console() if Console().is_terminal else Console(width=200))
    if not args.no_plot:
        written.append(out_dir / "arena.png")
        plot(doc, written[-1])
        if plot_difficulty(doc, out_dir / "difficulty.png"):
            written.append(out_dir / "difficulty.png")
    ok = sum(r["status"] == "ok" for r in doc["rows"])
    err.print(f"{ok}/{len(doc['rows'])} models trained, {len(doc['skipped'])} skipped, in {doc['wall_s']:.1f} s; "
              f"wrote {', '.join(map(str, written))}", highlight=False, markup=False, soft_wrap=True)
    return 0


__all__ = ["ArenaConfig", "run", "rank_rows", "print_tables", "plot", "add_arguments", "config_from_args", "main",
           "DEFAULT_TASK_OPTIONS"]
