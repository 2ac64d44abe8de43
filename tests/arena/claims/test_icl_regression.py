import argparse
import json
import math

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.icl_regression import SoftmaxICLAttention, head_patterns
from attnlab.tasks import create_task
from attnlab.tasks.icl_regression import gd_statistic


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["icl_regression", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    assert (out / "icl_regression_curves.png").stat().st_size > 1000
    return (out / "icl_regression.md").read_text(), json.loads((out / "icl_regression.json").read_text())


def test_quick_run_writes_the_tables_with_finite_numbers(quick_run):
    page, record = quick_run
    for caption in ("Query MSE vs context length", "Circuits of the H=4 model", "Checks", "Diagnostics"):
        assert caption in page
    assert record["verdict"] in claims.VERDICTS
    errors = record["data"]["errors"]
    assert set(errors) == {"10", "40", "80"}
    for row in errors.values():
        assert set(row) >= {"H=1", "H=2", "H=4", "gd", "ridge", "ols", "zero"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
    assert "![icl_regression_curves](icl_regression_curves.png)" in page and "**Budget.**" in page
    curves = record["data"]["curves"]
    assert set(curves) == {"H=1", "H=2", "H=4"}
    for curve in curves.values():
        assert curve[0][0] == 0 and curve[-1][0] == 150 and all(math.isfinite(v) for _, v in curve)
    assert curves["H=4"][-1][1] < curves["H=4"][0][1]              # the curve goes down
    pat = record["data"]["patterns"]
    assert len(pat["omega"]) == 4 and all(math.isfinite(v) for v in pat["mu"])


def test_quick_run_learns_something_and_ridge_beats_ols(quick_run):
    errors = quick_run[1]["data"]["errors"]
    assert errors["40"]["H=4"] < 0.8 * errors["40"]["zero"]      # the trained model beats predicting 0
    assert errors["10"]["ridge"] < errors["10"]["ols"]           # Bayes-optimal ridge beats OLS at small n


def test_pattern_metrics_on_an_ideal_circuit():
    d, H = 3, 2
    kq = torch.zeros(H, d + 1, d + 1)
    kq[0, :d, :d], kq[1, :d, :d] = 0.5 * torch.eye(d), -0.5 * torch.eye(d)
    ov = torch.zeros(H, d + 1)
    ov[0, d], ov[1, d] = 2.0, -2.0
    pat = head_patterns(kq, ov)
    assert pat["offdiag_ratio_weighted"] == pytest.approx(0) and pat["diag_cv_weighted"] == pytest.approx(0)
    assert pat["last_entry_frac_weighted"] == pytest.approx(1) and pat["zero_sum"] == pytest.approx(0)
    ov[1] = torch.tensor([1.0, 0.0, 0.0, 2.0])                   # x-entry in one head, no longer zero-sum
    kq[0, 0, 1] = 0.5
    pat = head_patterns(kq, ov)
    assert pat["last_entry_frac"][1] == pytest.approx(0.8) and pat["zero_sum"] == pytest.approx(1)
    assert pat["offdiag_ratio"][0] == pytest.approx(0.5 / math.sqrt(3 * 0.25))


def test_ideal_pair_of_heads_is_a_debiased_gd_step():
    """(omega, mu) and (-omega, -mu) heads: to first order y_hat = (sum mu omega / sqrt(d+1)) (1/n) sum y_i <x_i, x_q>."""
    d, omega, mu = 4, 0.05, 20.0
    model = SoftmaxICLAttention(d, 2)
    with torch.no_grad():
        x_only = torch.diag(torch.tensor([1.0] * d + [0.0]))
        model.Q.copy_(torch.stack([omega * torch.eye(d + 1), -omega * torch.eye(d + 1)]))
        model.K.copy_(torch.stack([x_only, x_only]))
        y_only = torch.zeros(d + 1, d + 1)
        y_only[d, d] = 1.0
        model.V.copy_(torch.stack([y_only, y_only]))
        model.O.zero_()
        model.O[0, d], model.O[1, d] = mu, -mu
    kq, ov = model.circuits()
    pat = head_patterns(kq, ov)
    assert pat["zero_sum"] == pytest.approx(0) and pat["last_entry_frac_weighted"] == pytest.approx(1)
    b = create_task("icl_regression", d=d, n=200).batch("val", 0, 256)
    with torch.no_grad():
        pred = model(b["inputs"])
    gd = pat["effective_gd_step"] * gd_statistic(b["inputs"])
    assert pat["effective_gd_step"] == pytest.approx(2 * mu * omega / math.sqrt(d + 1))
    assert torch.allclose(pred, gd, atol=0.05 * gd.abs().max().item()), (pred - gd).abs().max()


def test_model_rejects_bad_prompts():
    with pytest.raises(ValueError, match="prompts"):
        SoftmaxICLAttention(3, 2)(torch.zeros(2, 5, 3))
