"""The measuring processes of `attnlab bench`: `python -m attnlab.bench.worker [--serve]`.

Every job runs in a fresh process, so that nothing one configuration allocated, initialised or
warmed up is left for the next. A job is JSON in, JSON out:

- "time": all entries (mechanisms and the baseline) of one shape, in the bench's one timing loop
  (`attnlab.bench.timing`: a trial call each, `warmup` untimed rounds, then rounds in an order
  that rotates). Each round times every module's forward (under no_grad), then every module's
  forward+backward (`out.backward(grad_out)`, x requiring grad, gradients cleared outside the
  timed region). Without a fixed `repeats`, the rounds fill `budget_s`, and go on (to twice
  that) while the standard error of some median ratio to the baseline is over 1%.
- "memory": one entry of one shape. Peak memory growth of one forward+backward over the memory
  in use just before it (module, input and output gradient built, code paths already loaded by a
  forward+backward on a 16-token input). On CPU: VmHWM, reset through /proc/self/clear_refs,
  minus the RSS from /proc/self/statm. Not `ru_maxrss` against that RSS: a process starts with
  its parent's high-water mark (Linux carries it across fork and exec), which made small configs
  report the parent's size; where /proc cannot be reset, the increase of `ru_maxrss` during the
  call is reported instead, a lower bound.
  glibc's mmap threshold is fixed at 64 KiB first, so every large tensor is unmapped when freed
  and RSS follows live memory (with the default, dynamic threshold the peak of one configuration
  varied by ~15% from run to run). On CUDA: max_memory_allocated over memory_allocated. The same
  process then counts FLOPs (`attnlab.bench.flops`).

Modes:
- no flag: read one job on stdin, write its answer as one JSON line on stdout.
- `--serve` (Linux): a fork server. It imports torch and the mechanisms once, writes a "ready"
  line, then for each job line on stdin forks a child that runs the job and sends its answer
  back; the server writes it as one line. A fork of a process that has imported torch but never
  run an op (no thread pool, no allocator state) is fresh for measuring purposes, and costs
  milliseconds where a new interpreter costs seconds.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import sys
import time
import warnings
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn

from attnlab._env import gpu_name, software_and_machine
from attnlab._io import describe_error
from attnlab.bench.adapters import DTYPES, build_module
from attnlab.bench.flops import count_flops
from attnlab.bench.timing import Subject, run_rounds
from attnlab.registry import list_specs


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def environment(threads: int | None, device: str) -> dict[str, Any]:
    """What the numbers depend on (sets the thread count first); no hostname."""
    _set_threads(threads)
    return {**software_and_machine(), "num_threads": torch.get_num_threads(), "gpu": gpu_name(device)}


class Shape:
    """One job's inputs and the two calls that are measured."""

    def __init__(self, job: dict[str, Any]):
        self.device = torch.device(job["device"])
        self.dtype = DTYPES[job["dtype"]]
        self.batch, self.seq_len, self.heads = job["batch"], job["seq_len"], job["heads"]
        self.dim = job["heads"] * job["head_dim"]
        self.causal = job["causal"]
        self.kwargs = {"is_causal": True} if self.causal else {}
        torch.manual_seed(0)
        self.x, self.grad_out = self.inputs(self.seq_len)
        self.sync: Callable[[], None] = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch, n, self.dim)                             # (B, N, C)
        x = torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=True)
        return x, torch.randn(shape, device=self.device, dtype=self.dtype)

    def build(self, entry: dict[str, Any]) -> nn.Module:
        torch.manual_seed(0)
        module = build_module(entry["name"], self.dim, self.heads, entry.get("options", {}))
        return module.to(device=self.device, dtype=self.dtype)

    def fwd(self, m: nn.Module, x: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            m(self.x if x is None else x, **self.kwargs)

    def fwd_bwd(self, m: nn.Module, x: torch.Tensor | None = None, grad_out: torch.Tensor | None = None) -> None:
        out = m(self.x if x is None else x, **self.kwargs)
        out.backward(self.grad_out if grad_out is None else grad_out)

    def clear_grads(self, m: nn.Module) -> None:
        for p in m.parameters():
            p.grad = None
        self.x.grad = None


# --- timing --------------------------------------------------------------------------------------

def time_job(job: dict[str, Any]) -> dict[str, Any]:
    """Every entry at one shape, forward (no_grad) and forward+backward, in `timing.run_rounds`."""
    env = environment(job["threads"], job["device"])
    s = Shape(job)
    subjects, results = [], {}
    for entry in job["entries"]:  # a module that cannot be built is skipped, not fatal
        try:
            m = s.build(entry)
        except Exception as e:
            results[entry.get("label", entry["name"])] = {"status": "skipped", "reason": describe_error(e)}
            gc.collect()
            continue
        subjects.append(Subject(entry.get("label", entry["name"]), {"fwd_ms": partial(s.fwd, m), "fwd_bwd_ms": partial(s.fwd_bwd, m)},
                                prepare=partial(s.clear_grads, m)))
    rounds = run_rounds(subjects, warmup=job["warmup"], repeats=job["repeats"], budget_s=job["budget_s"],
                        min_repeats=job["min_repeats"], max_repeats=job["max_repeats"],
                        baseline=job["baseline"], sync=s.sync)
    results.update({name: {"status": "skipped", "reason": why} for name, why in rounds.skipped.items()})
    results.update({name: {"status": "ok", **samples} for name, samples in rounds.samples.items()})
    return {"env": env, "results": results, "warmup": rounds.warmup}


# --- memory --------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


def _ru_maxrss_bytes() -> int:
    import resource  # POSIX only
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _fix_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    """glibc: allocations from `nbytes` up are mmapped and given back when freed; no-op elsewhere."""
    try:
        ctypes.CDLL(None).mallopt(-3, nbytes)  # -3 is M_MMAP_THRESHOLD in glibc's malloc.h
    except (OSError, AttributeError):
        pass


def memory_job(job: dict[str, Any]) -> dict[str, Any]:
    if job["device"] == "cpu":
        _fix_mmap_threshold()
    _set_threads(job["threads"])
    s = Shape(job)
    try:
        m = s.build(job["entries"][0])
        # A forward+backward on a short input first loads code and initialises libraries, which
        # would otherwise count as this configuration's memory, while allocating little.
        xs, gs = s.inputs(min(s.seq_len, 16))
        try:
            s.fwd(m, xs)
            s.fwd_bwd(m, xs, gs)
        except (ValueError, NotImplementedError):
            # Some mechanisms cannot take 16 tokens (a spatial block size, say): warm up at full
            # size instead; the high-water mark is reset before the measured call anyway.
            s.fwd(m)
            s.fwd_bwd(m)
        del xs, gs
        s.clear_grads(m)
        gc.collect()
        # No collection inside the measured call: besides its own cost, a collection in a forked
        # child writes to the headers of objects shared with the server and copies their pages.
        gc.disable()
        if s.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            s.fwd_bwd(m)
            torch.cuda.synchronize()
            peak, method = torch.cuda.max_memory_allocated() - before, "cuda_max_memory_allocated"
        elif _reset_hwm():
            before = _rss_bytes()
            s.fwd_bwd(m)
            peak, method = _hwm_bytes() - before, "vmhwm"
        else:  # no /proc to reset: how far the call raised the process's peak, a lower bound
            before = _ru_maxrss_bytes()
            s.fwd_bwd(m)
            peak, method = _ru_maxrss_bytes() - before, "ru_maxrss_increase"
        result = {"status": "ok", "peak_mem_mb": max(peak, 0) / 2**20, "mem_method": method}
    except Exception as e:
        return {"status": "skipped", "reason": "memory: " + describe_error(e)}
    finally:
        gc.enable()
    try:
        fwd, bwd, source = count_flops(m, s.x, s.grad_out, heads=s.heads, causal=s.causal)
        result.update(flops_fwd=fwd, flops_bwd=bwd, flops_source=source)
    except Exception as e:
        result["reason"] = "flops: " + describe_error(e)
    return result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return time_job(job) if job["kind"] == "time" else memory_job(job)
    except Exception as e:  # a broken job is an answer, never a traceback in place of JSON
        return {"error": describe_error(e)}


# --- processes -----------------------------------------------------------------------------------

def _fork_run(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in a forked child; kill it after job["timeout"] seconds."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: answer through the pipe, print nothing on the server's stdout
        try:
            os.close(read_fd)
            os.dup2(2, 1)
            data = json.dumps(run_job(job)).encode()
            with os.fdopen(write_fd, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + job.get("timeout", 900)
    chunks: list[bytes] = []
    timed_out = False
    with os.fdopen(read_fd, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = f.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"error": f"timed out after {job.get('timeout', 900)} s"}
    try:
        return json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        code = os.waitstatus_to_exitcode(status)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return {"error": f"worker process died ({how}) without an answer"}


def serve() -> int:
    list_specs()  # import every mechanism once, here, rather than in each child
    # FlopCounterMode imports torch._dynamo on first use (seconds); import it here instead. This
    # imports modules only: the server never runs an op, so children inherit no thread pool.
    import torch._dynamo  # noqa: F401
    environment(None, "cpu")  # caches platform's answers (one runs `uname -p`) for the children
    gc.collect()
    gc.freeze()  # children's collections skip everything imported so far: less time, no page copies
    warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
    answer = sys.stdout
    answer.write('{"ready": true}\n')
    answer.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        answer.write(json.dumps(_fork_run(json.loads(line))) + "\n")
        answer.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    job = json.loads(sys.stdin.read())
    answer = sys.stdout
    sys.stdout = sys.stderr  # whatever a mechanism prints must not corrupt the answer
    answer.write(json.dumps(run_job(job)) + "\n")
    answer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
