"""The tiny run every train test shares (dim 32, 40 steps of 16 sequences of 32 tokens), as config and flags.

`reference` is one uninterrupted in-process run of it, made once per session: what the resumed
and 2-process runs must reproduce.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.train import TrainConfig, train

TINY = dict(task="assoc_recall", task_options={"num_pairs": 8, "num_queries": 8, "num_keys": 16, "num_values": 16},
            layers=["mhsa", "moh"], dim=32, num_heads=4, mlp_ratio=2.0, steps=40, batch_size=16, lr=3e-3,
            warmup=5, eval_every=20, eval_batches=2, eval_batch_size=32, log_every=5, checkpoint_every=10,
            threads=1, block_options={"drop": 0.1})   # dropout: a resume must restore the RNG too
TINY_ARGS = ["--task", "assoc_recall", "--task-option", "num_pairs=8", "--task-option", "num_queries=8",
             "--task-option", "num_keys=16", "--task-option", "num_values=16", "--layers", "mhsa,moh",
             "--dim", "32", "--heads", "4", "--mlp-ratio", "2", "--steps", "40", "--batch-size", "16",
             "--lr", "3e-3", "--warmup", "5", "--eval-every", "20", "--eval-batches", "2",
             "--eval-batch-size", "32", "--log-every", "5", "--checkpoint-every", "10", "--threads", "1",
             "--block-option", "drop=0.1"]


@pytest.fixture
def tiny() -> dict:
    """TrainConfig(**tiny) is the tiny run."""
    return {**TINY, "task_options": dict(TINY["task_options"]), "block_options": dict(TINY["block_options"]),
            "layers": list(TINY["layers"])}


@pytest.fixture
def tiny_args() -> list[str]:
    """The tiny run's `attnlab train` flags."""
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Path, object]:
    """(output folder, TrainResult) of one uninterrupted run of the tiny config."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(TrainConfig(**TINY), out, progress=False)
