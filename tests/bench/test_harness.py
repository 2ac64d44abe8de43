"""`measure()`: jobs sent to fresh processes, answers gathered; failures are results, not errors."""
from __future__ import annotations

from attnlab.bench import measure

COMMON = {"heads": 2, "head_dim": 8, "batch": 1, "dtype": "float32", "causal": False, "device": "cpu",
          "threads": 1, "timeout": 120}


def test_measure_times_then_measures_memory_in_fresh_processes():
    lines = []
    measured = measure([{"name": "sdpa", "options": {}}, {"name": "mhsa", "options": {"num_kv_heads": 3}}],
                       [16], COMMON, baseline="sdpa", warmup=0, repeats=1, log=lines.append)
    assert set(measured) == {"env", "timings", "warmups", "memories"} and measured["warmups"] == {16: 0}
    assert measured["timings"][16]["sdpa"]["status"] == "ok"
    assert measured["timings"][16]["mhsa"]["status"] == "skipped"
    assert list(measured["memories"]) == [(16, "sdpa")] and measured["memories"][(16, "sdpa")]["status"] == "ok"
    assert measured["env"]["num_threads"] == 1 and len(lines) == 2


def test_nothing_to_measure_starts_no_process():
    assert measure([], [16, 32], COMMON, baseline=None) == {
        "env": None, "timings": {16: {}, 32: {}}, "warmups": {}, "memories": {}}


def test_the_package_exports_what_the_leaderboard_uses():
    import attnlab.bench as bench
    assert bench.median([3.0, 1.0, 2.0]) == 2.0 and bench.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0
    assert callable(bench.measure) and callable(bench.parse_options)
