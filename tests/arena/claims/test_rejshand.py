"""`attnlab reproduce rejshand --quick`: every row, matched parameters, finite numbers, the verdict rule."""
import math

import pytest

from attnlab.arena.claims import claim_args, render
from attnlab.arena.claims.rejshand import COORD, FEATURECHAT, MLP, NO_ATTN, NO_CONV, NO_SKIP, PLAIN


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("safetensors")
    claim, args = claim_args("rejshand", quick=True, out=tmp_path_factory.mktemp("rejshand"))
    return claim, args, claim.run(args)


def test_quick_report_has_every_model_with_finite_numbers(quick):
    claim, args, report = quick
    labels = [row[0] for row in report.tables[0].rows]
    assert labels == [FEATURECHAT, COORD, NO_ATTN, NO_CONV, NO_SKIP, MLP, PLAIN, "reference: mean training pose"]
    for label in labels[:-1]:
        for r in report.data["runs"][label]:
            assert math.isfinite(r["test_mpjpe"]) and 0 <= r["test_pa_mpjpe"] <= r["test_mpjpe"]
            assert r["curve"][0][0] == 0
    page = render(claim, report, "attnlab reproduce rejshand --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "NOT comparable" in page and "| FreiHAND PA-MPJPE | 6.3 mm |" in page
    assert report.figures[0].is_file() and report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameter_counts(quick):
    _, _, report = quick
    stats = report.data["stats"]
    assert abs(stats[MLP]["params"] - stats[FEATURECHAT]["params"]) / stats[FEATURECHAT]["params"] < 0.02
    assert stats[NO_ATTN]["params"] < stats[NO_CONV]["params"] < stats[FEATURECHAT]["params"] < stats[COORD]["params"]
    assert stats[NO_SKIP]["params"] == stats[FEATURECHAT]["params"]


def test_verdict_follows_the_checks(quick):
    _, _, report = quick
    passes = [c["pass"] for c in report.data["checks"].values()]
    assert len(passes) == 5
    assert report.verdict == ("holds" if all(passes) else "partly" if any(passes) else "does not hold")


def _made_up(mpjpe_by_label):
    """Runs with given per-seed test MPJPEs (mm) and flat curves, as run_one returns them."""
    return {label: [{"seed": i, "params": 1000, "test_mpjpe": v, "test_pa_mpjpe": v / 2,
                     "curve": [(0, 90.0), (10, v), (20, v)], "train_seconds": 1.0, "cpu_seconds": 1.0}
                    for i, v in enumerate(values)] for label, values in mpjpe_by_label.items()}


@pytest.mark.parametrize("featurechat,coord,verdict,passes", [
    ([20.0, 20.2], [18.0, 18.1], "holds", [True] * 5),
    ([20.0, 20.2], [20.5, 20.6], "partly", [True, True, True, True, False]),     # coordinate attention 0.45 mm worse
    ([90.0, 90.0], [95.0, 95.0], "does not hold", [False] * 5),
])
def test_checks_on_made_up_runs(tmp_path, featurechat, coord, verdict, passes):
    """The verdict from known outcomes: lower MPJPE by more than max(spread, 1 mm) passes, in every check."""
    from attnlab.arena.claims import claim_args
    from attnlab.arena.claims.rejshand import _report
    _, args = claim_args("rejshand", out=tmp_path)
    runs = _made_up({FEATURECHAT: featurechat, COORD: coord, NO_ATTN: [60.0, 61.0], NO_CONV: [25.0, 25.0],
                     NO_SKIP: [40.0, 41.0], MLP: [30.0, 30.5], PLAIN: [19.0, 19.0]})
    references = {0: {"mpjpe": 90.0, "pa_mpjpe": 40.0}, 1: {"mpjpe": 90.0, "pa_mpjpe": 40.0}}
    report = _report(args, runs, references, [0, 1], [])
    assert [c["pass"] for c in report.data["checks"].values()] == passes
    assert report.verdict == verdict
