"""`attnlab bench --numerics`: the Edge-MoE softmax/GELU timed against the exact ops.

A benchmark is not an op: the timing lives in attnlab.bench.numerics, the kernels in
attnlab.ops.numerics.
"""
from __future__ import annotations

import json
import math

import pytest

from attnlab.bench.numerics import time_numerics
from attnlab.cli import main


def test_time_numerics_small():
    rows = time_numerics([(8, 16)], repeats=1, chunk_sizes=(1, 8))
    impls = {r["impl"] for r in rows}
    assert {"exact", "edgemoe(chunk=1)", "edgemoe(chunk=8)", "gelu", "gelu_tanh", "gelu_edgemoe"} <= impls
    for r in rows:
        assert r["median_ms"] >= 0 and r["rows"] == 8 and r["M"] == 16
        assert r["max_abs_err"] < (5e-4 if r["op"] == "gelu" else 1e-4), r
    with pytest.raises(ValueError, match="repeats"):
        time_numerics([(8, 16)], repeats=0)


def test_numerics_mode_writes_rows_with_same_run_ratios(tmp_path):
    assert main(["bench", "--numerics", "--seq-lens", "8", "--heads", "1", "--repeats", "1",
                 "--out", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    impls = {(r["op"], r["impl"]) for r in rows}
    assert {("softmax", "torch.softmax"), ("softmax", "edgemoe(chunk=1)"), ("gelu", "gelu_edgemoe")} <= impls
    for r in rows:
        assert r["median_ms"] > 0 and math.isfinite(r["max_abs_err"])
        if r["impl"] in ("torch.softmax", "gelu"):
            assert r["ratio"] == 1.0
