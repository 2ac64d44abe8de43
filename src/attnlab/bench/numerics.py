"""`attnlab bench --numerics`: exact vs Edge-MoE softmax and GELU, ratios in the same run.

The kernels are `attnlab.ops.numerics`; this times them. Inputs are (rows, M) = (N*h*B, N): one
row of attention logits per query, ~ N(0, 4^2); the GELUs get the same tensor. Every variant of
one size is timed in the bench's timing loop (`attnlab.bench.timing`: one warm-up round, then
rounds in a rotating order), forward only, under no_grad. Each row also has the variant's max
abs error against the float64 exact op, and `ratio`: its median time over that of torch.softmax
(softmax) or exact GELU (gelu) at the same size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Iterable

import torch
import torch.nn.functional as F

from attnlab._io import default_out
from attnlab.bench.adapters import DTYPES
from attnlab.bench.timing import Subject, run_rounds
from attnlab.ops.numerics import edgemoe_gelu, edgemoe_softmax, exact_gelu, exact_softmax, tanh_gelu

BASES = ("torch.softmax", "gelu")  # the implementation each op's ratios are relative to


def time_numerics(sizes: Iterable[tuple[int, int]] = ((256, 197),), *, repeats: int = 5,
                  chunk_sizes: Iterable[int] = (1, 64), dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", seed: int = 0) -> list[dict]:
    """Time exact vs Edge-MoE softmax and GELU on (rows, M) inputs; median of `repeats`, in ms.

    Each result is a dict {op, impl, rows, M, dtype, median_ms, max_abs_err}.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"time_numerics: repeats must be a positive int, got {repeats!r}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    results = []
    with torch.no_grad():
        for rows, M in sizes:
            if rows <= 0 or M <= 0:
                raise ValueError(f"time_numerics: sizes must be positive (rows, M) pairs, got {(rows, M)}")
            x = (4.0 * torch.randn(rows, M, generator=gen, dtype=torch.float64)).to(device)
            xd = x.to(dtype)
            ref_softmax = torch.softmax(x, -1)
            ref_gelu = F.gelu(x)
            cases = [("softmax", "exact", lambda: exact_softmax(xd), ref_softmax),
                     ("softmax", "torch.softmax", lambda: torch.softmax(xd, -1), ref_softmax)]
            for c in chunk_sizes:
                cases.append(("softmax", f"edgemoe(chunk={c})",
                              lambda c=c: edgemoe_softmax(xd, chunk_size=c), ref_softmax))
                cases.append(("softmax", f"edgemoe(chunk={c}, float)",
                              lambda c=c: edgemoe_softmax(xd, chunk_size=c, frac_bits=None), ref_softmax))
            cases += [("gelu", "gelu", lambda: exact_gelu(xd), ref_gelu),
                      ("gelu", "gelu_tanh", lambda: tanh_gelu(xd), ref_gelu),
                      ("gelu", "gelu_edgemoe", lambda: edgemoe_gelu(xd), ref_gelu),
                      ("gelu", "gelu_edgemoe(float)", lambda: edgemoe_gelu(xd, frac_bits=None), ref_gelu)]
            errors = {impl: (fn().to(torch.float64) - ref).abs().max().item() for _, impl, fn, ref in cases}
            rounds = run_rounds([Subject(impl, {"ms": fn}) for _, impl, fn, _ in cases], warmup=1,
                                repeats=repeats, trial=False, sync=sync, skip_errors=False)
            for op, impl, _, _ in cases:
                results.append(dict(op=op, impl=impl, rows=rows, M=M, dtype=str(dtype).removeprefix("torch."),
                                    median_ms=statistics.median(rounds.samples[impl]["ms"]),
                                    max_abs_err=errors[impl]))
    return results


def main(args: argparse.Namespace) -> int:
    """The mode: the `attnlab bench` arguments it uses are --seq-lens, --heads, --batch, --dtype,
    --repeats (default 5), --threads, --out and --json."""
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [(n * args.heads * args.batch, n) for n in args.seq_lens]   # one score row per query
    rows = time_numerics(sizes, repeats=args.repeats or 5, dtype=DTYPES[args.dtype])
    base = {(r["op"], r["rows"], r["M"]): r["median_ms"] for r in rows if r["impl"] in BASES}
    out_dir = args.out if args.out is not None else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "num_threads": torch.get_num_threads()}
    table = Table(title=f"attnlab bench --numerics: {args.dtype}, {torch.get_num_threads()} threads; "
                        "x base = time / torch.softmax (softmax) or exact GELU (gelu) in the same run")
    for col in ("op", "impl", "rows x M", "median ms", "x base", "max |err|"):
        table.add_column(col, justify="left" if col in ("op", "impl") else "right")
    with open(out_dir / "numerics.jsonl", "w") as f:
        for r in rows:
            r["ratio"] = r["median_ms"] / base[(r["op"], r["rows"], r["M"])]
            f.write(json.dumps({**r, "env": env}) + "\n")
            table.add_row(r["op"], r["impl"], f"{r['rows']} x {r['M']}", f"{r['median_ms']:.3f}",
                          f"{r['ratio']:.2f}", f"{r['max_abs_err']:.2e}")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        Console().print(table)
    print(f"wrote {out_dir / 'numerics.jsonl'}", file=sys.stderr)
    return 0
