"""`attnlab arena`: a tiny end-to-end run (JSON fields, ranking, skipped mechanisms, seeds), failures and errors.

The end-to-end run trains 2 mechanisms x 2 seeds for 8 steps at width 16 and times one layer at
N=16,32 in a fork server (the slow part: a few seconds to import torch there).
"""
from __future__ import annotations

import io
import json
import math
import shlex
import statistics
import sys

import pytest

from attnlab import cli
from attnlab.arena import leaderboard
from attnlab.arena.leaderboard import ArenaConfig, rank_rows
from attnlab.train import TrainConfig, train
from attnlab.registry import list_specs

TASK_OPTIONS = {"num_pairs": 4, "num_queries": 4, "num_keys": 8, "num_values": 8}
TINY = ["--tasks", "assoc_recall", "--task-option", "num_pairs=4", "--task-option", "num_queries=4", "--task-option", "num_keys=8",
        "--task-option", "num_values=8", "--layers", "1", "--dim", "16", "--heads", "2", "--steps", "8",
        "--batch-size", "8", "--warmup", "2", "--eval-batches", "1"]
DOC_KEYS = {"format", "command", "options", "environment", "tasks", "rows", "skipped", "wall_s"}
ROW_KEYS = {"rank", "task", "mechanism", "options", "status", "error", "quality_metric", "higher_is_better",
            "quality", "quality_std", "quality_per_seed", "seeds", "failed_seeds", "params", "tokens_per_s",
            "train_s", "final", "timing", "tie", "curves", "difficulty"}
TIMING_KEYS = {"seq_len", "status", "reason", "fwd_ms", "fwd_bwd_ms", "fwd_ms_iqr", "fwd_bwd_ms_iqr", "repeats",
               "peak_mem_mb", "mem_method", "flops_fwd", "flops_bwd"}
ENV_KEYS = {"torch", "attnlab", "python", "platform", "cpu", "cpu_count", "train_threads", "timing_threads",
            "loadavg_start", "loadavg_end"}
NON_CAUSAL = next(s.name for s in list_specs(layout="seq") if not s.causal)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """mhsa and minimal (causal) and one non-causal mechanism, seeds 0 and 1, with --json."""
    out = tmp_path_factory.mktemp("arena")
    argv = ["arena", "--mechanisms", f"mhsa,minimal,{NON_CAUSAL}", *TINY, "--seeds", "0,1", "--seq-lens", "16,32",
            "--timing-budget", "0.05", "--json", "--out", str(out)]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # capsys is per test; this fixture is per module
        mp.setattr(sys, "stdout", stdout)
        code = cli.main(argv)
    doc = json.loads((out / "arena.json").read_text()) if (out / "arena.json").exists() else None
    return code, out, doc, stdout.getvalue()


def test_json_has_the_documented_fields(tiny_run):
    code, out, doc, _ = tiny_run
    assert code == 0
    assert DOC_KEYS <= set(doc), DOC_KEYS - set(doc)
    assert ENV_KEYS <= set(doc["environment"]), ENV_KEYS - set(doc["environment"])
    assert doc["environment"]["train_threads"] == 1 and doc["environment"]["timing_threads"] == 1
    assert doc["tasks"] == [{"name": "assoc_recall", "options": TASK_OPTIONS, "quality": "accuracy",
                             "higher_is_better": True, "causal": True, "seq_len": 16}]
    assert doc["options"]["mechanisms"] == ["mhsa", "minimal", NON_CAUSAL]
    assert [r["mechanism"] for r in doc["rows"]] in (["mhsa", "minimal"], ["minimal", "mhsa"])
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["status"] == "ok" and r["error"] is None and r["failed_seeds"] == []
        assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["train_s"] > 0
        assert 0.0 <= r["quality"] <= 1.0 and r["final"]["val_accuracy"] == pytest.approx(r["quality"])
        assert [t["seq_len"] for t in r["timing"]] == [16, 32]
        for t in r["timing"]:
            assert TIMING_KEYS <= set(t), TIMING_KEYS - set(t)
            assert t["status"] == "ok" and t["repeats"] >= 1
            for key in ("fwd_ms", "fwd_bwd_ms"):
                assert math.isfinite(t[key]) and t[key] > 0, (r["mechanism"], key, t[key])
            assert t["peak_mem_mb"] >= 0


def test_rows_are_ranked_by_quality(tiny_run):
    _, _, doc, _ = tiny_run
    rows = doc["rows"]
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["quality"] >= rows[1]["quality"]


def test_non_causal_mechanism_is_skipped_with_its_reason(tiny_run):
    _, _, doc, _ = tiny_run
    assert doc["skipped"] == [{"task": "assoc_recall", "mechanism": NON_CAUSAL, "reason": (
        f"task 'assoc_recall' trains a causal model and {NON_CAUSAL!r} has no causal mode (spec.causal=False)")}]
    assert NON_CAUSAL not in [r["mechanism"] for r in doc["rows"]]


