"""GPU checks, run on a lent CUDA machine in one go (the project's CI has no GPU).

    PYTHONPATH=src python scripts/gpu_check.py [--out DIR]

1. `ops.attention` backend flex and sdpa on CUDA against the float64 reference, forward and
   backward, with key padding, causal and float masks.
2. `ops.neighborhood_attention` backend flex (FlexAttention block mask, compiled) on CUDA
   against the reference mask, forward and backward, over odd/even kernels, dilation, stride,
   causal, 1-3D.
3. Speed, forward+backward, h=8, d=64, fp32 and bf16: the issue's three neighborhood cases with
   flex vs dense SDPA on the same tensors, timed with CUDA events (median of rounds), as useful
   GFLOP/s ratios.
Prints one line per check and writes results JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import torch
import torch._dynamo
import torch.nn.functional as F

from attnlab import ops
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_pairs, reference_neighborhood_mask

DEV = "cuda"
torch._dynamo.config.cache_size_limit = 64   # one compile per shape and mask here
results: dict = {"checks": [], "speed": []}


def record(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    results["checks"].append({"name": name, "ok": ok, "detail": detail})


def grads_of(fn, tensors, grad):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    out.backward(grad)
    return out.detach(), [t.grad.detach().clone() for t in tensors]


def compare(name, fn, ref_fn, shapes, tol):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*s, device=DEV, requires_grad=True) for s in shapes)
    grad = torch.randn_like(q[..., : v.shape[-1]])
    try:
        out, gs = grads_of(fn, (q, k, v), grad)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, rgs = grads_of(ref_fn, (q64, k64, v64), grad.double())
        errs = [(out.double() - ref).abs().max().item()] + [(g.double() - r).abs().max().item()
                                                            for g, r in zip(gs, rgs)]
        record(name, max(errs) < tol, "max abs err out/dq/dk/dv " + " ".join(f"{e:.2e}" for e in errs))
    except Exception as e:  # noqa: BLE001 - report every failure, keep checking
        record(name, False, f"{type(e).__name__}: {e}")
        traceback.print_exc()


def check_attention():
    B, h, N, d = 2, 4, 200, 64
    shapes = [(B, h, N, d)] * 3
    pad = torch.ones(B, N, dtype=torch.bool, device=DEV)
    pad[1, 150:] = False
    bias = torch.randn(1, 1, N, N, device=DEV)
    cases = {"plain": {}, "causal": {"is_causal": True}, "key_padding": {"attn_mask": pad},
             "pad+causal": {"attn_mask": pad, "is_causal": True}, "float_bias": {"attn_mask": bias}}
    for backend in ("sdpa", "flex"):
        for label, kw in cases.items():
            kw64 = {k: (v.double() if k == "attn_mask" and v.dtype != torch.bool else v) for k, v in kw.items()}
            compare(f"attention[{backend}] {label}",
                    lambda q, k, v, kw=kw, b=backend: ops.attention(q, k, v, backend=b, **kw),
                    lambda q, k, v, kw=kw64: ops.attention(q, k, v, backend="reference", **kw),
                    shapes, tol=2e-3)


def check_neighborhood():
    cases = [
        ((64,), dict(kernel_size=7)), ((64,), dict(kernel_size=8)), ((64,), dict(kernel_size=5, dilation=3)),
        ((64,), dict(kernel_size=7, stride=3)), ((64,), dict(kernel_size=7, is_causal=True)),
        ((60,), dict(kernel_size=6, dilation=2, stride=2, is_causal=True)),
        ((16, 20), dict(kernel_size=(5, 3))), ((16, 20), dict(kernel_size=4, dilation=(2, 1), stride=(1, 2))),
        ((16, 20), dict(kernel_size=(3, 5), is_causal=(True, False))),
        ((6, 8, 10), dict(kernel_size=(3, 3, 5))),
        ((32, 64), dict(kernel_size=(7, 5), dilation=(2, 1), is_causal=(False, True))),   # tiled token order
        ((8, 16, 16), dict(kernel_size=(3, 5, 5), stride=(1, 2, 1))), ((6, 8, 10), dict(kernel_size=3, stride=(1, 2, 2), dilation=(1, 2, 1))),
    ]
    for spatial, kw in cases:
        shapes = [(2, 4, *spatial, 32)] * 3
        compare(f"neighborhood[flex] {spatial} {kw}",
                lambda q, k, v, s=spatial, kw=kw: neighborhood_attention(q, k, v, backend="flex", **kw),
                lambda q, k, v, s=spatial, kw=kw: neighborhood_attention(q, k, v, backend="reference", **kw),
                shapes, tol=2e-3)


def timed(fn, tensors, grad, rounds=10, warmup=3) -> float:
    for _ in range(warmup):
        grads_of(fn, tensors, grad)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        for t in tensors:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*tensors).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def speed():
    cases = {"1d": ((16384,), (127,)), "2d": ((128, 128), (13, 13)), "3d": ((16, 32, 32), (3, 7, 7))}
    h, d = 8, 64
    for dtype in (torch.float32, torch.bfloat16):
        for name, (spatial, kernel) in cases.items():
            try:
                torch.manual_seed(0)
                N = math.prod(spatial)
                q, k, v = (torch.randn(1, h, *spatial, d, device=DEV, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                grad = torch.randn_like(q)
                local = lambda q, k, v: neighborhood_attention(q, k, v, kernel, backend="flex")  # noqa: E731
                dense = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
                    q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2))
                t_local = timed(local, (q, k, v), grad)
                t_dense = timed(dense, (q, k, v), grad.flatten(2, -2))
                useful_local = 12 * neighborhood_pairs(spatial, kernel) * d * h
                useful_dense = 12 * N * N * d * h
                row = {"case": name, "dtype": str(dtype).split(".")[-1], "local_ms": t_local * 1e3,
                       "dense_ms": t_dense * 1e3, "local_tflops": useful_local / t_local / 1e12,
                       "dense_tflops": useful_dense / t_dense / 1e12,
                       "ratio": (useful_local / t_local) / (useful_dense / t_dense),
                       "speedup": t_dense / t_local}
                results["speed"].append(row)
                print("SPEED " + json.dumps(row), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"SPEED {name} {dtype} failed: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--only-neighborhood", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    results["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "capability": torch.cuda.get_device_capability()}
    print(results["env"], flush=True)
    t0 = time.time()
    if not args.only_neighborhood:
        check_attention()
    check_neighborhood()
    print(f"correctness checks took {time.time() - t0:.0f} s", flush=True)
    if not args.skip_speed:
        speed()
    if args.out:
        with open(f"{args.out}/gpu_check.json", "w") as f:
            json.dump(results, f, indent=1)
    failed = [c["name"] for c in results["checks"] if not c["ok"]]
    print(f"{len(results['checks']) - len(failed)}/{len(results['checks'])} checks passed; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
