"""`attnlab reproduce htr_jand --quick`: every row, the parameter ratio, finite numbers, the verdict rule."""
import argparse
import math

import pytest

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims.htr_jand import DISTILLED, MHSA, NONE, STUDENT, TEACHER


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("sklearn")
    claim = get_claim("htr_jand")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "htr_jand", True, 0, tmp_path_factory.mktemp("htr_jand")
    return claim, args, claim.run(args)


def test_quick_report_has_every_model_with_finite_numbers(quick):
    claim, args, report = quick
    labels = [row[0] for row in report.tables[0].rows]
    assert labels[:5] == [TEACHER, STUDENT, DISTILLED, MHSA, NONE]
    assert labels[5] == "reference: all-blank decoder" and labels[6].startswith("reference: best of 8 constant strings")
    for label in labels[:5]:
        for r in report.data["runs"][label]:
            assert 0.0 <= r["test_cer"] and math.isfinite(r["test_wer"]) and r["curve"][0][0] == 0
    page = render(claim, report, "attnlab reproduce htr_jand --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "NOT comparable" in page and "| IAM | 1.23 |" in page
    assert report.figures[0].is_file() and report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameter_counts(quick):
    _, _, report = quick
    stats = report.data["stats"]
    assert 0.4 <= stats[STUDENT]["params"] / stats[TEACHER]["params"] <= 0.6
    assert stats[STUDENT]["params"] == stats[DISTILLED]["params"]               # the same network
    assert stats[NONE]["params"] < stats[MHSA]["params"] < stats[STUDENT]["params"]   # attention weights removed


def test_verdict_follows_the_checks(quick):
    _, _, report = quick
    passes = [c["pass"] for c in report.data["checks"].values()]
    assert len(passes) == 4
    assert report.verdict == ("holds" if all(passes) else "partly" if any(passes) else "does not hold")