def test_seeds_aggregate_to_mean_and_std_of_real_runs(tiny_run):
    _, _, doc, _ = tiny_run
    for r in doc["rows"]:
        assert r["seeds"] == [0, 1] and len(r["quality_per_seed"]) == 2
        assert r["quality"] == pytest.approx(statistics.fmean(r["quality_per_seed"]))
        assert r["quality_std"] == pytest.approx(statistics.stdev(r["quality_per_seed"]))
    # seed 1 of mhsa is exactly what train() gives for the same configuration
    mhsa = next(r for r in doc["rows"] if r["mechanism"] == "mhsa")
    direct = train(TrainConfig(task="assoc_recall", task_options=TASK_OPTIONS, layers=["mhsa"], dim=16, num_heads=2,
                               mlp_ratio=0.0, steps=8, batch_size=8, lr=3e-3, warmup=2, eval_every=8,
                               eval_batches=1, eval_batch_size=128, log_every=8, checkpoint_every=0, seed=1,
                               threads=1), None, progress=False)
    assert mhsa["quality_per_seed"][1] == direct.final["val_accuracy"]
    assert mhsa["params"] == direct.params


def test_json_stdout_png_and_repeatable_command(tiny_run):
    _, out, doc, stdout = tiny_run
    assert [json.loads(line) for line in stdout.splitlines()] == doc["rows"]
    assert (out / "arena.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    argv = shlex.split(doc["command"])
    assert argv[:2] == ["attnlab", "arena"]
    again = leaderboard.config_from_args(cli.build_parser().parse_args(argv[1:]))
    assert again == ArenaConfig(**{k: v for k, v in doc["options"].items()})


def test_a_mechanism_that_fails_is_a_failed_row(tmp_path, capsys):
    # num_kv_heads=3 does not divide 2 heads: mhsa raises while its model is built.
    argv = ["arena", "--mechanisms", "mhsa,minimal", *TINY, "--no-timing", "--no-plot", "--jobs", "1",
            "--options", '{"mhsa": {"num_kv_heads": 3}}', "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "arena.json").read_text())
    rows = {r["mechanism"]: r for r in doc["rows"]}
    assert rows["minimal"]["status"] == "ok" and rows["minimal"]["rank"] == 1
    assert rows["mhsa"]["status"] == "failed" and rows["mhsa"]["rank"] is None
    assert "num_kv_heads" in rows["mhsa"]["error"] and rows["mhsa"]["quality"] is None
    assert rows["mhsa"]["options"] == {"num_kv_heads": 3}
    assert [r["mechanism"] for r in doc["rows"]] == ["minimal", "mhsa"]      # failed rows last
    assert all(r["timing"] == [] for r in doc["rows"])
    assert not (tmp_path / "arena.png").exists()
    out = capsys.readouterr().out
    assert "failed: " in out and "num_kv_heads" in out


def test_rank_rows_follows_the_direction_and_puts_failures_last():
    def row(name, quality, higher=True, status="ok"):
        return {"mechanism": name, "quality": quality, "higher_is_better": higher, "status": status, "rank": 0}
    ranked = rank_rows([row("a", 0.2), row("b", 0.9), row("c", None, status="failed"), row("d", 0.5)])
    assert [(r["mechanism"], r["rank"]) for r in ranked] == [("b", 1), ("d", 2), ("a", 3), ("c", None)]
    ranked = rank_rows([row("a", 0.2, False), row("b", 0.9, False), row("d", float("nan"), False)])
    assert [(r["mechanism"], r["rank"]) for r in ranked] == [("a", 1), ("b", 2), ("d", None)]


def test_default_selection_is_every_sequence_and_2d_mechanism_on_three_tasks():
    tasks, names, skipped = leaderboard._select(ArenaConfig())
    seq, flat = list_specs(layout="seq"), list_specs(layout="2d")
    assert [t.name for t in tasks][:2] == ["mqar_sweep", "tinyshakespeare"]
    assert [t.name for t in tasks][2] in ("fashion_mnist", "digits")        # digits where Fashion-MNIST is missing
    assert tasks[0].options()["pairs"] == [2, 4, 8, 16] and tasks[1].options()["context"] == 32
    assert names == [s.name for s in seq] + [s.name for s in flat]
    for task in tasks[:2]:        # causal token tasks: the non-causal and the 2-D mechanisms sit out
        out = {s["mechanism"] for s in skipped if s["task"] == task.name}
        assert out == {s.name for s in seq if not s.causal} | {s.name for s in flat}
    assert not [s for s in skipped if s["task"] == tasks[2].name]            # the image task runs them all


def test_rank_rows_ties_means_within_the_spread():
    def row(name, quality, std):
        return {"mechanism": name, "quality": quality, "quality_std": std, "higher_is_better": True,
                "status": "ok", "rank": 0}
    ranked = rank_rows([row("a", 0.90, 0.02), row("b", 0.89, 0.01), row("c", 0.50, 0.01), row("d", 0.495, None)])
    assert [(r["mechanism"], r["rank"], r["tie"]) for r in ranked] == [
        ("a", 1, False), ("b", 1, True), ("c", 3, False), ("d", 3, True)]
    one_seed = rank_rows([row("a", 0.9, None), row("b", 0.9, None)])
    assert [(r["rank"], r["tie"]) for r in one_seed] == [(1, False), (2, False)]


def test_difficulty_reads_the_breakdown_metrics_in_order():
    final = {"val_accuracy": 0.5, "val_accuracy_p16": 0.1, "val_accuracy_p2": 1.0, "val_accuracy_d8_16": 0.4,
             "val_accuracy_d0_8": 0.9, "val_loss": 1.0}
    assert leaderboard.difficulty(final, "accuracy") == {"pairs": {"2": 1.0, "16": 0.1},
                                                         "distance": {"0-8": 0.9, "8-16": 0.4}}
    assert leaderboard.difficulty({"val_loss": 1.0}, "loss") == {}


def test_image_task_gives_rows_to_2d_and_non_causal_mechanisms(tmp_path):
    argv = ["arena", "--tasks", "digits", "--mechanisms", f"neighborhood2d,halo2d,{NON_CAUSAL}", "--layers", "1",
            "--dim", "16", "--heads", "2", "--steps", "3", "--batch-size", "8", "--warmup", "1", "--eval-batches", "1",
            "--no-timing", "--no-plot", "--jobs", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "arena.json").read_text())
    assert sorted(r["mechanism"] for r in doc["rows"]) == sorted(["neighborhood2d", "halo2d", NON_CAUSAL])
    assert all(r["status"] == "ok" for r in doc["rows"]), [r["error"] for r in doc["rows"]]
    assert doc["skipped"] == []


def test_2d_mechanisms_are_timed_on_square_token_counts(tmp_path):
    """A 2-D row gets timing like a sequence row, its N tokens as an s x s image; a non-square N
    is a skipped timing entry that says why, not a failed row."""
    argv = ["arena", "--tasks", "digits", "--mechanisms", f"neighborhood2d,{NON_CAUSAL}", "--layers", "1",
            "--dim", "16", "--heads", "2", "--steps", "2", "--batch-size", "8", "--warmup", "1", "--eval-batches", "1",
            "--seq-lens", "16,12", "--timing-budget", "0.05", "--no-plot", "--jobs", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "arena.json").read_text())
    rows = {r["mechanism"]: r for r in doc["rows"]}
    timing = {t["seq_len"]: t for t in rows["neighborhood2d"]["timing"]}
    assert timing[16]["status"] == "ok" and timing[16]["fwd_bwd_ms"] > 0 and timing[16]["peak_mem_mb"] >= 0
    assert timing[12]["status"] == "skipped" and "perfect square" in timing[12]["reason"]
    assert {t["seq_len"]: t["status"] for t in rows[NON_CAUSAL]["timing"]} == {16: "ok", 12: "ok"}


