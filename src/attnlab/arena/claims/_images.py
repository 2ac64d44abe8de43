"""Shared set-up of the image-classification claims (minimal, moh): task choice, arguments, test
split, the seed summary, training with a reloadable model, the linear-classifier reference trained
in the same run, and the learning-curve figure with its budget sentence."""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from attnlab.arena.claims._curves import curve_figure, flattening, mean_curve
from attnlab.tasks import create_task
from attnlab.train import TrainConfig, TrainResult, find_checkpoint, lr_at, train

IMAGE_TASKS = {"fashion_mnist": 7, "digits": 2}     # task -> default patch side (16 tokens either way)
CURVE_IMAGES = 2000                                  # test images behind each point of the learning curves


def add_image_arguments(p: argparse.ArgumentParser, *, steps: int) -> None:
    """The options both image claims take: the task, the model's size and the training budget."""
    p.add_argument("--task", choices=sorted(IMAGE_TASKS), default="fashion_mnist",
                   help="image task (fashion_mnist falls back to digits, with a note, if its data is missing)")
    p.add_argument("--patch", type=int, default=None, help="patch side (default: 7 for fashion_mnist, 2 for digits)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP width of the standard blocks, times dim")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr: warm-up, then cosine to 10%%")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3, help="seeds per model: --seed, --seed + 1, ...")
    p.add_argument("--curve-points", type=int, default=10, help="evaluations along training (learning curves)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def prepare_run(args: argparse.Namespace) -> None:
    """--quick's few-second settings (the same code path), the checks, the thread count."""
    if args.quick:
        args.task, args.dim, args.layers, args.steps, args.batch_size, args.warmup = "digits", 16, 1, 6, 32, 2
        args.seeds = min(args.seeds, 2)
    if args.seeds < 1 or args.steps < 1 or args.layers < 1:
        raise ValueError(f"--seeds, --steps and --layers must be >= 1, got {args.seeds}, {args.steps}, {args.layers}")
    torch.set_num_threads(args.threads)


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread over seeds: the sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def difference_spread(a: list[float], b: list[float]) -> float:
    """Spread of mean(a) - mean(b) as the page reads it: sqrt(std_a^2 + std_b^2) over seeds.

    A difference of means smaller than this is inside the seeds' spread: a tie."""
    return math.hypot(mean_spread(a)[1], mean_spread(b)[1])


def whole_test_split(task) -> tuple[int, int]:
    """(batches, batch_size) with batches * batch_size = the val (test) split's size, batch_size <= 1000."""
    n = task.num_examples("val")
    batch_size = max(d for d in range(1, min(n, 1000) + 1) if n % d == 0)
    return n // batch_size, batch_size


def curve_split(task) -> tuple[int, int]:
    """(batches, batch_size) of the first test images used for the learning curves (the whole
    test split when it is smaller than CURVE_IMAGES)."""
    batches, batch_size = whole_test_split(task)
    return max(1, min(batches, CURVE_IMAGES // batch_size)), batch_size


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


def train_and_reload(config: TrainConfig, folder: str | Path):
    """Train `config` into `folder` with the arena trainer and rebuild the model from its final checkpoint
    (safetensors, never unpickled): (TrainResult, model in eval mode, task, seconds, CPU seconds). The
    rebuilt model must have the trained one's parameter count, so it is measured, not a fresh one."""
    from safetensors.torch import load_model
    start, cpu = time.perf_counter(), time.process_time()
    result: TrainResult = train(config, folder, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    checkpoint, _ = find_checkpoint(folder)
    task = create_task(config.task, **{"seed": config.seed, **config.task_options})
    model = task.build_model(config.dim, config.num_heads, config.layers, mlp_ratio=config.mlp_ratio,
                             **config.block_options)
    load_model(model, str(Path(checkpoint) / "model.safetensors"))
    model.eval()
    rebuilt = sum(p.numel() for p in model.parameters())
    if rebuilt != result.params:
        raise RuntimeError(f"the model rebuilt from {checkpoint} has {rebuilt:,} parameters, the trained one had "
                           f"{result.params:,} (task {config.task}, layers {config.layers}, block options "
                           f"{config.block_options})")
    return result, model, task, seconds, cpu


def train_and_load(config: TrainConfig):
    """Train `config` with the arena trainer; return (TrainResult, trained model, task, seconds, cpu seconds).

    The model comes back from the trainer's final checkpoint (in a temporary folder), checked
    against the trainer's last eval, so it can be measured on the whole test split afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="attnlab-claim-") as folder:
        result, model, task, seconds, cpu = train_and_reload(config, folder)
    # The reloaded weights must be the trained ones: the trainer's last eval is reproduced exactly.
    check = task.evaluate(model, batches=config.eval_batches, batch_size=config.eval_batch_size)
    if abs(check["accuracy"] - result.final["val_accuracy"]) > 1e-6:
        raise RuntimeError(f"reloaded model gives val accuracy {check['accuracy']}, the trainer reported "
                           f"{result.final['val_accuracy']}: the checkpoint is not the trained model")
    return result, model, task, seconds, cpu


def accuracy_curve(history: list[dict]) -> list[tuple[int, float]]:
    """(step, val accuracy) of a training history."""
    return [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]


def train_linear_reference(config: TrainConfig) -> dict:
    """A linear softmax classifier (logistic regression) on the standardised pixels of `config`'s task:
    the same training batches, AdamW (weight decay on the matrix), warm-up/cosine schedule, grad clip
    and steps as `config`, evaluated on the same curve images at the same steps, then on the whole
    test split. Returns accuracy, loss, params, curve and seconds."""
    start = time.perf_counter()
    task = create_task(config.task, **{"seed": config.seed, **config.task_options})
    torch.manual_seed(config.seed)
    model = nn.Sequential(nn.Flatten(1), nn.Linear(task.seq_len * task.patch * task.patch, task.num_classes))
    optimizer = torch.optim.AdamW([{"params": [model[1].weight], "weight_decay": config.weight_decay},
                                   {"params": [model[1].bias], "weight_decay": 0.0}], lr=config.lr)
    curve = []

    def point(step: int) -> None:
        m = task.evaluate(model, batches=config.eval_batches, batch_size=config.eval_batch_size)
        curve.append((step, m["accuracy"]))

    point(0)
    for step in range(config.steps):
        loss, _ = task.loss(model, task.batch("train", step, config.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            point(step + 1)
    batches, batch_size = whole_test_split(task)
    test = task.evaluate(model, batches=batches, batch_size=batch_size)
    return {"seed": config.seed, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "params": sum(p.numel() for p in model.parameters()), "curve": curve,
            "train_seconds": time.perf_counter() - start}


def curves_and_budget(out: Path, name: str, baseline: str, runs: dict[str, list[dict]], linear: list[dict], *,
                      steps: int, batch_size: int, train_size: int, task_name: str, curve_images: int,
                      baseline_test: tuple[float, float], linear_test: tuple[float, float], threads: int,
                      noun: str) -> tuple[Path, str]:
    """Write NAME_curves.png (the baseline's val-accuracy curve per seed, every other model's mean
    over seeds, the linear reference's final mean as a line) and return (path, the Report.budget
    sentence on the baseline's curve and the run's CPU time).

    runs: {label: [run per seed]}, each run with "curve" [(step, fraction)] and "cpu_seconds";
    noun names the models in the CPU sentence ("variants", "models")."""
    curves = {baseline: [r["curve"] for r in runs[baseline]]}
    for label, rs in runs.items():
        if label != baseline:
            curves[f"{label} (mean)"] = [mean_curve([r["curve"] for r in rs])]     # one curve: the mean
    lin_mean = statistics.fmean(r["test_accuracy"] for r in linear)
    # Step 0 (chance, ~10%) is left out of the figure so that its scale resolves the last points.
    shown = {label: [[(s, 100 * a) for s, a in c if s > 0] for c in cs] for label, cs in curves.items()}
    shown["linear classifier (curve)"] = [[(s, 100 * a) for s, a in r["curve"] if s > 0] for r in linear]
    path = curve_figure(Path(out) / f"{name}_curves.png", shown,
                        references={f"linear classifier, whole test set ({100 * lin_mean:.2f}%)": 100 * lin_mean},
                        ylabel=f"accuracy on the first {curve_images:,} test images (%)",
                        title=f"{name}: {task_name}, {steps} steps of {batch_size}")
    tail = flattening(baseline, [[(s, 100 * a) for s, a in c] for c in curves[baseline]], higher_is_better=True,
                      threshold=0.5)
    final = mean_curve([[(s, 100 * a) for s, a in c] for c in curves[baseline]])
    epochs = steps * batch_size / train_size
    (b_acc, b_std), (l_acc, l_std) = baseline_test, linear_test
    margin = b_acc - l_acc
    clear = margin > 2 * math.hypot(b_std, l_std) and margin > 0.01
    sentence = (f"{steps} steps of batch {batch_size} ({epochs:.1f} epochs of the {train_size:,} training images) "
                f"for every model. {tail} (accuracy in % on the first {curve_images:,} test images; 'flattened' = under 0.5 pp "
                f"over the last quarter.) On the whole test set the {baseline} baseline reaches "
                f"{100 * b_acc:.2f} ± {100 * b_std:.2f}% against {100 * l_acc:.2f} ± {100 * l_std:.2f}% for the "
                f"linear classifier on the pixels ({100 * margin:+.2f} pp): "
                + ("the baseline has clearly learned more than a linear model, so the comparison is between "
                   "models that learn." if clear else
                   "the baseline does not clearly beat a linear model yet, so the verdict is provisional."))
    if not final:
        sentence += " (No curve points.)"
    cpu_total = sum(r["cpu_seconds"] for rs in runs.values() for r in rs)
    seeds = len(runs[baseline])
    sentence += (f" Training took {cpu_total / 60:.1f} CPU minutes ({seeds} seeds x {len(runs)} {noun}, "
                 f"{threads} thread(s)); the budget was chosen so that the whole run fits in about 25 minutes "
                 "of one core.")
    return path, sentence
