"""Linear-InfSA forward at scale: 576 x 576 = 331,776 tokens, dim 384, 6 heads, fp32, no grad.

    python scripts/infsa_scale.py                  # the issue's shape
    python scripts/infsa_scale.py --side 128       # a quick check

Prints the wall time of one forward (after a small warm-up call) and the process's peak resident
memory (resource.getrusage, so it includes the input and output tensors, which are reported
separately). For scale: one dense (N, N) fp32 attention matrix at this N would take
N^2 * 4 bytes = 440 GB per head.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

import attnlab


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=576, help="tokens per side; N = side^2 (default 576)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.side * args.side
    m = attnlab.create("linear_infsa", args.dim, args.heads, chunk_size=args.chunk_size).eval()
    with torch.no_grad():
        m(torch.randn(1, 64, args.dim))                       # warm-up (thread pool, allocator)
        x = torch.randn(1, N, args.dim)                       # (B, N, C) fp32
        before = rss_mib()
        start = time.perf_counter()
        y = m(x)
        wall = time.perf_counter() - start
    tensor_mib = x.numel() * x.element_size() / 2**20
    print(f"linear_infsa forward: B=1, N={N} ({args.side}x{args.side}), dim={args.dim}, heads={args.heads}, "
          f"fp32, no grad, chunk_size={args.chunk_size}, {torch.get_num_threads()} threads")
    print(f"wall time: {wall:.2f} s")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB (RSS before the forward, with x allocated: {before:.0f} MiB; "
          f"x and y are {tensor_mib:.0f} MiB each)")
    print(f"output finite: {bool(torch.isfinite(y).all())}, shape {tuple(y.shape)}")


if __name__ == "__main__":
    main()
