"""MLP-free, collapsed and symmetric attention keep accuracy with far fewer parameters.

Paper: Bermeitinger, Hrycej, Pavone, Kath & Handschuh, "Reducing the Transformer Architecture to a
Minimum" (2024, arXiv:2410.13732). The paper drops the MLP of every encoder block, collapses W_q W_k^T
into one matrix per head (and W_v W_o likewise, or omits them), and makes the similarity symmetric
(half the parameters); on MNIST and CIFAR-10 these reduced transformers reach accuracy similar to the
standard one. Collapsing saves parameters only with one head (h C^2 per collapsed product against
2 C^2 for the two factors), which is the paper's single-head case and this claim's default.

Here: a mean-pooled ViT-like `Classifier` on Fashion-MNIST patch tokens (digits when the data is
not installed), every variant trained by `attnlab.train` with the same steps, batch, learning
rate schedule, width, depth, heads and seeds; the test accuracy is measured on the whole test set.
Variants (all blocks pre-norm with residuals):

    standard          mhsa + MLP (mlp_ratio 4)
    mlp_free          mhsa, no MLP
    collapsed_qk      minimal(collapse_qk, V and O kept), no MLP
    collapsed_qk_vo   minimal(collapse_qk, collapse_vo="one"), no MLP
    symmetric         minimal(collapse_qk, symmetric, collapse_vo="one"), no MLP
    minimum           minimal(collapse_qk, symmetric, collapse_vo="none"), no MLP: the paper's minimum

plus a reference that has no attention at all: a linear classifier on the pixels, trained on the
same batches with the same optimiser and schedule, to show how much of the accuracy needs attention.
Three seeds per variant (mean ± std; a difference inside the spread is a tie); the page shows the
learning curves (minimal_curves.png) and says in its budget line whether the baseline had flattened.
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

from torch import nn

from attnlab import create
from attnlab.arena.claims import Claim, Report, Table
from attnlab.arena.claims._images import (accuracy_curve, add_image_arguments, curve_split, curves_and_budget,
                                          difference_spread, image_task, mean_spread, train_and_load,
                                          prepare_run, train_linear_reference, whole_test_split)
from attnlab.tasks import create_task
from attnlab.train import TrainConfig
from attnlab.mechanisms.minimal import MinimalAttention


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str           # how the table describes the attention layer
    layer: str | dict        # TrainConfig.layers entry (the same for every block)
    mlp: bool                # whether the blocks keep their MLP


VARIANTS = (
    Variant("standard", "mhsa (W_q, W_k, W_v, W_o)", "mhsa", True),
    Variant("mlp_free", "mhsa (W_q, W_k, W_v, W_o)", "mhsa", False),
    Variant("collapsed_qk", "W_qk collapsed; W_v, W_o kept",
            {"name": "minimal", "collapse_qk": True, "collapse_vo": "separate"}, False),
    Variant("collapsed_qk_vo", "W_qk and W_vo collapsed",
            {"name": "minimal", "collapse_qk": True, "collapse_vo": "one"}, False),
    Variant("symmetric", "W_qk symmetric, W_vo collapsed",
            {"name": "minimal", "collapse_qk": True, "symmetric": True, "collapse_vo": "one"}, False),
    Variant("minimum", "W_qk symmetric, no W_v/W_o",
            {"name": "minimal", "collapse_qk": True, "symmetric": True, "collapse_vo": "none"}, False),
)
BY_NAME = {v.name: v for v in VARIANTS}


def full_test_accuracy(task, model: nn.Module) -> tuple[float, float]:
    """(accuracy, loss) of `model` over the task's whole val (test) split."""
    batches, batch_size = whole_test_split(task)
    metrics = task.evaluate(model, batches=batches, batch_size=batch_size)
    return metrics["accuracy"], metrics["loss"]


def attention_parameters(model: nn.Module) -> int:
    return sum(p.numel() for block in model.body.blocks for p in block.attn.parameters())


