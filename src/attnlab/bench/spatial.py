"""`attnlab bench --spatial`: the 2-D mechanisms against the plain baselines they replace.

    attnlab bench --spatial                       # every suite below
    attnlab bench --spatial lka,pam --budget 2
    python -m attnlab.bench.spatial --suites hyena --json

Suites (fp32, B = 1; forward and forward+backward times, peak memory of one forward+backward,
all measured by `attnlab.bench.measure` as in `attnlab bench`: every entry of one shape
interleaved in one fresh process, memory in a fresh process per entry and shape):

- `lka`: C = 64 at 56 x 56 and 112 x 112 (VAN's first two stages). VAN's large-kernel attention
  (`lka`, and the `van` block around it) against the single 21 x 21 depthwise convolution whose
  receptive field it decomposes (`dwconv`, the baseline), and against local attention of the
  same width: `halo2d` (block 8, halo 3: timm's HaloNet default) and `neighborhood2d` at kernel 7
  and kernel 21 (the same receptive field as LKA's), 4 heads of 16.
- `pam`: DANet's position attention (`danet_pam`, one head over C/8-wide queries and keys, C-wide
  values) through SDPA against the same module on the eager backend, which materialises the
  HW x HW probabilities as the official code does (the baseline), and the channel attention
  `danet_cam`; C = 64 at 32 x 32, 64 x 64 and 96 x 96. Memory should grow as HW, not (HW)^2.
- `hyena`: the Hyena operator (O(N log N) FFT convolutions, causal as the official operator)
  against causal dense SDPA attention (`sdpa`, the baseline: Linear -> SDPA -> Linear) at
  N = 256 ... 16384, C = 256 (4 x 64); reported: the N from which hyena's forward+backward is
  faster, and the speed-up at the largest N.
- `hyena2d`: the same for the 2-D operator (non-causal, exact 2-D convolution) against
  non-causal dense SDPA over the pixels of square images of 32^2, 64^2 and 128^2.
- `all2d`: every 2-D mechanism of the seed papers with its default options, and halo2d and
  neighborhood2d, against dense SDPA over the pixels (`sdpa`), at 32 x 32 and 56 x 56, C = 64.

The load average is recorded because on a shared machine it moves every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab._io import default_out, fmt, write_text
from attnlab.bench import report
from attnlab.bench.harness import DEFAULT_BUDGET_S, measure
from attnlab.bench.worker import environment


@dataclass(frozen=True)
class Entry:
    name: str                                   # a registry name or a plain baseline (adapters.PLAIN)
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None                    # how the row is called (default: the name)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Suite:
    description: str
    seq_lens: tuple[int, ...]                   # N = pixels (square images) or tokens
    heads: int
    head_dim: int                               # C = heads * head_dim
    baseline: str                               # the key of the entry ratios are taken against
    entries: tuple[Entry, ...]
    crossover: bool = False                     # report where each entry becomes faster than the baseline
    causal: bool = False                        # forward(..., is_causal=True) for every entry


SUITES: dict[str, Suite] = {
    "lka": Suite(
        "LKA vs one 21x21 depthwise conv and local attention, C=64",
        (56 * 56, 112 * 112), heads=4, head_dim=16, baseline="dwconv21",
        entries=(Entry("dwconv", {"kernel_size": 21}, "dwconv21"), Entry("lka"), Entry("van"),
                 Entry("halo2d", {"block_size": 8, "halo_size": 3}),
                 Entry("neighborhood2d", {"kernel_size": 7}, "neighborhood2d_k7"),
                 Entry("neighborhood2d", {"kernel_size": 21}, "neighborhood2d_k21"))),
    "pam": Suite(
        "DANet position attention through SDPA vs materialised softmax, C=64",
        (32 * 32, 64 * 64, 96 * 96), heads=1, head_dim=64, baseline="danet_pam_materialised",
        entries=(Entry("danet_pam", {"backend": "reference"}, "danet_pam_materialised"),
                 Entry("danet_pam"), Entry("danet_cam"))),
    "hyena": Suite(
        "Hyena vs dense SDPA attention, C=256",
        (256, 512, 1024, 2048, 4096, 8192, 16384), heads=4, head_dim=64, baseline="sdpa",
        entries=(Entry("sdpa"), Entry("hyena", {"l_max": 16384})), crossover=True, causal=True),
    "hyena2d": Suite(
        "Hyena-2D vs dense SDPA attention over the pixels, C=256",
        (32 * 32, 64 * 64, 128 * 128), heads=4, head_dim=64, baseline="sdpa",
        entries=(Entry("sdpa"), Entry("hyena2d", {"l_max": 128})), crossover=True),
    "all2d": Suite(
        "every 2-D mechanism of the seed papers, defaults, vs dense SDPA over the pixels, C=64",
        (32 * 32, 56 * 56), heads=4, head_dim=16, baseline="sdpa",
        entries=(Entry("sdpa"), *(Entry(n) for n in (
            "lka", "van", "ulsam", "coord_attn", "danet_pam", "danet_cam", "hyena2d", "convshare",
            "hyperzzw", "medusa", "halo2d", "neighborhood2d")))),
}


def crossover(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """From which N on `key`'s forward+backward is faster than the baseline's (paired ratio < 1 at
    that N and every larger one measured), and the speed-up (1 / ratio) at the largest N."""
    mine = sorted((r for r in rows if r["mechanism"] == key and r["fwd_bwd_ratio"] is not None),
                  key=lambda r: r["seq_len"])
    if not mine:
        return {"mechanism": key, "faster_from": None, "largest_n": None, "speedup_at_largest": None}
    faster_from = None
    for r in reversed(mine):
        if r["fwd_bwd_ratio"] >= 1.0:
            break
        faster_from = r["seq_len"]
    return {"mechanism": key, "faster_from": faster_from, "largest_n": mine[-1]["seq_len"],
            "speedup_at_largest": 1.0 / mine[-1]["fwd_bwd_ratio"]}


def run_suite(name: str, *, budget_s: float, repeats: int | None, threads: int | None,
              timeout: int, log=lambda text: None) -> dict[str, Any]:
    suite = SUITES[name]
    job_common = {"heads": suite.heads, "head_dim": suite.head_dim, "batch": 1, "dtype": "float32",
                  "causal": suite.causal, "device": "cpu", "threads": threads, "timeout": timeout}
    entries = [{"name": e.name, "options": dict(e.options), "label": e.key} for e in suite.entries]
    load_before = os.getloadavg()
    measured = measure(entries, list(suite.seq_lens), job_common, baseline=suite.baseline,
                       repeats=repeats, budget_s=budget_s, log=log)
    env = measured["env"] or environment(threads, "cpu")
    common = {"baseline": suite.baseline, "dtype": "float32", "causal": suite.causal, "device": "cpu", "env": env}
    rows = []
    for n in suite.seq_lens:
        shape = {"batch": 1, "seq_len": n, "heads": suite.heads, "head_dim": suite.head_dim,
                 "dim": suite.heads * suite.head_dim}
        base = measured["timings"][n].get(suite.baseline, {})
        base = base if base.get("status") == "ok" else {}
        for e in suite.entries:
            r = report.row(e.key, shape, measured["timings"][n].get(e.key, {}),
                           measured["memories"].get((n, e.key), {}), base, common)
            r.update(suite=name, registry_name=e.name, options=dict(e.options), warmup=measured["warmups"].get(n))
            rows.append(r)
    result = {"suite": name, "description": suite.description, "baseline": suite.baseline, "rows": rows,
              "load_before": list(load_before), "load_after": list(os.getloadavg())}
    if suite.crossover:
        result["crossover"] = [crossover(rows, e.key) for e in suite.entries if e.key != suite.baseline]
    return result


def markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The suites as markdown tables (for docs and the closing note)."""
    lines = ["# attnlab bench --spatial\n",
             f"{env.get('cpu')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
             f"{env.get('num_threads')} threads; fp32, B=1. Times are medians; x base is the median over "
             "rounds of time / the baseline's time in the same round; peak MB is one forward+backward.\n"]
    for res in results:
        lines.append(f"## {res['suite']}: {res['description']} (baseline {res['baseline']})\n")
        lines.append("| mechanism | N | side | fwd ms | fwd+bwd ms | x base (fwd+bwd) | GFLOP/s | peak MB | note |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in res["rows"]:
            side = round(r["seq_len"] ** 0.5)
            side_text = f"{side}x{side}" if side * side == r["seq_len"] else "-"
            note = r["reason"] if r["status"] != "ok" else "; ".join(r["notes"])
            lines.append(f"| {r['mechanism']} | {r['seq_len']} | {side_text} | {fmt(r['fwd_ms'], '.2f')} | "
                         f"{fmt(r['fwd_bwd_ms'], '.2f')} | {fmt(r['fwd_bwd_ratio'], '.3f')} | "
                         f"{fmt(r['fwd_bwd_gflops'], '.1f')} | {fmt(r['peak_mem_mb'], '.1f')} | {note} |")
        for c in res.get("crossover", []):
            if c["faster_from"] is None:
                lines.append(f"\n{c['mechanism']}: not faster than {res['baseline']} up to N={c['largest_n']} "
                             f"(fwd+bwd speed-up at N={c['largest_n']}: {fmt(c['speedup_at_largest'], '.2f')}x).")
            else:
                lines.append(f"\n{c['mechanism']}: faster than {res['baseline']} (fwd+bwd) from N={c['faster_from']}; "
                             f"{fmt(c['speedup_at_largest'], '.2f')}x at N={c['largest_n']}.")
        lines.append(f"\nload average (1 min) {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnlab bench --spatial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"timed seconds per shape (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--repeats", type=int, default=None, help="fixed timed rounds per shape (default: --budget)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measuring process (default 900)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench-results/<timestamp>)")
    parser.add_argument("--json", action="store_true", help="print each suite as one JSON line")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if not args.budget > 0 or (args.repeats is not None and args.repeats < 1):
        parser.error("--budget must be > 0 and --repeats >= 1")
    out_dir = args.out if args.out is not None else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    results = []
    for name in names:
        res = run_suite(name, budget_s=args.budget, repeats=args.repeats, threads=args.threads,
                        timeout=args.timeout, log=log)
        results.append(res)
        if args.json:
            print(json.dumps(res), flush=True)
    env = next((r["env"] for res in results for r in res["rows"] if r.get("env")), environment(args.threads, "cpu"))
    text = markdown(results, env)
    write_text(out_dir / "spatial.json", json.dumps({"environment": env, "suites": results,
                                                     "wall_s": time.perf_counter() - started}, indent=1) + "\n")
    write_text(out_dir / "spatial.md", text)
    if not args.json:
        print(text)
    print(f"wrote {out_dir / 'spatial.json'} and {out_dir / 'spatial.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
