"""Shared set-up of the image-classification claims (minimal, moh): task choice, arguments, test
split and the seed summary."""
from __future__ import annotations

import argparse
import statistics

from attnlab.arena.tasks import create_task

IMAGE_TASKS = {"fashion_mnist": 7, "digits": 2}     # task -> default patch side (16 tokens either way)


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """--task and --patch, as both image claims take them."""
    p.add_argument("--task", choices=sorted(IMAGE_TASKS), default="fashion_mnist",
                   help="image task (fashion_mnist falls back to digits, with a note, if its data is missing)")
    p.add_argument("--patch", type=int, default=None, help="patch side (default: 7 for fashion_mnist, 2 for digits)")


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the spread over seeds)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def whole_test_split(task) -> tuple[int, int]:
    """(batches, batch_size) with batches * batch_size = the val (test) split's size, batch_size <= 1000."""
    n = task.num_examples("val")
    batch_size = max(d for d in range(1, min(n, 1000) + 1) if n % d == 0)
    return n // batch_size, batch_size


def image_task(args: argparse.Namespace, notes: list[str]) -> tuple[str, int]:
    """(task name, patch side) for a run: Fashion-MNIST falls back to digits, with a note, when
    its files are missing; --quick runs are noted as meaningless."""
    task_name = args.task
    if task_name == "fashion_mnist":
        try:
            create_task("fashion_mnist", patch=args.patch or IMAGE_TASKS["fashion_mnist"])
        except FileNotFoundError as e:
            notes.append(f"Fashion-MNIST is not installed ({e}); this run used the digits task instead.")
            task_name, args.patch = "digits", None
    if args.quick:
        notes.append("--quick: a smoke run on digits with a tiny model; its numbers mean nothing.")
    return task_name, args.patch or IMAGE_TASKS[task_name]