def per_layer_parameter_table(dim: int, heads: list[int]) -> Table:
    """Attention weights of one layer by head count: real module counts (the minimal formula agrees)."""
    rows = []
    for v in VARIANTS[1:]:
        counts = []
        for h in heads:
            options = {k: val for k, val in v.layer.items() if k != "name"} if isinstance(v.layer, dict) else {}
            module = create(v.layer["name"] if isinstance(v.layer, dict) else v.layer, dim, h, **options)
            count = sum(p.numel() for p in module.parameters())
            if isinstance(v.layer, dict) and count != MinimalAttention.parameter_count_formula(dim, h, **options):
                raise RuntimeError(f"{v.name}: module has {count} parameters, the paper's arithmetic says "
                                   f"{MinimalAttention.parameter_count_formula(dim, h, **options)}")
            counts.append(count)
        rows.append([v.name] + counts)
    return Table(f"Attention parameters of one layer at dim {dim} by number of heads (module counts; "
                 "collapsing saves only with 1 head)", ["variant"] + [f"h={h}" for h in heads], rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_image_arguments(p, steps=2000)
    p.add_argument("--variants", nargs="+", choices=list(BY_NAME), default=list(BY_NAME),
                   help="variants to train (standard is always included: it is the baseline)")
    p.add_argument("--heads", type=int, default=1, help="attention heads (the paper's collapsing saves at 1)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="'similar accuracy': mean test accuracy at most this far below standard's")


def run(args: argparse.Namespace) -> Report:
    prepare_run(args)
    notes = []
    task_name, patch = image_task(args, notes)
    probe = create_task(task_name, patch=patch)
    curve_batches, curve_batch_size = curve_split(probe)
    chosen = ["standard"] + [name for name in args.variants if name != "standard"]
    seeds = [args.seed + i for i in range(args.seeds)]
    eval_every = max(1, args.steps // args.curve_points)

    def config(variant: Variant, seed: int) -> TrainConfig:
        return TrainConfig(task=task_name, task_options={"patch": patch}, layers=[variant.layer] * args.layers,
                           dim=args.dim, num_heads=args.heads, mlp_ratio=args.mlp_ratio if variant.mlp else 0.0,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                           eval_every=eval_every, eval_batches=curve_batches, eval_batch_size=curve_batch_size,
                           checkpoint_every=0, seed=seed, threads=args.threads)

    runs: dict[str, list[dict]] = {}
    for name in chosen:
        variant = BY_NAME[name]
        for seed in seeds:
            result, model, task, seconds, cpu = train_and_load(config(variant, seed))
            accuracy, test_loss = full_test_accuracy(task, model)
            if not (math.isfinite(accuracy) and math.isfinite(test_loss)):
                raise FloatingPointError(f"{name} seed {seed}: test accuracy {accuracy}, loss {test_loss}")
            runs.setdefault(name, []).append({
                "seed": seed, "test_accuracy": accuracy, "test_loss": test_loss, "params": result.params,
                "attention_params": attention_parameters(model), "train_seconds": seconds, "cpu_seconds": cpu,
                "tokens_per_s": result.tokens_per_s, "curve": accuracy_curve(result.history),
                "mean_train_loss": result.history[-1].get("train_loss"),
                "mean_train_accuracy": result.history[-1].get("train_accuracy")})
    linear = [train_linear_reference(config(BY_NAME["standard"], s)) for s in seeds]

    summary_rows, checks, stats = [], [], {}
    base = [r["test_accuracy"] for r in runs["standard"]]
    base_acc, base_std = mean_spread(base)
    base_params = runs["standard"][0]["params"]
    lin = [r["test_accuracy"] for r in linear]
    lin_acc, lin_std = mean_spread(lin)
    for name in chosen:
        variant, rs = BY_NAME[name], runs[name]
        accs = [r["test_accuracy"] for r in rs]
        acc, spread = mean_spread(accs)
        params, attn = rs[0]["params"], rs[0]["attention_params"]
        noise = difference_spread(accs, base)
        stats[name] = {"accuracy": acc, "spread": spread, "params": params, "attention_params": attn,
                       "delta_vs_linear": acc - lin_acc}
        summary_rows.append([name, variant.attention, "yes" if variant.mlp else "no", attn, params,
                             f"{100 * params / base_params:.0f}%", f"{100 * acc:.2f} ± {100 * spread:.2f}",
                             f"{100 * (acc - base_acc):+.2f}", f"{100 * (acc - lin_acc):+.2f}",
                             " / ".join(f"{100 * a:.2f}" for a in accs),
                             f"{statistics.fmean(r['tokens_per_s'] for r in rs):,.0f}"])
        if name != "standard":
            ok = acc >= base_acc - args.tolerance and params < base_params
            checks.append((name, acc - base_acc, noise, params / base_params, ok))
    summary_rows.append(["reference: linear on pixels", "none", "no", 0, linear[0]["params"],
                         f"{100 * linear[0]['params'] / base_params:.0f}%", f"{100 * lin_acc:.2f} ± {100 * lin_std:.2f}",
                         f"{100 * (lin_acc - base_acc):+.2f}", "+0.00", " / ".join(f"{100 * a:.2f}" for a in lin), "-"])

    main_table = Table(
        f"{task_name} test accuracy (whole test set, %, mean ± std over seeds {seeds}) and parameters "
        f"(dim {args.dim}, {args.heads} head(s), {args.layers} layers, {args.steps} steps of {args.batch_size})",
        ["variant", "attention", "MLP", "attention params", "total params", "total vs standard", "test acc %",
         "Δ vs standard (pp)", "Δ vs linear (pp)", "per seed", "train tokens/s"], summary_rows)
    check_table = Table(
        f"Checks (fixed before the run): mean accuracy at most {100 * args.tolerance:.1f} pp below standard, "
        "with fewer parameters; 'spread' = sqrt(std² + std_standard²), a |Δ| under it is a tie with standard",
        ["variant", "Δ accuracy (pp)", "spread (pp)", "vs standard", "params / standard", "pass"],
        [[n, f"{100 * d:+.2f}", f"{100 * e:.2f}", "tie" if abs(d) <= e else "above" if d > 0 else "below",
          f"{r:.2f}", "yes" if ok else "no"] for n, d, e, r, ok in checks])
    tables = [main_table, check_table, per_layer_parameter_table(args.dim, sorted({1, 2, 4, args.heads}))]

    figure, budget = curves_and_budget(
        args.out, "minimal", "standard", {label: runs[label] for label in chosen}, linear, steps=args.steps,
        batch_size=args.batch_size, train_size=probe.num_examples("train"), task_name=task_name,
        curve_images=curve_batches * curve_batch_size, baseline_test=(base_acc, base_std),
        linear_test=(lin_acc, lin_std), threads=args.threads, noun="variants")

    passed = [n for n, *_, ok in checks if ok]
    failed = [n for n, *_, ok in checks if not ok]
    ties = [n for n, d, e, _, _ in checks if abs(d) <= e]
    verdict = "holds" if not failed else "partly" if passed else "does not hold"
    smallest = min(chosen, key=lambda n: stats[n]["params"])
    summary = (f"Standard (mhsa + MLP, {base_params:,} parameters) reaches {100 * base_acc:.2f} ± "
               f"{100 * base_std:.2f}% test accuracy, {100 * (base_acc - lin_acc):+.2f} pp from a linear classifier "
               f"on the pixels trained in the same run ({100 * lin_acc:.2f} ± {100 * lin_std:.2f}%). "
               + "; ".join(f"{n}: {100 * stats[n]['accuracy']:.2f} ± {100 * stats[n]['spread']:.2f}% with "
                           f"{stats[n]['params']:,} parameters ({100 * stats[n]['params'] / base_params:.0f}%)"
                           for n in chosen if n != "standard")
               + f". {len(passed)}/{len(checks)} reduced variants stay within {100 * args.tolerance:.1f} pp of "
               f"standard" + (f" (not: {', '.join(failed)})" if failed else "")
               + (f"; inside the seeds' spread of standard (a tie): {', '.join(ties)}" if ties else
                  "; none is inside the seeds' spread of standard")
               + f"; the smallest ({smallest}) has {100 * stats[smallest]['params'] / base_params:.0f}% of the "
               "parameters."
               + (" Every transformer here is below the linear classifier: the comparison is between under-trained "
                  "models." if lin_acc >= max(s["accuracy"] for s in stats.values()) else ""))
    notes += [
        f"Data: {task_name} with {patch}x{patch} patches ({probe.seq_len} tokens of {patch * patch} pixels), "
        "standardised with the train-set pixel mean/std; accuracy on the whole test split (val split of the task). "
        "No augmentation.",
        f"Training (identical for every variant): {args.steps} AdamW steps of batch {args.batch_size}, peak lr "
        f"{args.lr} with {args.warmup} warm-up steps and cosine decay to 10%, weight decay 0.01 on matrices, grad "
        f"clip 1, seeds {seeds} (the seed sets both the initial weights and the order of the training batches). The "
        "paper trains for many epochs with augmentation; this is a few epochs on one CPU core.",
        "Model: learned linear patch embedding plus learned positions, pre-norm blocks with residuals and LayerNorm, "
        "mean pooling, a linear head. 'attention params' counts the attention modules of all layers; 'total' "
        "everything (embedding, positions, norms, MLPs, head). minimal has no biases; mhsa has an output bias.",
        f"The spread is the standard deviation over {len(seeds)} seed(s); a difference from standard smaller than "
        "sqrt(std² + std_standard²) is a tie. With more heads the collapsed variants grow (h C^2 per collapsed "
        "product), see the last table: the parameter savings of collapsing are a single-head result, as in the paper.",
        f"The linear reference is a linear softmax classifier (logistic regression, {linear[0]['params']:,} weights "
        "and biases) on the standardised pixels, trained in the same run on the same batches with the same AdamW, schedule, grad "
        "clip and steps as the transformers (one per seed); 'Δ vs linear' is each model's distance to its mean. "
        "Fashion-MNIST is largely linearly separable, so a transformer is only worth reading above this line.",
        f"Learning curves (figure): accuracy on the first {curve_batches * curve_batch_size:,} test images every "
        f"{eval_every} steps; standard per seed (thin) and mean (thick), the other variants as means over seeds, the "
        "linear classifier's curve and its final whole-test accuracy as a dashed line.",
    ]
    data = {"task": task_name, "patch": patch, "seeds": seeds, "runs": runs, "stats": stats,
            "linear_reference": linear,
            "checks": {n: {"delta_accuracy": d, "spread": e, "params_ratio": r, "pass": ok}
                       for n, d, e, r, ok in checks}}
    return Report(verdict=verdict, summary=summary, tables=tables, notes=notes, data=data, figures=[figure],
                  budget=budget)


CLAIM = Claim(
    name="minimal",
    paper="Bermeitinger et al., Reducing the Transformer Architecture to a Minimum (2024)",
    statement=("Transformers without MLPs, with the query-key (and value-output) matrices collapsed into one "
               "matrix and with a symmetric similarity reach accuracy similar to the standard architecture "
               "on image classification, with far fewer parameters."),
    run=run,
    add_arguments=add_arguments,
    url="https://arxiv.org/abs/2410.13732",
)
