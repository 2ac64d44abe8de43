"""`attnlab reproduce lsfan --quick`: every row and metric, the page; ROCKET's kernels and features against
a naive per-kernel loop; the LOO ridge against scikit-learn's RidgeClassifierCV."""
import math

import numpy as np
import pytest
import torch

from attnlab.arena.claims import claim_args, render
from attnlab.arena.claims import lsfan
from attnlab.tasks.uea import find_files

try:
    find_files("BasicMotions"), find_files("JapaneseVowels")
    REAL = True
except FileNotFoundError:
    REAL = False


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not REAL:
        pytest.skip("the aeon wheel's UEA files are not installed (pip install --no-deps aeon)")
    claim, args = claim_args("lsfan", quick=True, out=tmp_path_factory.mktemp("lsfan"))
    return claim, args, claim.run(args)


def test_quick_report_rows_metrics_and_page(quick):
    claim, args, report = quick
    table = report.tables[0]
    assert [row[0] for row in table.rows] == list(lsfan.VARIANTS) + [lsfan.ROCKET_LABEL]
    assert len(table.headers) == 2 + 3 * 2
    for ds in ("BasicMotions", "JapaneseVowels"):
        for label, runs in report.data["runs"][ds].items():
            assert len(runs) == 2 and [r["seed"] for r in runs] == [0, 1]
            for r in runs:
                for key in ("test_accuracy", "test_macro_f1"):
                    assert 0.0 <= r[key] <= 1.0
                assert -1.0 <= r["test_mcc"] <= 1.0 and math.isfinite(r["cpu_seconds"])
    # L-SFAN TAP at BasicMotions' input: conv stack 1,620 + encoder layer (width 6, ff 6) + head 16*6*4 + 4
    tap = report.data["runs"]["BasicMotions"]["L-SFAN TAP (mhsa)"][0]["params"]
    assert tap == 1620 + (6 * 18 + 18 + 6 * 6 + 6) + 2 * (6 * 6 + 6) + 2 * 12 + (16 * 6 * 4 + 4)
    # params per dataset in the datasets' order: SAP's head reads 16 x T' (22 for BasicMotions, 4 for JapaneseVowels)
    sap = dict((row[0], row[1]) for row in table.rows)["SAP, no attention"]
    assert sap == f"{1620 + 16 * 22 * 4 + 4:,} / {1620 + 16 * 4 * 9 + 9:,}"
    page = render(claim, report, "attnlab reproduce lsfan --quick", 1.0)
    assert "| L-SFAN TAP (mhsa) |" in page and f"Verdict: {report.verdict}" in page and "Verdict rule" in page
    assert (args.out / "lsfan_curves.png").is_file()


def naive_rocket_feature(x: np.ndarray, k: dict) -> tuple[float, float]:
    """One kernel on one series x (S, T): zero padding, dilated dot products over the chosen channels."""
    S, T = x.shape
    l, d, pad = k["length"], k["dilation"], k["padding"]
    xp = np.zeros((S, T + 2 * pad))
    xp[:, pad:pad + T] = x
    outs = []
    for start in range(T + 2 * pad - (l - 1) * d):
        total = k["bias"]
        for ci, c in enumerate(k["channels"]):
            for j in range(l):
                total += k["weights"][ci, j] * xp[c, start + j * d]
        outs.append(total)
    outs = np.array(outs)
    return float((outs > 0).mean()), float(outs.max())


def test_rocket_kernels_follow_the_papers_distributions():
    kernels = lsfan.rocket_kernels(400, 6, 100, seed=0)
    assert {k["length"] for k in kernels} == {7, 9, 11}
    for k in kernels:
        l = k["length"]
        assert 1 <= len(k["channels"]) <= min(6, l) and len(set(k["channels"].tolist())) == len(k["channels"])
        assert abs(k["weights"].mean()) < 1e-12 and -1 <= k["bias"] <= 1
        assert 1 <= k["dilation"] <= (100 - 1) / (l - 1)
        assert k["padding"] in (0, (l - 1) * k["dilation"] // 2)
    assert {k["padding"] > 0 for k in kernels} == {True, False}
    assert max(k["dilation"] for k in kernels) > 4
    # the same seed draws the same kernels
    again = lsfan.rocket_kernels(400, 6, 100, seed=0)
    assert all(np.array_equal(a["weights"], b["weights"]) for a, b in zip(kernels, again))


def test_rocket_features_match_a_naive_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 5))                                          # (n, T, S)
    kernels = lsfan.rocket_kernels(12, 5, 40, seed=1)
    got = lsfan.rocket_features(torch.from_numpy(x), kernels).numpy()
    assert got.shape == (3, 24)
    for i in range(3):
        for j, k in enumerate(kernels):
            ppv, mx = naive_rocket_feature(x[i].T, k)
            assert got[i, 2 * j] == pytest.approx(ppv) and got[i, 2 * j + 1] == pytest.approx(mx)


@pytest.mark.parametrize("n,p,classes", [(40, 300, 4), (120, 30, 3), (60, 80, 2)])
def test_loo_ridge_matches_sklearn(n, p, classes):
    from sklearn.linear_model import RidgeClassifierCV
    rng = np.random.default_rng(n + p)
    centres = rng.normal(size=(classes, p))
    y = np.arange(n) % classes
    X = centres[y] + 2.0 * rng.normal(size=(n, p))
    X[:, 0] = 1.0                                                             # a constant feature (std 0)
    X_test = centres[np.arange(50) % classes] + 2.0 * rng.normal(size=(50, p))
    ours = lsfan.RidgeClassifierLOO().fit(X, y, classes)
    scale = np.where(X.std(0) > 0, X.std(0), 1.0)                             # StandardScaler(with_mean=False)
    ref = RidgeClassifierCV(alphas=lsfan.RIDGE_ALPHAS).fit(X / scale, y)
    assert ours.alpha == pytest.approx(ref.alpha_)
    np.testing.assert_array_equal(ours.predict(X_test), ref.predict(X_test / scale))
    ref_scores = ref.decision_function(X_test / scale)
    ours_scores = ours.decision_function(X_test)
    np.testing.assert_allclose(ours_scores.reshape(ref_scores.shape), ref_scores, rtol=1e-6, atol=1e-8)
