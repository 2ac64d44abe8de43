"""`attnlab reproduce moh --quick`: rows, finite numbers, measured active fractions, router parameters."""
import argparse
import math

import pytest

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims.moh import moh_split


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim = get_claim("moh")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "moh", True, 0, tmp_path_factory.mktemp("moh")
    return claim, args, claim.run(args)


def test_splits_are_the_nearest_achievable_fractions():
    assert [moh_split(8, 2, f) for f in (0.5, 0.75, 0.9)] == [(2, 0.5), (4, 0.75), (5, 0.875)]
    assert [moh_split(20, 5, f) for f in (0.5, 0.75, 0.9)] == [(5, 0.5), (10, 0.75), (13, 0.9)]
    with pytest.raises(ValueError, match="no routed head"):
        moh_split(4, 4, 0.5)


def test_quick_report_has_mhsa_and_each_fraction_with_finite_numbers(quick):
    claim, args, report = quick
    rows = report.tables[0].rows
    assert [row[0] for row in rows] == ["mhsa", "moh 50.0%", "moh 75.0%", "moh 87.5%", "reference: linear on pixels"]
    for label, runs in report.data["runs"].items():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
            if label != "mhsa":
                assert math.isfinite(r["last_train_aux_loss"]) and r["last_train_aux_loss"] > 0
    page = render(claim, report, "attnlab reproduce moh --quick", 1.0)
    assert "| moh 87.5% |" in page and f"Verdict: {report.verdict}" in page


def test_measured_active_heads_equal_the_configured_split(quick):
    _, args, report = quick
    for label, spec in report.data["models"].items():
        if label == "mhsa":
            continue
        active = args.shared_heads + spec["top_k"]
        for r in report.data["runs"][label]:
            assert len(r["gates"]) == args.layers
            for g in r["gates"]:
                # Every test token activates exactly shared + top_k heads ...
                assert g["min_active"] == g["max_active"] == active
                assert g["measured_fraction"] == pytest.approx(active / args.heads, abs=1e-12)
                # ... and picks exactly top_k routed heads, so the routed shares sum to top_k.
                assert sum(g["routed_share"]) == pytest.approx(spec["top_k"], abs=1e-9)


def test_moh_differs_from_mhsa_only_by_its_routers(quick):
    _, args, report = quick
    stats = report.data["stats"]
    C, h, h_s, L = args.dim, args.heads, args.shared_heads, args.layers
    routers = L * C * ((h - h_s) + (h_s if h_s > 1 else 0) + 2)       # W_r, W_s, W_h per layer
    assert stats["mhsa"]["attention_params"] == L * (4 * C * C + C)
    for label in ("moh 50.0%", "moh 75.0%", "moh 87.5%"):
        assert stats[label]["router_params"] == routers
        assert stats[label]["params"] - stats["mhsa"]["params"] == routers


def test_curve_figure_budget_and_linear_reference(quick):
    _, args, report = quick
    assert len(report.figures) == 1 and report.figures[0].name == "moh_curves.png"
    assert report.figures[0].is_file() and report.figures[0].parent == args.out
    assert report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps of batch" in report.budget and "linear classifier" in report.budget
    assert report.tables[0].rows[-1][0] == "reference: linear on pixels"
    assert len(report.data["linear_reference"]) == 2
    for r in report.data["runs"]["mhsa"]:
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == args.steps and len(r["curve"]) >= 3
