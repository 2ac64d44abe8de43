"""`attnlab bench`: time and memory of sequence mechanisms against a baseline measured in the same run.

This module is the command: its arguments, the checks of names and options, and the run of one
mode. The default mode measures mechanisms in fresh processes (`harness.measure`) and writes
the rows (`report`: the JSONL file, the table or JSON lines, the plot); `--numerics`,
`--neighborhood` and `--spatial` are modes of their own (`numerics`, `neighborhood`, `spatial`).
A row reports median times and, against the baseline, the median over rounds of the two
modules' paired time ratio.
What is timed, and how non-sequence layouts take the bench's tokens: `adapters`; FLOPs: `flops`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from attnlab._args import float_above, int_at_least, int_list
from attnlab._io import default_out
from attnlab.bench import harness, neighborhood, numerics, report, spatial
from attnlab.bench.adapters import BASELINE, BENCH_LAYOUTS, DTYPES, PLAIN, parse_options
from attnlab.bench.harness import DEFAULT_BUDGET_S, MAX_REPEATS, MIN_REPEATS
from attnlab.bench.worker import environment
from attnlab.registry import get_spec, list_specs

# Defaults sized so that `attnlab bench` with every registered sequence mechanism (about a dozen,
# several of them eager) takes about a minute on 2 CPU cores; the largest N dominates, and N=1024
# would add about half a minute more. Pass --seq-lens 256,512,1024,2048 for long runs.
DEFAULT_SEQ_LENS = (128, 256, 512)


def resolve_names(mechanisms: str | None, baseline: str) -> list[str]:
    """The mechanisms to time, checked; ValueError (with the registry's hints) otherwise."""
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
        if name in PLAIN:
            continue
        spec = get_spec(name)  # ValueError: unknown mechanism, with close names
        if spec.layout not in BENCH_LAYOUTS:
            raise ValueError(f"bench times layouts {BENCH_LAYOUTS} on N tokens; {name!r} has layout {spec.layout!r}")
    return names


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
    parser.add_argument("--spatial", nargs="?", const=",".join(spatial.SUITES), default=None, metavar="SUITES",
                        help="instead of mechanisms, the 2-D suites: lka (LKA vs a 21x21 depthwise conv and local "
                             "attention), pam (DANet position attention via SDPA vs materialised), hyena and "
                             "hyena2d (vs dense SDPA: the crossover N); SUITES a subset (default: all); uses "
                             "--budget, --repeats, --threads, --timeout, --out, --json")
    parser.add_argument("--numerics", action="store_true",
                        help="instead of mechanisms, time the Edge-MoE softmax/GELU approximations against "
                             "the exact ops on (rows, M) = (N*h, N) score rows, with their max errors")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if args.numerics:
        return numerics.main(args)
    if args.neighborhood is not None:
        argv = ["--cases", args.neighborhood, "--repeats", str(args.repeats or 3)]
        argv += ["--warmup", str(args.warmup)] if args.warmup is not None else []
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += ["--json"] if args.json else []
        return neighborhood.main(argv)
    if args.spatial is not None:
        # The suites fix their own shapes, dtype (float32) and device (CPU); a flag they would
        # not honour is refused rather than ignored.
        defaults = {"mechanisms": None, "seq_lens": list(DEFAULT_SEQ_LENS), "heads": 8, "head_dim": 64, "batch": 1,
                    "dtype": "float32", "causal": False, "device": "auto", "warmup": None, "baseline": BASELINE,
                    "options": None}
        given = [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k) != v]
        if args.device == "cpu":
            given = [g for g in given if g != "--device"]
        if given:
            print(f"attnlab bench: --spatial runs its suites' own shapes, float32 on the CPU; it does not take "
                  f"{', '.join(given)}", file=sys.stderr)
            return 2
        argv = ["--suites", args.spatial, "--budget", str(args.budget), "--timeout", str(args.timeout)]
        argv += ["--repeats", str(args.repeats)] if args.repeats else []
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += ["--out", str(args.out)] if args.out is not None else []
        argv += ["--json"] if args.json else []
        return spatial.main(argv)
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
    pre_skipped = {name: f"mechanism {name!r} does not support causal (spec.causal=False)"
                   for name in entries if name not in PLAIN and args.causal and not get_spec(name).causal}
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
        measured = harness.measure([{"name": e, "options": options.get(e, {})} for e in runnable], args.seq_lens,
                                   job_common, baseline=baseline, warmup=args.warmup, repeats=args.repeats,
                                   budget_s=args.budget, progress=progress, log=log)
    env = measured["env"] if measured["env"] is not None else environment(args.threads, device)
    common = {"baseline": baseline, "dtype": args.dtype, "causal": args.causal, "device": device, "env": env}
    rows = report.rows(measured, entries, args.seq_lens, batch=args.batch, heads=args.heads,
                       head_dim=args.head_dim, common=common, options=options, pre_skipped=pre_skipped)

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
        report.print_table(rows, title, out)
    written = [jsonl]
    if not args.no_plot:
        written.append(out_dir / "bench.png")
        report.plot(rows, title.replace("; ", "\n", 1), written[-1])
    (err if args.json else out).print(f"{len(rows)} rows in {time.perf_counter() - started:.1f} s; wrote "
                                      + ", ".join(str(p) for p in written), highlight=False, markup=False)
    return 0


if __name__ == "__main__":  # python -m attnlab.bench.cli [options]: the same as `attnlab bench`
    _parser = argparse.ArgumentParser(prog="attnlab bench")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
