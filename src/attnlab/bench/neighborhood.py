"""`attnlab bench --neighborhood`: neighborhood attention vs dense SDPA, forward + backward, useful GFLOP/s.

    attnlab bench --neighborhood                      # the three cases, 3 rounds
    attnlab bench --neighborhood 1d --repeats 5 --json
    python -m attnlab.bench.neighborhood --method chunks --tile 8,8   # tuning knobs too

Cases (fp32, B = 1, h = 8, d = 64; N = 16384 tokens in each):
  1d: N = 16384, kernel 127;  2d: 128 x 128, kernel 13;  3d: 16 x 32 x 32, kernel (3, 7, 7).
Both sides run on the same q, k, v (B, h, *spatial, d), in one process: neighborhood attention
(`attnlab.ops.neighborhood.neighborhood_attention`, default backend: blocked on CPU) and dense
`F.scaled_dot_product_attention` on the flattened tokens, in the bench's timing loop
(`attnlab.bench.timing`, no trial calls). Each round times each side, the order alternating,
after `--warmup` untimed rounds (and, with any, one untimed first neighborhood call): the mean
of as many forward+backward passes as fill `--min-seconds` (1 s; the count is fixed from the
last warm-up, at least 1), since one 0.3 s pass on a shared machine is a much noisier sample
than one 17 s dense pass. Gradients are cleared outside the timed region.
Useful FLOPs, counting only the attended pairs (`flops.attention_flops`): forward 4 * pairs * d * h
(scores and weighted sum; pairs = N * prod(kernel) for the neighborhood, N^2 dense), backward
twice that.
Reported: median times, GFLOP/s from the medians, and the median over rounds of the paired
ratio (neighborhood GFLOP/s / dense GFLOP/s). The load average is printed because on a shared
machine it moves every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

from attnlab._env import cpu_model
from attnlab.bench.flops import attention_flops
from attnlab.bench.timing import Subject, run_rounds
from attnlab.ops.neighborhood import BlockedConfig, neighborhood_attention, neighborhood_pairs

CASES = {
    "1d": ((16384,), (127,)),
    "2d": ((128, 128), (13, 13)),
    "3d": ((16, 32, 32), (3, 7, 7)),
}
HEADS, HEAD_DIM = 8, 64


def fwd_bwd(fn, tensors, grad) -> None:
    """One forward + backward pass of fn(*tensors)."""
    fn(*tensors).backward(grad)


def run_case(name: str, repeats: int, warmup: int, config: BlockedConfig | None, backend: str | None,
             min_seconds: float = 1.0) -> dict:
    spatial, kernel = CASES[name]
    N = math.prod(spatial)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, *spatial, HEAD_DIM, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, HEADS, *spatial, HEAD_DIM)

    def local(q, k, v):
        return neighborhood_attention(q, k, v, kernel, backend=backend, config=config)

    def dense(q, k, v):                       # (B, h, N, d) views of the same tensors
        return F.scaled_dot_product_attention(q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2))

    def clear() -> None:
        for t in (q, k, v):
            t.grad = None

    dense_grad = grad.flatten(2, -2)
    pairs = neighborhood_pairs(spatial, kernel)
    useful_local = 3 * attention_flops(pairs, HEADS, HEAD_DIM)         # forward + backward (2x forward)
    useful_dense = 3 * attention_flops(N * N, HEADS, HEAD_DIM)
    load_before = os.getloadavg()[0]
    if warmup:
        clear()
        fwd_bwd(local, (q, k, v), grad)       # a first call builds the kernel's geometry and scratch
    # fwd_bwd is looked up when called, so that a test can count the passes
    subjects = [Subject("local", {"s": lambda: fwd_bwd(local, (q, k, v), grad)}, prepare=clear),
                Subject("dense", {"s": lambda: fwd_bwd(dense, (q, k, v), dense_grad)}, prepare=clear)]
    rounds = run_rounds(subjects, warmup=warmup, repeats=repeats, trial=False, min_seconds=min_seconds,
                        skip_errors=False)
    t_local, t_dense = ([ms / 1e3 for ms in rounds.samples[side]["s"]] for side in ("local", "dense"))
    ratios = [(useful_local / a) / (useful_dense / b) for a, b in zip(t_local, t_dense)]
    med_local, med_dense = statistics.median(t_local), statistics.median(t_dense)
    return {
        "case": name, "spatial": list(spatial), "kernel_size": list(kernel), "tokens": N, "pairs": pairs,
        "local_ms": 1e3 * med_local, "dense_ms": 1e3 * med_dense,
        "local_gflops": useful_local / med_local / 1e9, "dense_gflops": useful_dense / med_dense / 1e9,
        "ratio": statistics.median(ratios), "ratios": ratios, "local_s": t_local, "dense_s": t_dense,
        "local_loops": rounds.loops["local"]["s"], "dense_loops": rounds.loops["dense"]["s"],
        "speedup": med_dense / med_local,
        "ideal_speedup": N * N / pairs, "load_before": load_before, "load_after": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1d,2d,3d", help="comma-separated subset of 1d,2d,3d")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="per round, each side repeats forward+backward until it has run this long "
                             "(the mean is timed; the count comes from the last warm-up; default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--backend", default=None, help="neighborhood backend (default: auto = blocked on CPU)")
    parser.add_argument("--method", default=None, choices=("fused", "sdpa", "chunks"),
                        help="blocked backend method (default: the library default, fused where it runs)")
    parser.add_argument("--tile", default=None, help="blocked tile per axis, e.g. 8,8 (default: the library's)")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or args.repeats < 1 or args.warmup < 0 or not args.min_seconds >= 0:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}" if unknown
                     else "--repeats must be >= 1, --warmup >= 0 and --min-seconds >= 0")
    env = {"torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    if not args.json:
        print(f"# {env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']}, {env['threads']} threads; "
              f"fp32, B=1, h={HEADS}, d={HEAD_DIM}; forward+backward, medians of {args.repeats} rounds")
        print(f"{'case':<4} {'shape':<14} {'kernel':<11} {'NA ms':>8} {'dense ms':>9} {'NA GF/s':>8} "
              f"{'dense GF/s':>10} {'ratio':>6} {'speedup':>8} {'ideal':>6} {'load':>10}")
    for name in names:
        tile = tuple(int(t) for t in args.tile.split(",")) if args.tile else None
        config = BlockedConfig(method=args.method, tile=tile) if (args.method or tile) else None
        row = run_case(name, args.repeats, args.warmup, config, args.backend, args.min_seconds)
        if args.json:
            print(json.dumps({**row, **env}), flush=True)
            continue
        shape = "x".join(map(str, row["spatial"]))
        kernel = "x".join(map(str, row["kernel_size"]))
        print(f"{name:<4} {shape:<14} {kernel:<11} {row['local_ms']:8.0f} {row['dense_ms']:9.0f} "
              f"{row['local_gflops']:8.1f} {row['dense_gflops']:10.1f} {row['ratio']:6.2f} "
              f"{row['speedup']:7.1f}x {row['ideal_speedup']:5.0f}x "
              f"{row['load_before']:4.1f}->{row['load_after']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
