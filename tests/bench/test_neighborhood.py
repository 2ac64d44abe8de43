"""`attnlab bench --neighborhood`: neighborhood attention against dense SDPA in one run."""
from __future__ import annotations

import json
import statistics

import pytest

from attnlab.bench import neighborhood as bench_neighborhood
from attnlab.cli import main


def test_neighborhood_mode_times_both_sides_in_one_run(monkeypatch, capsys):
    """`attnlab bench --neighborhood`: one JSON row per case, dense SDPA timed in the same run;
    a small case stands in for the issue's (16k-token dense attention takes ~20 s here)."""
    monkeypatch.setattr(bench_neighborhood, "CASES", {"1d": ((256,), (15,)), "2d": ((12, 12), (5, 5))})
    assert main(["bench", "--neighborhood", "1d,2d", "--repeats", "2", "--warmup", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["1d", "2d"]
    assert rows[0]["pairs"] == 256 * 15 and rows[1]["pairs"] == 144 * 25
    for r in rows:
        assert r["local_ms"] > 0 and r["dense_ms"] > 0 and len(r["ratios"]) == 2
        useful_local, useful_dense = 12 * r["pairs"] * 64 * 8, 12 * r["tokens"] ** 2 * 64 * 8
        assert r["ratio"] == pytest.approx(statistics.median(
            [(useful_local / a) / (useful_dense / b) for a, b in zip(r["local_s"], r["dense_s"])]))


def test_neighborhood_mode_repeats_short_passes_to_fill_each_round(monkeypatch, capsys):
    """Each side's round is the mean of as many passes as fill --min-seconds, the count taken from
    the warm-up: a pass of milliseconds is repeated, and both sides keep their own count."""
    monkeypatch.setattr(bench_neighborhood, "CASES", {"1d": ((256,), (15,))})
    calls = {"n": 0}
    real = bench_neighborhood.fwd_bwd

    def counting(fn, tensors, grad):
        calls["n"] += 1
        return real(fn, tensors, grad)

    monkeypatch.setattr(bench_neighborhood, "fwd_bwd", counting)
    assert bench_neighborhood.main(["--cases", "1d", "--repeats", "2", "--warmup", "1",
                                    "--min-seconds", "0.2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["local_loops"] > 1 and row["dense_loops"] > 1
    assert calls["n"] == 3 + 2 * (row["local_loops"] + row["dense_loops"])   # first call, warm-up, rounds
    with pytest.raises(SystemExit):
        bench_neighborhood.main(["--cases", "1d", "--min-seconds", "-1"])
    assert "--min-seconds >= 0" in capsys.readouterr().err


def test_neighborhood_mode_rejects_unknown_cases(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--neighborhood", "4d"])
    assert exc.value.code == 2
    assert "unknown case(s) ['4d']" in capsys.readouterr().err
