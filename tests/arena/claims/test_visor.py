"""`attnlab reproduce visor --quick`: the rows, finite numbers, FLOPs (analytic = FlopCounterMode, in
the order (b) < (c) < (a)), equal parameter counts, the plain-torch row, curves, budget and page."""
import argparse
import math

import pytest

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims.visor import CROSS, FULL, TORCH, TorchReference
from attnlab.tasks import create_task


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim = get_claim("visor")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "visor", True, 0, tmp_path_factory.mktemp("visor")
    return claim, args, claim.run(args)


def test_defaults_are_the_documented_run():
    parser = argparse.ArgumentParser()
    get_claim("visor").add_arguments(parser)
    args = parser.parse_args([])
    assert (args.grid, args.patch, args.seeds) == (2, 2, 3) and args.refine == [[0]] and args.steps == 1600
    assert parser.parse_args(["--refine", "0", "1,2", "--cross-layers", "1,3"]).refine == [[0], [1, 2]]


def test_quick_report_rows_and_finite_numbers(quick):
    claim, args, report = quick
    rows = report.tables[0].rows
    assert [row[0] for row in rows] == [FULL, CROSS, "(c) VISOR, refine [0]", TORCH]
    assert [row[1] for row in rows] == ["F F", "C C", "F C", "F F"]
    for label, runs in report.data["runs"].items():
        assert len(runs) == (1 if label == TORCH else 2)
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
            assert r["curve"][0][0] == 0 and r["curve"][-1][0] == args.steps and len(r["curve"]) >= 3
    page = render(claim, report, "attnlab reproduce visor --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "| (b) cross-attention only |" in page
    assert report.verdict in ("holds", "partly", "does not hold")


def test_flops_match_the_counter_and_order(quick):
    _, _, report = quick
    flops = report.data["flops"]
    for f in flops.values():
        assert f["analytic"] == f["counted"] > 0
    assert flops[CROSS]["analytic"] < flops["(c) VISOR, refine [0]"]["analytic"] < flops[FULL]["analytic"]
    ratios = [row[7] for row in report.tables[0].rows]
    assert ratios[0] == "1.000" and ratios[-1] == "1.000" and all(float(r) < 1 for r in ratios[1:-1])
    assert all(row[3] == "yes" for row in report.tables[2].rows)


def test_same_parameters_and_a_torch_reference_of_the_same_size(quick):
    _, args, report = quick
    params = {label: s["params"] for label, s in report.data["stats"].items()}
    assert len(set(params.values())) == 1, params          # one set of weights per layer serves every mode
    task = create_task("grid_vqa", grid=args.grid, patch=args.patch, val_size=args.val_size)
    ref = TorchReference(task, args.dim, args.heads, args.layers, args.mlp_ratio, 1.0)
    assert sum(p.numel() for p in ref.parameters()) == params[FULL]


def test_curve_figure_budget_and_checks(quick):
    _, args, report = quick
    assert len(report.figures) == 1 and report.figures[0].name == "visor.png"
    assert report.figures[0].is_file() and report.figures[0].parent == args.out
    assert report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps of batch" in report.budget and FULL in report.budget and "over the last" in report.budget
    assert set(report.data["checks"]) and report.data["sanity"] is not None
