import math

import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks.icl_regression import gd_statistic, ols_predict, query_mse, ridge_predict


def test_registered_as_regression():
    cls = get_task("icl_regression")
    assert cls.kind == "regress" and cls.quality == "mse" and not cls.higher_is_better
    assert "icl_regression" in [t.name for t in list_tasks()]


def test_prompt_structure():
    task = create_task("icl_regression", seed=1, d=3, n=7, noise=0.0)
    b = task.batch("train", 0, 16)
    z, y, w = b["inputs"], b["targets"], b["weights"]
    assert z.shape == (16, 8, 4) and y.shape == (16,) and w.shape == (16, 3) and task.seq_len == 8
    assert torch.all(z[:, -1, -1] == 0)                                          # query label hidden
    # noiseless: every context label and the target are exactly <w, x>
    assert torch.allclose(z[:, :-1, -1], torch.einsum("bnd,bd->bn", z[:, :-1, :-1], w), atol=1e-5)
    assert torch.allclose(y, torch.einsum("bd,bd->b", z[:, -1, :-1], w), atol=1e-5)


def test_noise_and_prior_scale():
    task = create_task("icl_regression", d=4, n=5, noise=0.5)
    b = task.batch("train", 0, 4096)
    resid = b["inputs"][:, :-1, -1] - torch.einsum("bnd,bd->bn", b["inputs"][:, :-1, :-1], b["weights"])
    assert resid.std().item() == pytest.approx(0.5, rel=0.05)
    assert b["weights"].var().item() == pytest.approx(1 / 4, rel=0.1)               # w ~ N(0, I/d)
    assert task.ridge_lambda == pytest.approx(0.25 * 4)


def test_deterministic_and_length_override():
    task = create_task("icl_regression", seed=2)
    a, b = task.batch("val", 3, 8), task.batch("val", 3, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("val", 4, 8)["inputs"])
    assert not torch.equal(a["inputs"], create_task("icl_regression", seed=3).batch("val", 3, 8)["inputs"])
    assert task.batch("val", 0, 8, n=100)["inputs"].shape == (8, 101, 6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="d must"):
        create_task("icl_regression", d=0)
    with pytest.raises(ValueError, match="noise"):
        create_task("icl_regression", noise=-1.0)
    with pytest.raises(ValueError, match="noise"):
        create_task("icl_regression", noise=float("nan"))
    with pytest.raises(ValueError, match="context length"):
        create_task("icl_regression").batch("train", 0, 4, n=0)
    with pytest.raises(ValueError, match="one prediction per example"):
        query_mse(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="prompts"):
        ridge_predict(torch.zeros(4, 5), 1.0)


def test_baselines_ridge_beats_ols_at_small_n_and_recovers_w():
    task = create_task("icl_regression", d=5, n=8)
    b = task.batch("val", 0, 4096)
    ridge = query_mse(ridge_predict(b["inputs"], task.ridge_lambda), b["targets"])[1]["mse"]
    ols = query_mse(ols_predict(b["inputs"]), b["targets"])[1]["mse"]
    zero = query_mse(torch.zeros_like(b["targets"]), b["targets"])[1]["mse"]
    assert ridge < ols < zero, (ridge, ols, zero)
    clean = create_task("icl_regression", d=3, n=20, noise=0.0).batch("val", 0, 64)
    assert torch.allclose(ols_predict(clean["inputs"]), clean["targets"], atol=1e-4)
    s = gd_statistic(clean["inputs"])                                    # (1/n) sum y_i <x_i, x_q> ~ <w, x_q>
    assert torch.corrcoef(torch.stack([s, clean["targets"]]))[0, 1] > 0.6


def test_library_model_reads_the_query_token():
    torch.manual_seed(0)
    task = create_task("icl_regression", d=2, n=6)
    model = task.build_model(dim=16, num_heads=2, layers=1)
    b = task.batch("train", 0, 8)
    loss, metrics = task.loss(model, b)
    assert math.isfinite(metrics["mse"]) and metrics["mse"] == metrics["loss"]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # no positions: permuting the context pairs leaves the prediction unchanged
    perm = torch.cat([torch.randperm(6), torch.tensor([6])])
    with torch.no_grad():
        assert torch.allclose(model(b["inputs"]), model(b["inputs"][:, perm]), atol=1e-5)
