"""`attnlab bench`: time and memory of sequence mechanisms against a baseline measured in the same run.

For each shape (B, N, h, d), every chosen mechanism and the baseline are timed in one fresh
process, round-robin across repeats with an order that rotates each round, so that drift on a
noisy machine hits them all alike. A row reports median times and, against the baseline, the
median over rounds of the two modules' paired time ratio. Peak memory is measured in a fresh
process per (mechanism, shape), so that one configuration's allocations cannot pollute another's.
`attnlab.bench.worker` does the measuring (and says how); this module checks the
arguments, sends the jobs and writes the table, the JSONL rows and the plot.

Fresh processes come from fork servers on Linux: interpreters that have imported torch and the
mechanisms, and fork one child per job, which takes milliseconds rather than the seconds a new
interpreter takes to import torch. Elsewhere each job starts a new interpreter.

The default baseline `sdpa` is `SDPABaseline` below: the dense attention a user writes by hand,
Linear -> F.scaled_dot_product_attention -> Linear. It is not a registry mechanism; `--baseline`
may also name a registry mechanism.

FLOPs: a mechanism class may define `useful_flops(batch, seq_len, dim, num_heads, causal) ->
(fwd_flops, bwd_flops)` (a classmethod, staticmethod or method). Otherwise one forward and one
backward are counted with `torch.utils.flop_counter.FlopCounterMode`, in which the fused SDPA
kernels count their useful work (the pairs a causal mask keeps, no recompute) and every other op
counts what it executes.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from attnlab._args import float_above, int_at_least, int_list
from attnlab._io import default_out, fmt
from attnlab.bench import numerics as bench_numerics
from attnlab.bench.adapters import BASELINE, BENCH_LAYOUTS, DTYPES, parse_options

# Defaults sized so that `attnlab bench` with every registered sequence mechanism (a dozen when this
# was tuned, several of them eager) takes about a minute on 2 CPU cores; the largest N dominates,
# and N=1024 would add about half a minute more. Pass --seq-lens 256,512,1024,2048 for long runs.
DEFAULT_SEQ_LENS = (128, 256, 512)
# Without --repeats: as many timed rounds per shape as fit in --budget seconds, within these bounds.
DEFAULT_BUDGET_S = 3.0
MIN_REPEATS, MAX_REPEATS = 3, 30
WORKER_MODULE = "attnlab.bench.worker"


def resolve_names(mechanisms: str | None, baseline: str) -> list[str]:
    """The mechanisms to time, checked; ValueError (with the registry's hints) otherwise."""
    from attnlab.registry import get_spec, list_specs
    if mechanisms is None:
        names = [s.name for s in list_specs(layout="seq")]
    else:
        names = []
        for raw in mechanisms.split(","):
            name = raw.strip()
            if not name:
                raise ValueError(f"empty mechanism name in --mechanisms {mechanisms!r}")
            if name not in names:
                names.append(name)
    for name in [*names, baseline]:
        if name == BASELINE:
            continue
        spec = get_spec(name)  # ValueError: unknown mechanism, with close names
        if spec.layout not in BENCH_LAYOUTS:
            raise ValueError(f"bench times layouts {BENCH_LAYOUTS} on N tokens; {name!r} has layout {spec.layout!r}")
    return names


# --- arguments -----------------------------------------------------------------------------------


_seconds = float_above(0, what="number of seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = int_at_least(1)
    parser.add_argument("--mechanisms", metavar="A,B,...",
                        help="comma-separated registry names (default: every layout='seq' mechanism); "
                             f"'{BASELINE}' is the hand-written baseline")
    parser.add_argument("--seq-lens", type=int_list, default=list(DEFAULT_SEQ_LENS), metavar="N,N,...",
                        help=f"sequence lengths (default: {','.join(map(str, DEFAULT_SEQ_LENS))})")
    parser.add_argument("--heads", type=positive, default=8, help="attention heads h (default: 8)")
    parser.add_argument("--head-dim", type=positive, default=64, help="head dim d; width C = h*d (default: 64)")
    parser.add_argument("--batch", type=positive, default=1, help="batch size B (default: 1)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="(default: float32)")
    parser.add_argument("--causal", action="store_true", help="is_causal=True (skips mechanisms without causal)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="(default: cuda when available, else cpu)")
    parser.add_argument("--warmup", type=int_at_least(0), default=None,
                        help="untimed rounds after a first trial call of each module (default: 1, or 0 where "
                             "the trial calls took longer than --budget)")
    parser.add_argument("--repeats", type=positive, default=None,
                        help=f"timed rounds per shape (default: as many as fit in --budget, {MIN_REPEATS} to "
                             f"{MAX_REPEATS}; while a ratio to the baseline is still uncertain, more, up to "
                             "twice the budget)")
    parser.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"timed seconds per shape without --repeats (default: {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--baseline", default=BASELINE,
                        help=f"what the ratios are relative to: '{BASELINE}' (hand-written dense SDPA, "
                             "the default) or a registry mechanism")
    parser.add_argument("--options", metavar="JSON",
                        help='mechanism options as JSON, e.g. \'{"moh": {"top_k": 2}}\'')
    parser.add_argument("--threads", type=positive, default=None,
                        help="torch intra-op threads in the measuring processes (default: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: bench-results/<timestamp>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines instead of the table")
    parser.add_argument("--timeout", type=positive, default=900,
                        help="seconds before one measuring process is abandoned (default: 900)")
    parser.add_argument("--neighborhood", nargs="?", const="1d,2d,3d", default=None, metavar="CASES",
                        help="instead of mechanisms, time neighborhood attention (forward+backward, fp32, h=8, "
                             "d=64) against dense SDPA on the same tokens: 1d N=16384 k=127, 2d 128x128 k=13, "
                             "3d 16x32x32 k=(3,7,7); CASES a subset (default: all); uses --repeats (default 3), "
                             "--warmup, --threads, --json")
    parser.add_argument("--numerics", action="store_true",
                        help="instead of mechanisms, time the Edge-MoE softmax/GELU approximations against "
                             "the exact ops on (rows, M) = (N*h, N) score rows, with their max errors")


# --- measuring processes -------------------------------------------------------------------------

class _ForkServer:
    """`python -m attnlab.bench.worker --serve`: one job at a time, each in a forked child."""

    def __init__(self):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, so a chatty server never blocks
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def wait_ready(self) -> None:
        self.proc.stdout.readline()  # {"ready": true}, or "" when it failed (reported by run)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        line = ""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps(job) + "\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except OSError:
                pass
        if line:
            return json.loads(line)
        self.proc.kill()  # the server itself died (its children's failures are answers): say why
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
        return {"error": f"worker server exited with code {code}: {tail or 'no output'}"}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


class _NewInterpreter:
    """Where there is no fork: a new interpreter per job, its answer on the last stdout line."""

    def wait_ready(self) -> None:
        pass

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        timeout = job.get("timeout", 900)
        try:
            proc = subprocess.run([sys.executable, "-m", WORKER_MODULE], input=json.dumps(job),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            try:
                return json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"worker exited with code {proc.returncode}: {tail or 'no output'}"}

    def close(self) -> None:
        pass


def _start_workers(count: int) -> list:
    # Fork servers on Linux only: elsewhere forking a process that has loaded torch is not safe
    # (macOS system frameworks) or not possible (Windows).
    kind = _ForkServer if sys.platform.startswith("linux") else _NewInterpreter
    workers = [kind() for _ in range(count)]
    for w in workers:  # every server has finished importing before anything is timed
        w.wait_ready()
    return workers


def measure(entries: list[dict[str, Any]], seq_lens: list[int], job_common: dict[str, Any], *,
            baseline: str | None, warmup: int | None = None, repeats: int | None = None,
            budget_s: float = DEFAULT_BUDGET_S, progress=None, log=lambda text: None) -> dict[str, Any]:
    """Time and measure `entries` ({"name", "options"}) at every N in `seq_lens`, in fresh processes.

    job_common: heads, head_dim, batch, dtype, causal, device, threads, timeout (seconds per process).
    For each N, one "time" job interleaves every entry (see the worker); then, only after every
    timing, one "memory" job per (N, entry) that timed successfully, two at a time on CPU.
    `baseline` names the entry whose ratios decide whether more rounds are needed (None: no
    ratios, just the budget). `progress`: an entered rich Progress to advance, or None; `log(text)`
    gets a line per finished process.

    Returns {"env": the measuring processes' environment or None, "timings": {N: {name: the time
    job's result}}, "warmups": {N: warm-up rounds}, "memories": {(N, name): the memory job's result}};
    a failed process is a "skipped" result with its reason, never an exception.
    """
    names = [e["name"] for e in entries]
    by_name = {e["name"]: e for e in entries}
    device = job_common["device"]
    timings: dict[int, dict[str, Any]] = {n: {} for n in seq_lens}
    warmups: dict[int, int | None] = {}  # the warm-up rounds each shape got
    memories: dict[tuple[int, str], dict[str, Any]] = {}
    env: dict[str, Any] | None = None
    # Memory jobs run two at a time on CPU (each measures its own process); CUDA shares one device.
    workers = _start_workers(1 if device == "cuda" else max(1, min(2, os.cpu_count() or 1))) if names else []
    try:
        task = progress.add_task("timing", total=len(seq_lens)) if progress is not None else None
        for n in seq_lens if names else []:
            if progress is not None:
                progress.update(task, description=f"timing N={n}: {len(names)} modules, interleaved")
            job = {"kind": "time", "seq_len": n, "entries": entries, "baseline": baseline, "warmup": warmup,
                   "repeats": repeats, "budget_s": budget_s, "min_repeats": MIN_REPEATS,
                   "max_repeats": MAX_REPEATS, **job_common}
            result = workers[0].run(job)
            env = env or result.get("env")
            warmups[n] = result.get("warmup")
            timings[n] = result.get("results") or {e: {"status": "skipped", "reason": result.get("error")}
                                                   for e in names}
            if progress is not None:
                progress.advance(task)
            skipped = [e for e, r in timings[n].items() if r["status"] != "ok"]
            log(f"timed N={n}: {len(timings[n]) - len(skipped)} ok" + (f", skipped {skipped}" if skipped else ""))

        # Only after every timing, so that memory jobs never disturb one.
        mem_jobs = [(n, e) for n in seq_lens for e in names if timings[n].get(e, {}).get("status") == "ok"]
        if progress is not None:
            task = progress.add_task("peak memory: a fresh process each", total=len(mem_jobs))
        idle: queue.Queue = queue.Queue()
        for w in workers:
            idle.put(w)

        def measure_memory(key: tuple[int, str]) -> tuple[tuple[int, str], dict[str, Any]]:
            w = idle.get()
            try:
                result = w.run({"kind": "memory", "seq_len": key[0], "entries": [by_name[key[1]]], **job_common})
            finally:
                idle.put(w)
            if "error" in result:
                result = {"status": "skipped", "reason": f"memory: {result['error']}"}
            return key, result

        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
            for key, result in pool.map(measure_memory, mem_jobs):
                memories[key] = result
                if progress is not None:
                    progress.advance(task)
                done = f"{result['peak_mem_mb']:.1f} MB" if result.get("status") == "ok" else result.get("reason")
                log(f"memory N={key[0]} {key[1]}: {done}")
    finally:
        for w in workers:
            w.close()
    return {"env": env, "timings": timings, "warmups": warmups, "memories": memories}


# --- rows, table, plot ---------------------------------------------------------------------------

def median(samples: list[float] | None) -> float | None:
    return statistics.median(samples) if samples else None


def iqr(samples: list[float] | None) -> float | None:
    if not samples or len(samples) < 2:
        return None
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]


def _paired_ratio(samples: list[float] | None, base: list[float] | None) -> float | None:
    """Median over rounds of this module's time over the baseline's time in the same round.

    The two were measured moments apart, so load that comes and goes on a shared machine cancels
    within each pair; on a quiet machine this is close to the ratio of the median times.
    """
    if not samples or not base or len(samples) != len(base):
        return None
    return statistics.median([a / b for a, b in zip(samples, base)])


def _gflops(flops: float | None, ms: float | None) -> float | None:
    return flops / (ms * 1e-3) / 1e9 if flops and ms else None


def _row(name: str, shape: dict[str, Any], timing: dict[str, Any], memory: dict[str, Any],
         base: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    ok = timing.get("status") == "ok"
    fwd, fwd_bwd = (timing["fwd_ms"], timing["fwd_bwd_ms"]) if ok else (None, None)
    flops_fwd, flops_bwd = memory.get("flops_fwd"), memory.get("flops_bwd")
    row = {"mechanism": name, "is_baseline": name == common["baseline"], **shape, **common,
           "status": "ok" if ok else "skipped", "reason": None if ok else timing.get("reason", "not measured"),
           "repeats": len(fwd) if fwd else 0,
           "fwd_ms": median(fwd), "fwd_bwd_ms": median(fwd_bwd),
           "fwd_ms_iqr": iqr(fwd), "fwd_bwd_ms_iqr": iqr(fwd_bwd),
           "fwd_ratio": _paired_ratio(fwd, base.get("fwd_ms")),
           "fwd_bwd_ratio": _paired_ratio(fwd_bwd, base.get("fwd_bwd_ms")),
           "flops_fwd": flops_fwd, "flops_bwd": flops_bwd, "flops_source": memory.get("flops_source")}
    row["fwd_gflops"] = _gflops(flops_fwd, row["fwd_ms"])
    row["fwd_bwd_gflops"] = _gflops(flops_fwd + flops_bwd if flops_fwd is not None and flops_bwd is not None
                                    else None, row["fwd_bwd_ms"])
    row["peak_mem_mb"] = memory.get("peak_mem_mb")
    row["mem_method"] = memory.get("mem_method")
    row["notes"] = [memory["reason"]] if ok and memory.get("reason") else []
    return row


def _print_table(rows: list[dict[str, Any]], title: str, console) -> None:
    from rich.table import Table
    table = Table(title=title)
    for col in ("mechanism", "N", "fwd ms", "x base", "fwd+bwd ms", "x base", "GFLOP/s", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("mechanism", "note") else "right")
    last_n = None
    for r in rows:
        if last_n is not None and r["seq_len"] != last_n:
            table.add_section()
        last_n = r["seq_len"]
        if r["status"] != "ok":
            note = f"skipped: {r['reason']}"
        else:
            note = "; ".join((["baseline"] if r["is_baseline"] else []) + r["notes"])
        table.add_row(r["mechanism"], str(r["seq_len"]), fmt(r["fwd_ms"], ".2f"), fmt(r["fwd_ratio"], ".3f"),
                      fmt(r["fwd_bwd_ms"], ".2f"), fmt(r["fwd_bwd_ratio"], ".3f"),
                      fmt(r["fwd_bwd_gflops"], ".1f"), fmt(r["peak_mem_mb"], ".1f"), note,
                      style="dim" if r["status"] != "ok" else None)
    console.print(table)
    console.print("times: medians; x base: median over rounds of time / baseline's time in the same round; "
                  "GFLOP/s and peak MB: forward+backward", style="dim", highlight=False)


def _plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab20"].colors[::2] + matplotlib.colormaps["tab20"].colors[1::2]
    markers = "osD^v<>PX*"
    lines = 0
    for name in dict.fromkeys(r["mechanism"] for r in rows):
        mine = [r for r in rows if r["mechanism"] == name]
        pts = sorted((r["seq_len"], r["fwd_bwd_ms"]) for r in mine if r["status"] == "ok")
        if not pts:
            continue
        if mine[0]["is_baseline"]:
            style = dict(color="black", linestyle="--", marker="o", zorder=3, label=f"{name} (baseline)")
        else:
            style = dict(color=colors[lines % len(colors)], marker=markers[lines % len(markers)], label=name)
            lines += 1
        ax.plot([n for n, _ in pts], [t for _, t in pts], **style)
    if ax.lines:
        seq_lens = sorted({r["seq_len"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward + backward, median ms")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --- main ----------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if args.numerics:
        return bench_numerics.main(args)
    if args.neighborhood is not None:
        from attnlab.bench import neighborhood as bench_neighborhood
        argv = ["--cases", args.neighborhood, "--repeats", str(args.repeats or 3)]
        argv += ["--warmup", str(args.warmup)] if args.warmup is not None else []
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += ["--json"] if args.json else []
        return bench_neighborhood.main(argv)
    started = time.perf_counter()
    try:
        names = resolve_names(args.mechanisms, args.baseline)
        entries = list(dict.fromkeys([args.baseline, *names]))  # the baseline first, each name once
        options = parse_options(args.options, entries)
    except ValueError as e:
        print(f"attnlab bench: {e}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        print("attnlab bench: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    baseline, dim = args.baseline, args.heads * args.head_dim
    out_dir = args.out if args.out is not None else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)

    # What a spec says a mechanism cannot do is skipped up front; whatever else a mechanism raises
    # is caught where it runs, and becomes a skipped row too.
    from attnlab.registry import get_spec
    pre_skipped = {name: f"mechanism {name!r} does not support causal (spec.causal=False)"
                   for name in entries if name != BASELINE and args.causal and not get_spec(name).causal}
    runnable = [n for n in entries if n not in pre_skipped]

    err = Console(stderr=True)
    out = Console() if Console().is_terminal else Console(width=170)  # a log: keep rows on one line
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=not err.is_terminal, refresh_per_second=2)

    def log(text: str) -> None:  # a log gets a line per finished process instead of a live bar
        if not err.is_terminal:
            err.print(f"[{time.perf_counter() - started:6.1f} s] {text}", highlight=False, markup=False)

    job_common = {"heads": args.heads, "head_dim": args.head_dim, "batch": args.batch, "dtype": args.dtype,
                  "causal": args.causal, "device": device, "threads": args.threads, "timeout": args.timeout}
    with progress:
        measured = measure([{"name": e, "options": options.get(e, {})} for e in runnable], args.seq_lens,
                           job_common, baseline=baseline, warmup=args.warmup, repeats=args.repeats,
                           budget_s=args.budget, progress=progress, log=log)
    env, timings, warmups, memories = (measured["env"], measured["timings"], measured["warmups"],
                                       measured["memories"])

    if env is None:
        from attnlab.bench.worker import environment
        env = environment(args.threads, device)
    common = {"baseline": baseline, "dtype": args.dtype, "causal": args.causal, "device": device, "env": env}
    rows = []
    for n in args.seq_lens:
        shape = {"batch": args.batch, "seq_len": n, "heads": args.heads, "head_dim": args.head_dim, "dim": dim}
        base = timings[n].get(baseline, {})
        base = base if base.get("status") == "ok" else {}
        for name in entries:
            timing = ({"status": "skipped", "reason": pre_skipped[name]} if name in pre_skipped
                      else timings[n].get(name, {}))
            row = _row(name, shape, timing, memories.get((n, name), {}), base, common)
            row["options"] = options.get(name, {})
            row["warmup"] = warmups.get(n)
            rows.append(row)

    jsonl = out_dir / "results.jsonl"
    with jsonl.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    title = (f"attnlab bench: B={args.batch}, h={args.heads}, d={args.head_dim} (C={dim}), {args.dtype}"
             f"{', causal' if args.causal else ''}; {device}, {env.get('num_threads')} threads; baseline {baseline}")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print_table(rows, title, out)
    written = [jsonl]
    if not args.no_plot:
        written.append(out_dir / "bench.png")
        _plot(rows, title.replace("; ", "\n", 1), written[-1])
    (err if args.json else out).print(f"{len(rows)} rows in {time.perf_counter() - started:.1f} s; wrote "
                                      + ", ".join(str(p) for p in written), highlight=False, markup=False)
    return 0


if __name__ == "__main__":  # python -m attnlab.bench.harness [options]: the same as `attnlab bench`
    _parser = argparse.ArgumentParser(prog="attnlab bench")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
