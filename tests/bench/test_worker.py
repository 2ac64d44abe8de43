"""The measuring process's jobs, run in this process (the harness runs them in fresh ones)."""
from __future__ import annotations

from attnlab.bench.worker import memory_job, run_job, time_job

JOB = {"device": "cpu", "dtype": "float32", "batch": 1, "seq_len": 16, "heads": 2, "head_dim": 8,
       "causal": False, "threads": None}


def test_time_job_times_what_builds_and_skips_what_does_not():
    entries = [{"name": "sdpa"}, {"name": "mhsa", "options": {"num_kv_heads": 3}}, {"name": "mhsa"}]
    job = {**JOB, "kind": "time", "entries": entries, "baseline": "sdpa", "warmup": 0, "repeats": 2,
           "budget_s": 1.0, "min_repeats": 1, "max_repeats": 2}
    result = time_job(job)
    assert result["warmup"] == 0 and {"torch", "num_threads"} <= set(result["env"])
    assert result["results"]["mhsa"]["status"] == "ok"  # the second mhsa entry (same name) is the one kept
    assert len(result["results"]["sdpa"]["fwd_ms"]) == 2 and len(result["results"]["sdpa"]["fwd_bwd_ms"]) == 2


def test_memory_job_measures_and_counts_flops():
    result = memory_job({**JOB, "kind": "memory", "entries": [{"name": "sdpa"}]})
    assert result["status"] == "ok" and result["peak_mem_mb"] >= 0
    assert result["flops_source"] == "useful_flops" and result["flops_fwd"] > 0


def test_a_broken_job_is_an_answer():
    assert "error" in run_job({"kind": "time"})
