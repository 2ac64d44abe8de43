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
