"""Rows, statistics, the table and the plot of `attnlab bench`, from hand-made measurements."""
from __future__ import annotations

import io

import pytest

from attnlab.bench import report

COMMON = {"baseline": "sdpa", "dtype": "float32", "causal": False, "device": "cpu", "env": {"num_threads": 1}}


def _measured():
    ok = {"status": "ok", "fwd_ms": [1.0, 2.0, 3.0], "fwd_bwd_ms": [2.0, 4.0, 6.0]}
    fast = {"status": "ok", "fwd_ms": [0.5, 1.0, 1.5], "fwd_bwd_ms": [1.0, 2.0, 3.0]}
    memory = {"status": "ok", "peak_mem_mb": 1.5, "mem_method": "vmhwm", "flops_fwd": 2_000_000,
              "flops_bwd": 4_000_000, "flops_source": "useful_flops"}
    return {"env": None, "warmups": {16: 1},
            "timings": {16: {"sdpa": ok, "fast": fast, "broken": {"status": "skipped", "reason": "boom"}}},
            "memories": {(16, "sdpa"): memory, (16, "fast"): {**memory, "reason": "flops: nope"}}}


def test_statistics():
    assert report.median([3.0, 1.0, 2.0]) == 2.0 and report.median([]) is None
    assert report.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0 and report.iqr([1.0]) is None
    assert report.paired_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == 2.0
    assert report.paired_ratio([1.0], [1.0, 2.0]) is None
    assert report.gflops(2e9, 1000.0) == pytest.approx(2.0) and report.gflops(None, 1.0) is None


def test_rows_pair_each_mechanism_with_the_baseline_and_keep_skips():
    rows = report.rows(_measured(), ["sdpa", "fast", "broken", "causal_only"], [16], batch=1, heads=2,
                       head_dim=8, common=COMMON, options={"fast": {"k": 1}},
                       pre_skipped={"causal_only": "no causal"})
    by = {r["mechanism"]: r for r in rows}
    assert list(by) == ["sdpa", "fast", "broken", "causal_only"]
    assert list(by["sdpa"])[:7] == ["mechanism", "is_baseline", "batch", "seq_len", "heads", "head_dim", "dim"]
    assert by["sdpa"]["is_baseline"] and by["sdpa"]["fwd_ratio"] == 1.0 and by["sdpa"]["warmup"] == 1
    assert by["fast"]["fwd_bwd_ratio"] == 0.5 and by["fast"]["fwd_bwd_ms"] == 2.0
    assert by["fast"]["fwd_bwd_gflops"] == pytest.approx(6e6 / 2e-3 / 1e9)
    assert by["fast"]["options"] == {"k": 1} and by["fast"]["notes"] == ["flops: nope"]
    assert by["broken"]["status"] == "skipped" and by["broken"]["reason"] == "boom"
    assert by["causal_only"]["reason"] == "no causal" and by["causal_only"]["repeats"] == 0


def test_table_and_plot(tmp_path):
    from rich.console import Console
    rows = report.rows(_measured(), ["sdpa", "fast", "broken"], [16], batch=1, heads=2, head_dim=8,
                       common=COMMON, options={}, pre_skipped={})
    console = Console(file=io.StringIO(), width=200)
    report.print_table(rows, "title", console)
    text = console.file.getvalue()
    assert "skipped: boom" in text and "baseline" in text and "0.500" in text
    report.plot(rows, "title", tmp_path / "a.png")
    report.plot([r for r in rows if r["status"] != "ok"], "nothing", tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
