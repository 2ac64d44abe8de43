"""`attnlab reproduce softpag --quick`: every row, finite numbers, the search's bookkeeping, the figures;
the Frechet distance against closed forms."""
import argparse
import math

import pytest
import torch

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims import softpag
from attnlab.tasks import fashion_mnist as fm

try:
    fm.find_root()
    REAL = True
except FileNotFoundError:
    REAL = False


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not REAL:
        pytest.skip(f"Fashion-MNIST not installed in {fm.SYSTEM_ROOT}")
    claim = get_claim("softpag")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "softpag", True, 0, tmp_path_factory.mktemp("softpag")
    return claim, args, claim.run(args)


def test_quick_report_has_every_row_with_finite_numbers(quick):
    claim, args, report = quick
    labels = [row[0] for row in report.tables[0].rows]
    best = report.data["best_layer"]
    assert labels == ["no guidance", "CFG, s = 3", "PAG, layer 0", "PAG, layer 1", f"SoftPAG u = 0.5, layer {best}",
                      f"HeadHunter, {len(report.data['headhunter'])} heads", "HeadHunter + SoftPAG u = 0.5",
                      "reference: real training images"]
    for label, r in report.data["results"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["prob"] <= 1.0 and math.isfinite(r["fd"]), label
    assert report.data["results"]["no guidance"]["change"] == 0.0
    assert report.data["results"]["PAG, layer 0"]["change"] > 0
    # HeadHunter: 2 rounds of top 1 over the 2 x 2 heads = 4 + 3 objective calls, one new head per round
    hunt = report.data["search"]["hunt"]
    assert hunt["evaluations"] == 7 and len(report.data["headhunter"]) == 2
    assert len(report.data["search"]["validation"]) == 2
    assert report.verdict in ("holds", "partly", "does not hold")
    page = render(claim, report, "attnlab reproduce softpag --quick", 1.0)
    assert "| HeadHunter + SoftPAG u = 0.5 |" in page and f"Verdict: {report.verdict}" in page
    for name in ("softpag_samples.png", "softpag_sweep.png", "softpag_curves.png"):
        assert (args.out / name).stat().st_size > 0


def test_frechet_distance_against_closed_forms():
    d = 4
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    # equal covariances: only the means count
    assert softpag.frechet_distance((mu_a, eye), (mu_b, eye)) == pytest.approx(float((mu_b ** 2).sum()))
    # commuting (diagonal) covariances: sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0, 1.0],
                                                                                   dtype=torch.float64)
    want = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert softpag.frechet_distance((mu_a, torch.diag(a)), (mu_a, torch.diag(b))) == pytest.approx(want)
    # a rotation of both leaves it unchanged, and it is symmetric
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    sa, sb = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    assert softpag.frechet_distance((mu_a, sa), (mu_b @ q.T, sb)) == pytest.approx(want + float((mu_b ** 2).sum()))
    assert softpag.frechet_distance((mu_a, sb), (mu_a, sa)) == pytest.approx(want)
    x = torch.randn(200, d)
    assert softpag.frechet_distance(softpag.gaussian_stats(x), softpag.gaussian_stats(x)) == pytest.approx(0, abs=1e-6)


def test_bad_options_are_refused(tmp_path):
    parser = argparse.ArgumentParser()
    softpag.add_arguments(parser)
    args = parser.parse_args(["--us", "1.0"])
    args.quick, args.seed, args.out = False, 0, tmp_path
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        softpag.run(args)
