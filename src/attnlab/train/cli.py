"""`attnlab train`: the command line over `attnlab.train.train`.

    attnlab train --task assoc_recall --layers mhsa,moh --dim 64 --steps 1000 --out runs/mqar
    attnlab train --resume runs/mqar                   # continue after Ctrl-C / SIGTERM / a crash
    attnlab train --resume runs/mqar --steps 2000      # or train further
    torchrun --nproc_per_node=2 -m attnlab train --task assoc_recall --layers mhsa,mhsa --out runs/ddp

Exit codes: 0 done, 2 bad input or a diverged loss, 130/143 stopped by SIGINT/SIGTERM (resumable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from attnlab._args import key_value
from attnlab.train.checkpoint import load_config
from attnlab.train.config import TrainConfig, parse_layers
from attnlab.train.loop import TrainInterrupted, train

_FLAGS: dict[str, tuple[Any, str]] = {   # TrainConfig field -> (argparse type, help)
    "task": (str, "task name (see attnlab.tasks.list_tasks(); default assoc_recall)"),
    "layers": (parse_layers, "one mechanism per block: 'mhsa,moh,mhsa' or a JSON list with per-layer options "
                             "'[{\"name\": \"moh\", \"top_k\": 2}, \"mhsa\"]' (default mhsa,mhsa)"),
    "dim": (int, "model width (default 64)"),
    "num_heads": (int, "attention heads (default 4)"),
    "mlp_ratio": (float, "MLP hidden width / dim; 0 = no MLP (default 4)"),
    "steps": (int, "optimizer steps in total (default 1000)"),
    "batch_size": (int, "global batch size, split over processes (default 64)"),
    "lr": (float, "peak learning rate (default 3e-3)"),
    "min_lr_ratio": (float, "final lr / peak lr of the cosine schedule (default 0.1)"),
    "warmup": (int, "linear warm-up steps (default 50)"),
    "weight_decay": (float, "AdamW weight decay on weight matrices (default 0.01)"),
    "grad_clip": (float, "gradient norm clip; 0 = off (default 1.0)"),
    "aux_weight": (float, "coefficient of the model's aux_loss, e.g. MoH load balance (default 0.01)"),
    "eval_every": (int, "steps between validation evals (default 100)"),
    "eval_batches": (int, "validation batches per eval (default 4)"),
    "eval_batch_size": (int, "validation batch size (default 64)"),
    "log_every": (int, "steps between train-metric lines in metrics.jsonl (default 10)"),
    "checkpoint_every": (int, "steps between checkpoints; 0 = only at the end and on a signal (default 200)"),
    "seed": (int, "seed of the initial weights and of the task's data unless --task-option seed=... (default 0)"),
    "device": (str, "cpu, cuda or auto (default cpu)"),
    "threads": (int, "torch intra-op threads (default: torch's choice)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (kind, help_text) in _FLAGS.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--heads"] if name == "num_heads" else [])
        parser.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--task-option", dest="task_option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="a task constructor option, e.g. num_pairs=8 (repeatable)")
    parser.add_argument("--block-option", dest="block_option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="a Block option for every layer, e.g. drop=0.1 (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/TASK-TIMESTAMP; with --resume, the resumed folder)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its latest checkpoint (other flags: only --steps "
                             "and --checkpoint-every may differ from the saved config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given, over the resumed run's config with --resume, over TrainConfig's defaults otherwise."""
    given = {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}
    if args.resume is not None:
        base = load_config(args.resume).to_dict()
        task_options = {**base["task_options"], **dict(args.task_option)}
        block_options = {**base["block_options"], **dict(args.block_option)}
        return TrainConfig.from_dict({**base, **given, "task_options": task_options, "block_options": block_options})
    return TrainConfig(**given, task_options=dict(args.task_option), block_options=dict(args.block_option))


def main(args: argparse.Namespace) -> int:
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0   # who reports
    try:
        config = config_from_args(args)
        out = args.out
        if out is None and args.resume is None:
            out = Path("runs") / f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(config, out, resume=args.resume, progress=not args.no_progress)
    except TrainInterrupted as e:
        if rank == 0:
            again = f"; continue with: attnlab train --resume {e.out_dir}" if e.checkpoint else ""
            print(f"attnlab train: {e}{again}", file=sys.stderr)
        return e.exit_code
    except (ValueError, TypeError, FloatingPointError) as e:
        if rank == 0:
            print(f"attnlab train: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.final.items())
        where = f"; wrote {result.out_dir}" if result.out_dir else ""
        print(f"attnlab train: {config.task} {config.layers}: {result.params:,} params, step {config.steps}: "
              f"{shown}; {result.tokens_per_s:,.0f} tokens/s{where}", file=sys.stderr)
    return 0
