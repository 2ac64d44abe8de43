"""`attnlab reproduce minimal --quick`: the report's rows, finite numbers and parameter arithmetic."""
import argparse
import math

import pytest

from attnlab.arena.claims import get_claim, render
from attnlab.mechanisms.minimal import MinimalAttention

VARIANTS = ["standard", "mlp_free", "collapsed_qk", "collapsed_qk_vo", "symmetric", "minimum"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim = get_claim("minimal")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "minimal", True, 0, tmp_path_factory.mktemp("minimal")
    return claim, args, claim.run(args)


def test_quick_report_has_every_variant_with_finite_numbers(quick):
    claim, args, report = quick
    main = report.tables[0]
    assert [row[0] for row in main.rows] == VARIANTS + ["reference: linear on pixels"]
    for name in VARIANTS:
        runs = report.data["runs"][name]
        assert len(runs) == args.seeds == 2
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
    assert [row[0] for row in report.tables[1].rows] == VARIANTS[1:]
    page = render(claim, report, "attnlab reproduce minimal --quick", 1.0)
    assert "| collapsed_qk_vo |" in page and f"Verdict: {report.verdict}" in page


def test_parameter_counts_follow_the_papers_arithmetic(quick):
    _, args, report = quick
    stats = report.data["stats"]
    totals = [stats[name]["params"] for name in VARIANTS]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    C, h, L = args.dim, args.heads, args.layers
    # Dropping the MLP removes fc1, fc2 (with biases) and the second LayerNorm of every block.
    hidden = int(C * args.mlp_ratio)
    assert stats["standard"]["params"] - stats["mlp_free"]["params"] == L * (2 * C * hidden + hidden + 3 * C)
    assert stats["standard"]["attention_params"] == stats["mlp_free"]["attention_params"] == L * (4 * C * C + C)
    options = {"collapsed_qk": dict(collapse_vo="separate"), "collapsed_qk_vo": dict(collapse_vo="one"),
               "symmetric": dict(symmetric=True, collapse_vo="one"), "minimum": dict(symmetric=True, collapse_vo="none")}
    for name, opts in options.items():
        assert stats[name]["attention_params"] == L * MinimalAttention.parameter_count_formula(C, h, **opts)


def test_verdict_follows_the_checks(quick):
    _, _, report = quick
    passes = [c["pass"] for c in report.data["checks"].values()]
    expected = "holds" if all(passes) else "partly" if any(passes) else "does not hold"
    assert report.verdict == expected


def test_curve_figure_budget_and_linear_reference(quick):
    _, args, report = quick
    assert len(report.figures) == 1 and report.figures[0].name == "minimal_curves.png"
    assert report.figures[0].is_file() and report.figures[0].parent == args.out
    assert report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps of batch" in report.budget and "linear classifier" in report.budget
    linear = report.data["linear_reference"]
    assert [r["seed"] for r in linear] == [0, 1]
    for r in linear:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["curve"][0][0] == 0 and r["curve"][-1][0] == args.steps
    for r in report.data["runs"]["standard"]:
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == args.steps and len(r["curve"]) >= 3
