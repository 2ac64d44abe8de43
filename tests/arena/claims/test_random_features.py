import argparse
import json
import math

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.random_features import attention_features, mlp_features, ridge_errors
from attnlab.tasks.perm_invariant import TARGETS, sphere


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rf")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["random_features", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    assert (out / "random_features_curves.png").stat().st_size > 1000
    return (out / "random_features.md").read_text(), json.loads((out / "random_features.json").read_text())


def test_quick_run_writes_every_table_with_finite_numbers(quick_run):
    page, record = quick_run
    for t in TARGETS:
        assert f"target {t}: normalised test error" in page
    assert "samples to reach" in page and "(c) query-key mean" in page
    assert "![random_features_curves](random_features_curves.png)" in page and "**Budget.**" in page
    assert record["verdict"] in claims.VERDICTS
    data = record["data"]
    assert set(data["errors"]) == {"mu=0", "mu=1", "mlp"}
    for per_target in data["errors"].values():
        assert set(per_target) == set(TARGETS)
        for errs in per_target.values():
            assert len(errs) == len(data["sizes"]) and all(math.isfinite(e) and e >= 0 for e in errs)
    assert data["seeds"] == 2 and len(data["errors_per_seed"]) == 2
    (curve, _) = data["curves"]["RF attention, mu=0"]
    assert [x for x, _ in curve] == [math.log2(n) for n in data["sizes"]]


def test_attention_beats_the_mlp_and_the_mean_helps_inner_product_targets(quick_run):
    errors = quick_run[1]["data"]["errors"]
    assert errors["mu=0"]["keys_quad"][-1] < 0.7 * errors["mlp"]["keys_quad"][-1]
    assert errors["mu=1"]["inner_relu"][-1] < 0.5 * errors["mu=0"]["inner_relu"][-1]


def test_attention_features_are_the_papers_sum_over_keys():
    d, N, M = 3, 4, 5
    x = sphere((2, N + 1), d, torch.Generator().manual_seed(0))                  # (2, N + 1, d)
    feats = attention_features(x, M, qk_mean=0.7, seed=11)                       # (2, M (d + 1))
    from attnlab.mechanisms.random_features import RandomFeatureAttention
    W = RandomFeatureAttention(d + 1, M, qk_mean=0.7, seed=11).qk_weight.double()   # (M, d+1, d+1)
    tok = torch.cat([x.double(), torch.ones(2, N + 1, 1, dtype=torch.float64)], -1)
    q, keys = tok[:, -1], tok[:, :-1]
    scores = torch.einsum("bc,mcd,bnd->bmn", q, W, keys)                         # x~_0^T W_m x~_i (scale 1)
    expected = torch.einsum("bmn,bnc->bmc", torch.relu(scores), keys) / N        # (2, M, d + 1)
    assert torch.allclose(feats, expected.reshape(2, -1), atol=1e-5)
    assert mlp_features(x, 7, seed=0).shape == (2, 7)


def test_ridge_recovers_a_linear_target_and_not_noise():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(600, 20, generator=g, dtype=torch.float64)
    w = torch.randn(20, generator=g, dtype=torch.float64)
    Y = torch.stack([F @ w, torch.randn(600, generator=g, dtype=torch.float64)], 1)   # (600, 2)
    for n in (100, 300):                                          # n > P: the covariance form
        err, _ = ridge_errors(F[:n], Y[:n], F[300:400], Y[300:400], F[400:], Y[400:])
        assert err[0] < 1e-3 and err[1] > 0.9
    err, _ = ridge_errors(F[:10], Y[:10], F[300:400], Y[300:400], F[400:], Y[400:])   # n < P: the kernel form
    assert torch.isfinite(err).all() and err[1] > 0.9
