"""MEDUSA on Fashion-MNIST: one shared attention body vs isolated per-stage attention vs none.

The paper (MEDUSA, Aboutalebi et al. 2021) argues that ONE self-attention body whose heads gate
every scale of a CNN beats "multiple isolated lightweight attention mechanisms" at those scales,
and the CNN without them. This claim trains attnlab.models.MedusaNet (a reconstruction: only a
TensorFlow checkpoint was released) on Fashion-MNIST's 60,000 training images and measures every
model once, at the end, on the 10,000 test images:
- "MEDUSA (shared body)": the body reads the stem's features once; head s gates stage s;
- "isolated per-stage attention": one `medusa` module per stage, each reading its own stage,
  body width chosen so the whole net has about MEDUSA's parameters;
- "backbone, no attention": the same ResNet without gates;
- "backbone, wider": the ResNet without gates, widened to about MEDUSA's parameter count (so a
  gain of MEDUSA is not just its extra parameters).
All with attnlab.train (AdamW, warm-up + cosine), the same steps, batches (the task's patch tokens,
put back into images) and seeds.

Verdict rule (stated on the page): MEDUSA "beats" a model when its mean test accuracy exceeds that
model's by more than the seeds' spread sqrt(std_a^2 + std_b^2) (at least 0.2 pp). holds = beats
all three; partly = beats the backbone without attention but not all three; does not hold = does
not beat the backbone without attention.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from attnlab.arena.claims import Claim, Report, Table
from attnlab.arena.claims._curves import curve_figure, flattening

TASK = "fashion_mnist"
TEST_IMAGES = 10_000

# label -> (layers, block options, body width or None = --body-dim)
VARIANTS = {
    "MEDUSA (shared body)": (["medusa"], {"placement": "shared"}, None),
    "isolated per-stage attention": (["medusa"], {"placement": "isolated"}, "isolated"),
    "backbone, no attention": ([], {}, None),
    "backbone, wider": ([], {"widths": "wide"}, None),
}
MEDUSA, ISOLATED, BARE, WIDE = VARIANTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="seeds per model: --seed, --seed + 1, ...")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr: warm-up, then cosine to 10%%")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--body-dim", type=int, default=64, help="MEDUSA's body width D")
    p.add_argument("--isolated-body-dim", type=int, default=32,
                   help="each isolated module's body width (32: about MEDUSA's total parameters)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of every body")
    p.add_argument("--wide-widths", default="18,36,76", help="stage widths of the wider backbone")
    p.add_argument("--curve-points", type=int, default=6, help="evaluations along training on 1,000 test images")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (processes); results do not depend on it")


def _job(spec: dict) -> dict:
    """One training run: the final model's accuracy and loss on the whole test set, its curve."""
    import torch

    from attnlab.arena.claims._images import train_and_load
    from attnlab.train import TrainConfig
    torch.set_num_threads(spec["threads"])
    config = TrainConfig.from_dict(spec["config"])
    result, model, task, seconds, cpu = train_and_load(config)
    batches, size = spec["test_batches"], spec["test_batch_size"]
    test = task.evaluate(model, batches=batches, batch_size=size)
    return {"label": spec["label"], "seed": config.seed, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "params": result.params, "attention_params": model.net.parameter_count()["attention"],
            "curve": [(h["step"], h["val_accuracy"]) for h in result.history if "val_accuracy" in h],
            "seconds": seconds, "cpu_seconds": cpu}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = _mean_std(xs)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def judge(accuracies: dict[str, list[float]], floor: float = 0.002) -> tuple[str, dict[str, dict]]:
    """The verdict rule: {label: per-seed test accuracies} -> (verdict, {other: gap, spread, beats}).
    MEDUSA beats a model when its mean exceeds that model's by more than max(floor, sqrt(std_a^2 + std_b^2))."""
    m = accuracies[MEDUSA]
    comparisons = {}
    for other in (ISOLATED, BARE, WIDE):
        o = accuracies[other]
        gap = _mean_std(m)[0] - _mean_std(o)[0]
        spread = max(floor, math.hypot(_mean_std(m)[1], _mean_std(o)[1]))
        comparisons[other] = {"gap": gap, "spread": spread, "beats": gap > spread}
    beats = {k: c["beats"] for k, c in comparisons.items()}
    verdict = "holds" if all(beats.values()) else "partly" if beats[BARE] else "does not hold"
    return verdict, comparisons


