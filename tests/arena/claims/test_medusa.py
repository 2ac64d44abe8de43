"""`attnlab reproduce medusa --quick`: every model, its parameter counts, finite numbers, the verdict rule."""
import math

import pytest

from attnlab.arena.claims import claim_args, render
from attnlab.arena.claims.medusa import BARE, ISOLATED, MEDUSA, VARIANTS, WIDE, judge
from attnlab.tasks.fashion_mnist import find_root


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    try:
        find_root()
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    claim, args = claim_args("medusa", quick=True, out=tmp_path_factory.mktemp("medusa"))
    return claim, args, claim.run(args)


def test_quick_report_has_every_model_with_finite_numbers(quick):
    claim, args, report = quick
    assert [row[0] for row in report.tables[0].rows] == list(VARIANTS)
    for label in VARIANTS:
        runs = report.data["runs"][label]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"]) and r["curve"]
    page = render(claim, report, "attnlab reproduce medusa --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "Not comparable" in page and "reconstruction" in page
    assert report.figures[0].is_file() and report.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameter_counts(quick):
    _, _, report = quick
    first = {label: report.data["runs"][label][0] for label in VARIANTS}
    assert first[BARE]["attention_params"] == 0 == first[WIDE]["attention_params"]
    assert first[MEDUSA]["params"] - first[MEDUSA]["attention_params"] == first[BARE]["params"]
    for other in (ISOLATED, WIDE):          # sized to MEDUSA's parameter count, within 5%
        assert abs(first[other]["params"] / first[MEDUSA]["params"] - 1) < 0.05


def test_verdict_follows_the_rule(quick):
    _, _, report = quick
    beats = {row[0]: row[3] == "yes" for row in report.tables[1].rows}
    assert set(beats) == {ISOLATED, BARE, WIDE}
    expected = "holds" if all(beats.values()) else "partly" if beats[BARE] else "does not hold"
    assert report.verdict == expected


@pytest.mark.parametrize("medusa,isolated,bare,wide,verdict", [
    ([0.90, 0.91, 0.92], [0.85, 0.86, 0.87], [0.85, 0.86, 0.87], [0.85, 0.86, 0.87], "holds"),
    ([0.90, 0.91, 0.92], [0.91, 0.92, 0.93], [0.85, 0.86, 0.87], [0.91, 0.91, 0.91], "partly"),
    ([0.90, 0.91, 0.92], [0.85, 0.86, 0.87], [0.90, 0.91, 0.92], [0.85, 0.86, 0.87], "does not hold"),
    # ahead by 1 pp on the means, but the seeds spread by more: not "beats"
    ([0.86, 0.90, 0.94], [0.85, 0.89, 0.93], [0.85, 0.89, 0.93], [0.85, 0.89, 0.93], "does not hold"),
    # one seed each: the 0.2 pp floor decides
    ([0.871], [0.870], [0.868], [0.868], "partly"),
])
def test_judge_on_made_up_accuracies(medusa, isolated, bare, wide, verdict):
    got, comparisons = judge({MEDUSA: medusa, ISOLATED: isolated, BARE: bare, WIDE: wide})
    assert got == verdict
    assert comparisons[BARE]["gap"] == pytest.approx(sum(medusa) / len(medusa) - sum(bare) / len(bare))
