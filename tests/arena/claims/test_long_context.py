import argparse
import json
import math

import pytest
import torch
from torch import nn

from attnlab.arena import claims
from attnlab.arena.claims.long_context import causality_gap


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("long_context")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["long_context", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    return (out / "long_context.md").read_text(), json.loads((out / "long_context.json").read_text()), out


def test_quick_run_rows_contexts_speeds_and_exclusion(quick_run):
    page, record, _ = quick_run
    data = record["data"]
    assert record["verdict"] in claims.VERDICTS
    assert sorted(data["results"]) == ["mhsa", "neighborhood1d", "routing"]
    assert "linear_infsa" in data["excluded"] and "causal" in data["excluded"]["linear_infsa"]
    assert data["contexts"] == [data["quality_context"], data["context"]] == [64, 128]
    for name, r in data["results"].items():
        assert sorted(map(int, r["trained"])) == sorted(data["contexts"])
        for context, t in r["trained"].items():
            assert t["context"] == int(context)
            steps = 8 if int(context) == data["quality_context"] else 6                  # --quick: 8 and 6 steps
            assert t["steps"] == steps and t["tokens"] == steps * t["batch_size"] * t["context"]
            assert t["tokens_per_s"] > 0 and math.isfinite(t["val_loss"]) and t["params"] > 0
            assert t["causality_gap"] <= 1e-5, (name, context)
            seeds = 2 if int(context) == data["quality_context"] else 1               # --quick: 2 seeds, long 1
            assert len(t["seeds"]) == len(t["val_losses"]) == len(t["runs"]) == seeds, (name, context)
            assert t["val_loss"] == pytest.approx(sum(t["val_losses"]) / seeds)
        assert all(s > 0 for s in r["timing_s"].values())
    quality_checks = [c["check"] for c in data["checks"] if "val loss" in c["check"]]
    assert quality_checks and all("context 64 (2 seeds)" in c for c in quality_checks)
    assert "| linear_infsa |" in page and "excluded: not causal" in page
    assert "| bigram counts (no model) |" in page and 2.0 < data["references"]["bigram"] < 2.6


def test_quick_run_writes_the_learning_curves_and_states_its_budget(quick_run):
    page, record, out = quick_run
    figure = out / "long_context.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![long_context](long_context.png)" in page
    assert "**Budget.**" in page and "mhsa" in record["budget"] and "bigram" in record["budget"]
    runs = record["data"]["results"]["mhsa"]["trained"][str(record["data"]["quality_context"])]["runs"]
    assert all(len(r["curve"]) >= 3 and r["curve"][0][0] == 0 for r in runs)


class _SeesTheFuture(nn.Module):
    """Logits at every position = embedding of the sum of all ids (leaks later positions)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 8)

    def forward(self, ids):
        return self.embed(ids.sum(1, keepdim=True).expand_as(ids) % 8)


def test_causality_gap_catches_a_leak():
    torch.manual_seed(0)
    assert causality_gap(_SeesTheFuture(), 8, 16, seed=0) > 1e-3
