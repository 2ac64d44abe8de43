"""TrainConfig's validation, the learning-rate schedule, layer lists."""
from __future__ import annotations

import argparse

import pytest

from attnlab.tasks import create_task
from attnlab.train import TrainConfig, lr_at, parse_layers
from attnlab.train.config import check_layers


@pytest.mark.parametrize("change, error, words", [
    ({"steps": 0}, ValueError, "steps must be a positive int"),
    ({"steps": -5}, ValueError, "steps"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": -1e-3}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
    ({"layers": "mhsa"}, TypeError, "list of mechanism names"),
    ({"layers": [{"top_k": 2}]}, TypeError, "'name'"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"task_options": [1]}, TypeError, "task_options"),
])
def test_config_rejects_bad_values(tiny, change, error, words):
    with pytest.raises(error, match=words):
        TrainConfig(**{**tiny, **change})


def test_config_round_trips_through_a_dict_and_names_its_differences(tiny):
    cfg = TrainConfig(**tiny)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.differences(TrainConfig(**{**tiny, "dim": 48})) == {"dim": (32, 48)}
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['dims'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "dims": 3})


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(3)] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lr_at(cfg, 9) == pytest.approx(1e-2)
    assert lr_at(cfg, 10) == pytest.approx(1e-2)
    assert lr_at(cfg, 55) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))          # halfway down the cosine
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    after = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_parse_layers_rejects_empty_names_and_broken_json():
    with pytest.raises(argparse.ArgumentTypeError, match="empty mechanism name"):
        parse_layers("mhsa,,moh")
    with pytest.raises(argparse.ArgumentTypeError, match="not a valid JSON list"):
        parse_layers('[{"name": "moh"')


def test_check_layers_wants_registered_and_causal_mechanisms():
    task = create_task("assoc_recall")
    check_layers(task, ["mhsa", {"name": "moh", "top_k": 2}])
    with pytest.raises(ValueError, match="did you mean 'mhsa'"):
        check_layers(task, ["mhsaa"])
    with pytest.raises(ValueError, match="no causal mode"):
        check_layers(task, ["infsa"])


def test_empty_layers_only_for_a_task_whose_model_takes_none():
    from attnlab.tasks import create_task
    from attnlab.train.config import check_layers, parse_layers
    cfg = TrainConfig(layers=[])                          # valid as a config; the task decides
    with pytest.raises(ValueError, match="at least one mechanism"):
        check_layers(create_task(cfg.task), cfg.layers)
    assert parse_layers("none") == []

    class NoAttention:
        name, causal = "baseline", False

        def accepts_no_layers(self):
            return True
    check_layers(NoAttention(), [])
