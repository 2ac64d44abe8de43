"""`attnlab reproduce msga --quick`: every row and test, the parameter counts, finite numbers, the verdict rule."""
import math

import pytest
import torch

from attnlab.arena.claims import claim_args, render
from attnlab.arena.claims.msga import GUIDED, UNET, UNGUIDED, judge


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim, args = claim_args("msga", quick=True, out=tmp_path_factory.mktemp("msga"))
    return claim, args, claim.run(args)


def test_quick_report_has_every_model_and_test_with_finite_numbers(quick):
    claim, args, report = quick
    tests = ["axial", "coronal", "coronal_held_out_rows"] if args.source == "mni" else ["axial"]
    assert len(report.tables) == len(tests) + 1
    for table in report.tables[:-1]:
        assert [row[0] for row in table.rows] == [GUIDED, UNGUIDED, UNET, "reference: all background",
                                                "reference: the true labels at 1/4 resolution (MSGA's output), resized back"]
    for label in (GUIDED, UNGUIDED, UNET):
        for r in report.data["runs"][label]:
            assert sorted(r["scores"]) == sorted(tests) and r["curve"][0][0] == 0
            for scores in r["scores"].values():
                assert 0.0 <= scores["dice"] <= 1.0 and math.isfinite(scores["dice"])
    page = render(claim, report, "attnlab reproduce msga --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "not comparable" in page.lower() and "CHAOS" in page
    assert report.figures[0].is_file() and report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameter_counts(quick):
    _, _, report = quick
    stats = report.data["stats"]
    assert stats[UNGUIDED]["params"] < stats[GUIDED]["params"]       # attention and semantic modules removed
    assert all(stats[k]["params"] > 0 for k in (GUIDED, UNGUIDED, UNET))


def test_verdict_follows_the_checks(quick):
    _, args, report = quick
    passes = [c["pass"] for c in report.data["checks"].values()]
    assert len(passes) == (4 if args.source == "mni" else 2)
    assert report.verdict == ("holds" if all(passes) else "partly" if any(passes) else "does not hold")


def test_the_default_budget_matches_the_sizes():
    from attnlab.models.msga import MSGA
    from attnlab.models.unet import UNet
    _, args = claim_args("msga")
    guided = sum(p.numel() for p in MSGA(1, 3, args.dim).parameters())
    unet = sum(p.numel() for p in UNet(1, 3, args.unet_base).parameters())
    assert abs(unet / guided - 1) < 0.05                              # "a U-Net of about equal size"


def test_resolution_ceiling_is_one_at_full_resolution_and_loses_thin_structures():
    from attnlab.arena.claims.msga import resolution_ceiling
    from attnlab.tasks import create_task
    task = create_task("mni_slices", source="shapes", size=32)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 8:24, 8:24] = 1                      # a 16 x 16 block: survives 4x pooling exactly
    labels[0, 4, 2:30] = 2                         # a one-pixel line: lost at 1/4
    t = {"labels": labels}
    assert resolution_ceiling(task, t, factor=1) == 1.0
    low = resolution_ceiling(task, t, factor=4)
    # class 1 kept (Dice ~1, its edges blurred by the bilinear resize), the line gone (Dice 0), classes absent
    # from both count 1: the foreground mean is (1 + 0 + (K - 3)) / (K - 1)
    K = task.num_classes
    assert low == pytest.approx((K - 2) / (K - 1), abs=0.01)


def _stats(axial, held_rows, all_rows=None, std=0.002):
    """Made-up Dice per model (guided, unguided, U-Net) on the axial test and the coronal tests."""
    all_rows = all_rows or held_rows
    return {label: {"axial": {"dice": a, "std": std}, "coronal_held_out_rows": {"dice": h, "std": std},
                    "coronal": {"dice": c, "std": std}}
            for label, a, h, c in zip((GUIDED, UNGUIDED, UNET), axial, held_rows, all_rows)}


NAMES = ["axial", "coronal", "coronal_held_out_rows"]


@pytest.mark.parametrize("axial, held_rows, all_rows, verdict, passes", [
    ((0.80, 0.75, 0.70), (0.78, 0.72, 0.70), None, "holds", [True] * 4),
    # ahead of the unguided network but not of the U-Net: partly
    ((0.80, 0.75, 0.94), (0.78, 0.72, 0.92), None, "partly", [True, False, True, False]),
    # +0.5 pp is under the 1 pp margin: does not hold (the shape of the documented run)
    ((0.76, 0.755, 0.94), (0.73, 0.725, 0.92), None, "does not hold", [False] * 4),
    # ahead on every coronal row but not on the held-out rows: the check reads the held-out rows only
    ((0.80, 0.75, 0.70), (0.70, 0.72, 0.70), (0.90, 0.72, 0.70), "partly", [True, True, False, False]),
])
def test_judge_on_made_up_runs(axial, held_rows, all_rows, verdict, passes):
    checks, got = judge(_stats(axial, held_rows, all_rows), NAMES, 0.01)
    assert [ok for *_, ok in checks] == passes and got == verdict
    assert all("coronal_held_out_rows" in n or "axial" in n for n, *_ in checks)


def test_judge_uses_the_seed_spread_and_skips_absent_tests():
    lead = _stats((0.80, 0.78, 0.70), (0.80, 0.78, 0.70))
    assert [ok for *_, ok in judge(lead, NAMES, 0.01)[0]] == [True, True, True, True]
    noisy = _stats((0.80, 0.78, 0.70), (0.80, 0.78, 0.70), std=0.02)
    assert [ok for *_, ok in judge(noisy, NAMES, 0.01)[0]] == [False, True, False, True]
    checks, verdict = judge(lead, ["axial"], 0.01)                 # the shapes source: no coronal tests
    assert len(checks) == 2 and verdict == "holds"
