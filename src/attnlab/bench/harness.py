"""The measuring processes of `attnlab bench`, and `measure()`, which sends them their jobs.

For each shape (B, N, h, d), every chosen mechanism and the baseline are timed in one fresh
process, in the bench's timing loop (`attnlab.bench.timing`: round-robin across repeats with an
order that rotates each round, so that drift on a noisy machine hits them all alike). Peak
memory is measured in a fresh process per (mechanism, shape), so that one configuration's
allocations cannot pollute another's. `attnlab.bench.worker` does the measuring (and says how).

Fresh processes come from fork servers on Linux: interpreters that have imported torch and the
mechanisms, and fork one child per job, which takes milliseconds rather than the seconds a new
interpreter takes to import torch. Elsewhere each job starts a new interpreter.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Without --repeats: as many timed rounds per shape as fit in --budget seconds, within these bounds.
DEFAULT_BUDGET_S = 3.0
MIN_REPEATS, MAX_REPEATS = 3, 30
WORKER_MODULE = "attnlab.bench.worker"


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
    """Time and measure `entries` ({"name", "options"}, optionally "label") at every N in `seq_lens`,
    in fresh processes. Results are keyed by the label (default: the name), so one mechanism can
    be timed twice with different options under two labels.

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
    names = [e.get("label", e["name"]) for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"measure: entries need distinct labels, got {names}")
    by_name = dict(zip(names, entries))
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
