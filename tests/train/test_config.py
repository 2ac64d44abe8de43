"""TrainConfig's validation and the learning-rate schedule."""
from __future__ import annotations

import pytest

from attnlab.train import TrainConfig, lr_at


@pytest.mark.parametrize("change, error, words", [
    ({"steps": 0}, ValueError, "steps must be a positive int"),
    ({"steps": -5}, ValueError, "steps"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": -1e-3}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
    ({"layers": "mhsa"}, TypeError, "list of mechanism names"),
    ({"layers": []}, ValueError, "at least one"),
    ({"layers": [{"top_k": 2}]}, TypeError, "'name'"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"task_options": [1]}, TypeError, "task_options"),
])
def test_config_rejects_bad_values(tiny, change, error, words):
    with pytest.raises(error, match=words):
        TrainConfig(**{**tiny, **change})


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(3)] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lr_at(cfg, 9) == pytest.approx(1e-2)
    assert lr_at(cfg, 10) == pytest.approx(1e-2)
    assert lr_at(cfg, 55) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))          # halfway down the cosine
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    after = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
