"""`attnlab train`: train a task's model built from any mix of mechanisms, resumably, on 1..N processes.

    from attnlab.train import TrainConfig, train
    result = train(TrainConfig(task="assoc_recall", layers=["mhsa", "moh"], steps=200), "runs/x")
"""
from attnlab.train.loop import (CheckpointError, TrainConfig, TrainInterrupted, TrainResult, add_arguments,
                                config_from_args, find_checkpoint, load_config, load_weights, lr_at, main,
                                parse_layers, parse_value, save_checkpoint, train)

__all__ = ["CheckpointError", "TrainConfig", "TrainInterrupted", "TrainResult", "add_arguments", "config_from_args",
           "find_checkpoint", "load_config", "load_weights", "lr_at", "main", "parse_layers", "parse_value",
           "save_checkpoint", "train"]
