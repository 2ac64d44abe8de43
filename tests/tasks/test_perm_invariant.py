import math

import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks.perm_invariant import TARGETS


def test_registered_as_a_regression_task():
    cls = get_task("perm_invariant")
    assert cls.kind == "regress" and cls.quality == "mse" and not cls.higher_is_better
    assert "perm_invariant" in [t.name for t in list_tasks()]
    task = create_task("perm_invariant", seed=2, target="keys_quad", d=5, N=3)
    assert task.options() == {"seed": 2, "target": "keys_quad", "d": 5, "N": 3} and task.seq_len == 4


def test_batches_are_deterministic_distinct_and_on_the_sphere():
    task = create_task("perm_invariant", seed=3, d=6, N=5)
    a, b = task.batch("train", 4, 32), task.batch("train", 4, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["inputs"].shape == (32, 6, 6) and a["targets"].shape == (32,)
    assert not torch.equal(a["inputs"], task.batch("train", 5, 32)["inputs"])
    assert not torch.equal(a["inputs"], task.batch("val", 4, 32)["inputs"])
    assert not torch.equal(a["inputs"], create_task("perm_invariant", seed=4, d=6, N=5).batch("train", 4, 32)["inputs"])
    norms = a["inputs"].norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(6)), atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_targets_are_standardised_and_invariant_to_key_order(target):
    task = create_task("perm_invariant", target=target, d=6, N=5)
    b = task.batch("val", 0, 4096)
    y = b["targets"]
    assert torch.isfinite(y).all()
    assert abs(float(y.mean())) < 0.1 and 0.85 < float(y.var()) < 1.15
    x = b["inputs"][:64]
    perm = torch.tensor([3, 0, 4, 2, 1, 5])                       # shuffle the keys, keep the query last
    assert torch.allclose(task.target_fn(x[:, perm]), y[:64], atol=1e-5)
    other_key = x.clone()
    other_key[:, 0] = -x[:, -1]                                   # a different key changes the value
    assert not torch.allclose(task.target_fn(other_key), y[:64], atol=1e-2)
    if target != "keys_quad":                                     # every other target reads the query
        other_query = torch.cat([x[:, :-1], -x[:, 1:2]], dim=1)
        assert not torch.allclose(task.target_fn(other_query), y[:64], atol=1e-2)


def test_inner_quad_is_the_averaged_hermite_of_the_inner_products():
    task = create_task("perm_invariant", target="inner_quad", d=7, N=4)
    x = task.batch("train", 0, 16)["inputs"].double()
    t = torch.einsum("bnd,bd->bn", x[:, :-1], x[:, -1]) / math.sqrt(7)
    raw = (t ** 2 - 1).mean(1)
    assert torch.allclose(task.target_fn(x), (raw - task.offset) / task.scale, atol=1e-10)
    assert abs(task.offset) < 0.05                                # E[t^2] = 1 exactly on the sphere


def test_model_and_loss_run():
    torch.manual_seed(0)
    task = create_task("perm_invariant", d=4, N=3)
    model = task.build_model(dim=16, num_heads=2, layers=1)
    loss, metrics = task.loss(model, task.batch("train", 0, 8))
    loss.backward()
    assert math.isfinite(metrics["mse"]) and metrics["mse"] == metrics["loss"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_options_and_inputs_raise():
    with pytest.raises(ValueError, match="target must be one of"):
        create_task("perm_invariant", target="max")
    with pytest.raises(ValueError, match="d must be"):
        create_task("perm_invariant", d=1)
    with pytest.raises(ValueError, match="N must be"):
        create_task("perm_invariant", N=0)
    with pytest.raises(TypeError, match="options"):
        create_task("perm_invariant", keys=3)
    task = create_task("perm_invariant", d=4, N=3)
    with pytest.raises(ValueError, match="batch_size"):
        task.batch("train", 0, 0)
    with pytest.raises(ValueError, match="split"):
        task.batch("test", 0, 2)
    with pytest.raises(ValueError, match=r"\(B, N \+ 1, d\)"):
        task.target_fn(torch.zeros(2, 3, 4))
