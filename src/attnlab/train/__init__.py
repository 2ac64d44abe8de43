"""`attnlab train`: train a task's model built from any mix of mechanisms, resumably, on 1..N processes.

    from attnlab.train import TrainConfig, train
    result = train(TrainConfig(task="assoc_recall", layers=["mhsa", "moh"], steps=200), "runs/x")

config: TrainConfig, the lr schedule; loop: train(); checkpoint: the checkpoint format;
metrics: metrics.jsonl and curves.png; distributed: torchrun; cli: the `attnlab train` command.
"""
from attnlab._args import parse_value
from attnlab.train.checkpoint import CheckpointError, find_checkpoint, load_config, load_weights, save_checkpoint
from attnlab.train.cli import add_arguments, config_from_args, main
from attnlab.train.config import TrainConfig, lr_at, parse_layers
from attnlab.train.loop import TrainInterrupted, TrainResult, train

__all__ = ["CheckpointError", "TrainConfig", "TrainInterrupted", "TrainResult", "add_arguments", "config_from_args",
           "find_checkpoint", "load_config", "load_weights", "lr_at", "main", "parse_layers", "parse_value",
           "save_checkpoint", "train"]
