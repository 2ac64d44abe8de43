"""Shared set-up of the image-classification claims (minimal, moh): task choice and test split."""
from __future__ import annotations

import argparse

from attnlab.arena.tasks import create_task

IMAGE_TASKS = {"fashion_mnist": 7, "digits": 2}     # task -> default patch side (16 tokens either way)


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
