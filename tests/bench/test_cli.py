"""`attnlab bench` end to end on tiny shapes, and its argument errors.

The two end-to-end runs start real measuring processes (a fork server each), so they are the slow
part here: a few seconds each on 2 cores.
"""
from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch.nn as nn

from attnlab import cli
from attnlab.registry import MechanismSpec, _REGISTRY, list_specs, register

TINY = ["--seq-lens", "16,32", "--heads", "2", "--head-dim", "8", "--warmup", "0", "--repeats", "2"]
ROW_KEYS = {"mechanism", "is_baseline", "baseline", "status", "reason", "batch", "seq_len", "heads", "head_dim",
            "dim", "dtype", "causal", "device", "options", "repeats", "fwd_ms", "fwd_bwd_ms", "fwd_ratio",
            "fwd_bwd_ratio", "fwd_gflops", "fwd_bwd_gflops", "flops_fwd", "flops_bwd", "flops_source",
            "peak_mem_mb", "mem_method", "env", "notes", "warmup"}
ENV_KEYS = {"torch", "python", "platform", "cpu", "num_threads"}
TOY = "bench_toy_noncausal"


class _NonCausalToy(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, *, is_causal: bool = False):
        if is_causal:
            raise NotImplementedError(f"mechanism {TOY!r} does not support causal")
        return self.proj(x)


@pytest.fixture(scope="module")
def toy():
    """A throwaway mechanism without causal support, registered only while these tests run."""
    list_specs()  # built-ins first, so the finalizer removes exactly what this added
    register(MechanismSpec(name=TOY, paper="toy", year=2024, family="softmax", layout="seq",
                           time="O(N)", memory="O(N)", exact=False, causal=False))(_NonCausalToy)
    yield TOY
    _REGISTRY.pop(TOY, None)


def _rows(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def causal_run(toy, tmp_path_factory):
    """One tiny causal run of mhsa and the toy against the sdpa baseline, with --json."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--mechanisms", f"mhsa,{toy}", *TINY, "--causal", "--json", "--out", str(out)]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # capsys is per test; this fixture is per module
        mp.setattr(sys, "stdout", stdout)
        code = cli.main(argv)
    return code, out, stdout.getvalue()


def test_rows_have_every_key_and_finite_times(causal_run):
    code, out, _ = causal_run
    assert code == 0
    rows = _rows(out)
    assert [(r["mechanism"], r["seq_len"]) for r in rows] == [
        ("sdpa", 16), ("mhsa", 16), (TOY, 16), ("sdpa", 32), ("mhsa", 32), (TOY, 32)]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert ENV_KEYS <= set(r["env"])
        shape = (r["batch"], r["heads"], r["head_dim"], r["dim"], r["dtype"], r["causal"])
        assert shape == (1, 2, 8, 16, "float32", True)
        assert r["warmup"] == 0
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["mechanism"] for r in ok} == {"sdpa", "mhsa"}
    for r in ok:
        assert r["repeats"] == 2
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_ratio", "fwd_bwd_ratio", "fwd_bwd_gflops", "flops_fwd"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["mechanism"], key, r[key])
        assert r["peak_mem_mb"] >= 0


def test_baseline_ratio_is_one(causal_run):
    _, out, _ = causal_run
    base = [r for r in _rows(out) if r["is_baseline"]]
    assert [r["mechanism"] for r in base] == ["sdpa", "sdpa"]
    for r in base:
        assert r["fwd_ratio"] == 1.0 and r["fwd_bwd_ratio"] == 1.0


def test_unsupported_configuration_is_a_skipped_row(causal_run):
    _, out, _ = causal_run
    skipped = [r for r in _rows(out) if r["mechanism"] == TOY]
    assert len(skipped) == 2
    for r in skipped:
        assert r["status"] == "skipped" and "causal" in r["reason"]
        assert r["fwd_ms"] is None and r["fwd_bwd_ratio"] is None and r["peak_mem_mb"] is None


def test_json_stdout_and_png(causal_run):
    _, out, stdout = causal_run
    assert [json.loads(line) for line in stdout.splitlines()] == _rows(out)
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    assert matplotlib.image.imread(out / "bench.png").ndim == 3


def test_mechanism_that_raises_is_skipped_not_fatal(tmp_path, capsys):
    # num_kv_heads=3 does not divide 2 heads: mhsa raises while being built in the worker.
    argv = ["bench", "--mechanisms", "mhsa", "--seq-lens", "16", "--heads", "2", "--head-dim", "8",
            "--warmup", "0", "--repeats", "1", "--no-plot", "--options", '{"mhsa": {"num_kv_heads": 3}}',
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = {r["mechanism"]: r for r in _rows(tmp_path)}
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["fwd_bwd_ratio"] == 1.0
    assert rows["mhsa"]["status"] == "skipped" and "num_kv_heads" in rows["mhsa"]["reason"]
    assert rows["mhsa"]["options"] == {"num_kv_heads": 3}
    assert not (tmp_path / "bench.png").exists()
    table = capsys.readouterr().out
    assert "skipped" in table and "results.jsonl" in table


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "mhsa,nope"], "unknown mechanism 'nope'"),
    (["--mechanisms", "mhsa,"], "empty mechanism name"),
    (["--baseline", "nope"], "unknown mechanism 'nope'"),
    (["--options", "{not json"], "--options is not valid JSON"),
    (["--options", '{"mhsa": 2}'], "--options must be a JSON object of objects"),
    (["--options", '{"moh": {"top_k": 2}}'], "'moh', which is not benchmarked"),
    (["--options", '{"mhsa": {"top_k": 2}}'], "'mhsa' has no option(s) ['top_k']"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, tmp_path, capsys):
    assert cli.main(["bench", "--mechanisms", "mhsa", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--seq-lens", "16,x"], "expected an integer >= 1, got 'x'"),
    (["--heads", "0"], "expected an integer >= 1, got '0'"),
    (["--budget", "-1"], "expected a positive number of seconds"),
])
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