def run(args: argparse.Namespace) -> Report:
    import torch

    from attnlab.train import TrainConfig
    if args.quick:
        args.seeds, args.steps, args.warmup, args.curve_points, args.batch_size = 2, 3, 1, 1, 16
    if args.seeds < 1 or args.steps < 1:
        raise ValueError(f"--seeds and --steps must be >= 1, got {args.seeds}, {args.steps}")
    wide = tuple(int(w) for w in str(args.wide_widths).split(","))
    if len(wide) != 3 or min(wide) < 1:
        raise ValueError(f"--wide-widths must be three positive ints, got {args.wide_widths!r}")
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.seeds)]
    test_batch_size = 50 if args.quick else 500
    test_batches = 2 if args.quick else TEST_IMAGES // test_batch_size
    curve_batches, curve_batch_size = (1, 50) if args.quick else (2, 500)      # 1,000 test images
    task_options = {"patch": 4, **({"train_size": 512} if args.quick else {})}
    specs = []
    for label, (layers, options, body) in VARIANTS.items():
        block = {"network": "medusa", **options}
        if block.get("widths") == "wide":
            block["widths"] = wide
        dim = args.isolated_body_dim if body == "isolated" else args.body_dim
        for seed in seeds:
            config = TrainConfig(
                task=TASK, task_options=task_options, layers=layers, dim=dim, num_heads=args.heads,
                block_options=block, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                warmup=min(args.warmup, args.steps), weight_decay=0.01,
                eval_every=max(1, args.steps // max(1, args.curve_points)), eval_batches=curve_batches,
                eval_batch_size=curve_batch_size,
                log_every=max(1, args.steps // 10), checkpoint_every=0, seed=seed, threads=args.threads)
            specs.append({"label": label, "config": config.to_dict(), "threads": args.threads,
                          "test_batches": test_batches, "test_batch_size": test_batch_size})
    start = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, specs))
    else:
        done = [_job(spec) for spec in specs]
    wall = time.perf_counter() - start
    runs: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    for r in sorted(done, key=lambda r: r["seed"]):
        runs[r["label"]].append(r)

    def acc(label):
        return [r["test_accuracy"] for r in runs[label]]

    rows = []
    for label in VARIANTS:
        rs = runs[label]
        rows.append([label, f"{rs[0]['params']:,}", f"{rs[0]['attention_params']:,}", _cell(acc(label)),
                     _cell([r["test_loss"] for r in rs], scale=1.0, digits=3),
                     f"{statistics.fmean(r['seconds'] for r in rs) / args.steps:.2f}"])
    table = Table(f"Fashion-MNIST test set ({test_batches * test_batch_size:,} images), the last model, mean ± std over "
                  f"{len(seeds)} seeds ({args.steps} steps of {args.batch_size})",
                  ["model", "params", "attention params", "test accuracy %", "test loss", "s / step"], rows)

    verdict, comparisons = judge({label: acc(label) for label in VARIANTS})
    beats = {other: c["beats"] for other, c in comparisons.items()}
    verdict_rows = [[other, f"{100 * c['gap']:+.2f}", f"{100 * c['spread']:.2f}", "yes" if c["beats"] else "no"]
                    for other, c in comparisons.items()]
    verdict_table = Table("MEDUSA against each other model (test accuracy, pp)",
                          ["other model", "MEDUSA - other", "spread", "MEDUSA beats it"], verdict_rows)

    curves = {label: [[(s, 100 * a) for s, a in r["curve"]] for r in runs[label]] for label in VARIANTS}
    figure = curve_figure(Path(args.out) / "medusa_curves.png", curves, ylabel="accuracy on 1,000 test images (%)",
                          title=f"medusa: {args.steps} steps of {args.batch_size}")
    tails = " ".join(flattening(label, curves[label], higher_is_better=True, threshold=0.5) for label in (MEDUSA, BARE))
    cpu = sum(r["cpu_seconds"] for r in done)
    budget = (f"{args.steps} AdamW steps of batch {args.batch_size} (lr {args.lr}, warm-up {args.warmup}, cosine to 10%, "
              f"weight decay 0.01) for every model and seed ({args.steps * args.batch_size / 60000:.2f} epochs). {tails} "
              f"(accuracy in %, mean over seeds; 'flattened' = under 0.5 pp over the last quarter; curves on the first "
              f"1,000 test images, shown only.) {wall / 60:.1f} minutes wall, {cpu / 60:.1f} CPU minutes, "
              f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time.")
    means = {label: 100 * _mean_std(acc(label))[0] for label in VARIANTS}
    summary = (f"Test accuracy over {len(seeds)} seeds: MEDUSA {means[MEDUSA]:.2f}%, isolated per-stage attention "
               f"{means[ISOLATED]:.2f}%, the backbone without attention {means[BARE]:.2f}%, the wider backbone "
               f"{means[WIDE]:.2f}%. MEDUSA beats " +
               (", ".join(k for k, v in beats.items() if v) or "none of them") + " beyond the seeds' spread.")
    notes = [
        "Verdict rule: MEDUSA beats a model when its mean test accuracy exceeds that model's by more than "
        "sqrt(std_a^2 + std_b^2) over the seeds (at least 0.2 pp). holds = beats the isolated attention, the "
        "backbone and the wider backbone; partly = beats the backbone without attention only or with some of the "
        "others; does not hold = does not beat the backbone without attention.",
        "A reconstruction: MEDUSA released no model code (one TensorFlow checkpoint, COVID-Net CXR-3) and only its "
        "abstract was read; the body (one multi-head attention layer over 2 x 2 patches of the stem's features), "
        "the per-stage 1 x 1 heads with bilinear resize and the sigmoid gate are attnlab's reading "
        "(attnlab.mechanisms.medusa, attnlab.models.medusa).",
        "Not comparable with the paper: it reports COVID-19 chest X-ray classification (COVIDx, 480 x 480 images, "
        "a large CNN); here 28 x 28 Fashion-MNIST on a three-stage ResNet of about 0.1M parameters.",
        f"Models: stem 16 channels, stages (16, 32, 64) with strides (1, 2, 2) (wider backbone: {wide}); MEDUSA's "
        f"body width {args.body_dim}, each isolated module's {args.isolated_body_dim} (its 7 x 7 stage uses stride 1), "
        f"{args.heads} heads. Inputs are the task's standardised 4 x 4 patch tokens put back into the image "
        "(tasks._images.unpatchify), the same batches for every model.",
        "Nothing is selected on the test set: one fixed budget, the last model reported. The learning curves use "
        "the first 1,000 test images, for reading only.",
    ]
    if args.quick:
        notes.append("--quick: a smoke run (3 steps, 2 seeds, 512 training images, 100 test images); its numbers "
                     "mean nothing.")
    return Report(verdict=verdict, summary=summary, tables=[table, verdict_table], notes=notes, figures=[figure],
                  budget=budget, data={"seeds": seeds, "runs": runs, "args": {
                      k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})


CLAIM = Claim(
    name="medusa",
    paper="MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image "
          "Analysis (2021)",
    statement=("One shared self-attention body whose heads gate every stage of a CNN classifies better than the same "
               "CNN with isolated per-stage attention modules of about equal size, and better than the CNN without "
               "attention, also when that CNN is widened to the same parameter count."),
    add_arguments=add_arguments, run=run, url="https://arxiv.org/abs/2110.06063")