def test_quick_run_sweeps_mqar_difficulty_in_seconds(tmp_path):
    argv = ["arena", "--quick", "--mechanisms", "mhsa,neighborhood1d", "--jobs", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "arena.json").read_text())
    assert [t["name"] for t in doc["tasks"]] == ["mqar_sweep"] and doc["options"]["steps"] == leaderboard.QUICK_STEPS
    for r in doc["rows"]:
        assert list(r["difficulty"]["pairs"]) == ["2", "4", "8", "16"] and r["difficulty"]["distance"]
        assert len(r["curves"]["0"]) >= 2
    assert (tmp_path / "difficulty.png").read_bytes().startswith(b"\x89PNG")


def test_mhsa_solves_the_default_mqar_sweep_at_the_default_budget():
    # The README's main job must show the baseline solving its task (issue "Models that learn"):
    # mhsa with the arena's own defaults (2 layers, width 64, no MLP, 600 steps, lr 3e-3).
    config = ArenaConfig(tasks=["mqar_sweep"], mechanisms=["mhsa"], timing=False, jobs=1)
    row = leaderboard.run(config, log=lambda text: None)["rows"][0]
    assert row["status"] == "ok", row["error"]
    assert row["quality"] >= 0.99, row["difficulty"]


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "mhsa,nope"], "unknown mechanism 'nope'"),
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--mechanisms", "neighborhood3d"], "has layout '3d'"),
    (["--dim", "30", "--heads", "4"], "dim (30) must be divisible by heads (4)"),
    (["--mechanisms", "mhsa", "--options", '{"moh": {"top_k": 2}}'], "'moh', which is not benchmarked"),
    (["--mechanisms", "mhsa", "--options", '{"mhsa": {"top_k": 2}}'], "'mhsa' has no option(s) ['top_k']"),
    (["--task-option", "nope=3"], "no selected task takes the option 'nope'"),
    (["--tasks", "mqar_sweep", "--task-option", "pairs=[3,40]"], "need at least that many keys"),
    (["--task-option", "seed=3"], "give --seeds"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, tmp_path, capsys):
    assert cli.main(["arena", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "expected comma-separated integers >= 0"),
    (["--seeds", "-1"], "expected comma-separated integers >= 0"),
    (["--seq-lens", "0"], "expected an integer >= 1, got '0'"),
    (["--mechanisms", "mhsa,,moh"], "empty name"),
    (["--lr", "0"], "expected a positive number"),
])
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["arena", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
