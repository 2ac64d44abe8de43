"""L-SFAN on two UEA multivariate sets: TAP / SAP / no-attention ablations beside plain baselines.

The paper (L-SFAN, 2024, official code jortigoso/LSFAN) reports its network on EmoPain, which is
access-restricted; this claim runs the official architecture (attnlab.models.lsfan) on the two
multivariate UEA sets that ship inside the aeon wheel (attnlab.tasks.uea: BasicMotions,
JapaneseVowels; the archive's train/test split), five seeds each, with:
- L-SFAN TAP (the paper's CNN_TAP_Att), L-SFAN SAP (attention over sensor-pooled tokens, ours),
  and both poolings without attention (the code's CNN_TAP / CNN_SAP);
- a small 1-D CNN (FCN after Wang et al. 2017, width 32) trained by the same trainer, and
- ROCKET (Dempster et al. 2020; multivariate kernels as in its sktime/aeon version) + a ridge
  classifier with leave-one-out choice of alpha (as sklearn's RidgeClassifierCV), both written here.
Every network trains with attnlab.train (AdamW, warm-up + cosine) for the same fixed budget and is
measured once, at the end, on the whole test split: nothing is selected on it.

Verdict rule (stated on the page): per dataset, L-SFAN TAP "matches the baselines" when its mean
test accuracy is within the seeds' spread (sqrt(std_a^2 + std_b^2), at least 1 pp) of the better
of the two baselines or above it; "attention helps" when TAP beats TAP-without-attention by more
than that spread. The claim tested is the paper's design claim that the oriented-pooling CNN with
one attention layer is a competitive lightweight classifier: holds if TAP matches the baselines
on both sets and attention helps on at least one, partly if it matches on one set or matches
without attention helping, does not hold otherwise.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.arena.claims import Claim, Report, Table
from attnlab.arena.claims._curves import curve_figure, flattening
from attnlab.arena.claims._images import train_and_load
from attnlab.tasks import create_task
from attnlab.tasks.uea import DATASETS, classification_metrics
from attnlab.train import TrainConfig

# label -> TrainConfig.block_options (the task's build options)
VARIANTS = {
    "L-SFAN TAP (mhsa)": {"network": "lsfan", "pooling": "tap", "attention": True},
    "L-SFAN SAP (mhsa)": {"network": "lsfan", "pooling": "sap", "attention": True},
    "TAP, no attention": {"network": "lsfan", "pooling": "tap", "attention": False},
    "SAP, no attention": {"network": "lsfan", "pooling": "sap", "attention": False},
    "1-D CNN (FCN)": {"network": "fcn"},
}
ROCKET_LABEL = "ROCKET + ridge"
BASELINES = ("1-D CNN (FCN)", ROCKET_LABEL)
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 10))


# --- ROCKET ----------------------------------------------------------------------------------------

def rocket_kernels(num_kernels: int, sensors: int, length: int, seed: int) -> list[dict[str, Any]]:
    """ROCKET's random kernels, multivariate form (sktime/aeon's Rocket): per kernel a length in
    {7, 9, 11}; floor(2^U(0, log2(min(S, l) + 1))) channels drawn without replacement; N(0, 1)
    weights centred over the whole kernel; bias U(-1, 1); dilation floor(2^U(0, log2((T-1)/(l-1))));
    padding (l-1) * dilation // 2 with probability 1/2, else none."""
    rng = np.random.default_rng(seed)
    kernels = []
    for _ in range(num_kernels):
        l = int(rng.choice((7, 9, 11)))
        channels = int(np.floor(2 ** rng.uniform(0, np.log2(min(sensors, l) + 1))))
        chosen = np.sort(rng.choice(sensors, channels, replace=False))
        weights = rng.normal(0, 1, (channels, l))
        weights -= weights.mean()
        bias = rng.uniform(-1, 1)
        top = np.log2((length - 1) / (l - 1)) if length > l else 0.0
        dilation = int(np.floor(2 ** rng.uniform(0, max(top, 0.0))))
        padding = (l - 1) * dilation // 2 if rng.integers(2) == 1 else 0
        kernels.append({"length": l, "channels": chosen, "weights": weights, "bias": bias,
                        "dilation": dilation, "padding": padding})
    return kernels


def rocket_features(x: torch.Tensor, kernels: list[dict[str, Any]]) -> torch.Tensor:
    """x (n, T, S) -> (n, 2 * kernels): per kernel the proportion of positive values and the max of
    its (dilated, optionally padded) convolution output. Kernels sharing (length, dilation, padding)
    run as one conv1d in float64, unused channels holding zero weights."""
    xs = x.double().transpose(1, 2)                                             # (n, S, T)
    n, S, _ = xs.shape
    out = torch.empty(n, 2 * len(kernels), dtype=torch.float64)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, k in enumerate(kernels):
        groups.setdefault((k["length"], k["dilation"], k["padding"]), []).append(i)
    for (l, dilation, padding), members in groups.items():
        w = torch.zeros(len(members), S, l, dtype=torch.float64)                # (k, S, l)
        b = torch.empty(len(members), dtype=torch.float64)
        for j, i in enumerate(members):
            w[j, torch.as_tensor(kernels[i]["channels"])] = torch.as_tensor(kernels[i]["weights"])
            b[j] = kernels[i]["bias"]
        maps = torch.nn.functional.conv1d(xs, w, b, dilation=dilation, padding=padding)   # (n, k, T_out)
        idx = torch.as_tensor(members)
        out[:, 2 * idx] = (maps > 0).double().mean(-1)                          # ppv
        out[:, 2 * idx + 1] = maps.amax(-1)                                     # max
    return out


class RidgeClassifierLOO:
    """One-vs-rest ridge regression on +-1 targets with an intercept, alpha chosen by exact
    leave-one-out squared error (sklearn's RidgeClassifierCV with its default GCV), after scaling
    each feature by its train std (StandardScaler(with_mean=False), as sktime's RocketClassifier).

    Centred X = U s V^T; the hat matrix is 11^T/n + U diag(s^2/(s^2+a)) U^T, so every alpha's
    LOO residual (y - y_hat) / (1 - H_ii) comes from one SVD."""

    def __init__(self, alphas=RIDGE_ALPHAS):
        self.alphas = tuple(alphas)

    def fit(self, X: np.ndarray, y: np.ndarray, num_classes: int) -> "RidgeClassifierLOO":
        X = np.asarray(X, dtype=np.float64)
        scale = X.std(0)
        self.scale = np.where(scale > 0, scale, 1.0)
        X = X / self.scale
        Y = -np.ones((len(y), num_classes))
        Y[np.arange(len(y)), y] = 1.0
        if num_classes == 2:
            Y = Y[:, 1:]                                                        # one column, as sklearn
        self.num_classes = num_classes
        self.x_mean, self.y_mean = X.mean(0), Y.mean(0)
        Xc, Yc = X - self.x_mean, Y - self.y_mean
        U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
        UtY = U.T @ Yc                                                          # (r, targets)
        n = len(y)
        best = None
        for a in self.alphas:
            shrink = s ** 2 / (s ** 2 + a)                                      # (r,)
            fitted = U @ (shrink[:, None] * UtY)                               # centred fit (n, targets)
            h = 1.0 / n + (U ** 2) @ shrink                                     # (n,) hat diagonal
            loo = (Yc - fitted) / (1.0 - h)[:, None]
            err = float((loo ** 2).mean())
            if best is None or err < best[0]:
                best = (err, a)
        self.alpha = best[1]
        d = s / (s ** 2 + self.alpha)
        self.coef = Vt.T @ (d[:, None] * UtY)                                  # (features, targets)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64) / self.scale
        return (X - self.x_mean) @ self.coef + self.y_mean

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        if self.num_classes == 2:
            return (scores[:, 0] > 0).astype(np.int64)
        return scores.argmax(1)


def run_rocket(task, num_kernels: int, seed: int) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    kernels = rocket_kernels(num_kernels, task.sensors, task.length, seed)
    x_train, y_train = task.arrays("train")
    x_test, y_test = task.arrays("test")
    clf = RidgeClassifierLOO().fit(rocket_features(x_train, kernels).numpy(), y_train.numpy(), task.num_classes)
    pred = torch.from_numpy(clf.predict(rocket_features(x_test, kernels).numpy()))
    metrics = classification_metrics(pred, y_test, task.num_classes)
    return {"seed": seed, **{f"test_{k}": v for k, v in metrics.items()}, "alpha": clf.alpha,
            "params": 2 * num_kernels * (task.num_classes if task.num_classes > 2 else 1),
            "train_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


# --- the claim -------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", default="BasicMotions,JapaneseVowels",
                   help=f"comma-separated UEA sets ({', '.join(DATASETS)})")
    p.add_argument("--seeds", type=int, default=5, help="seeds per model: --seed, --seed + 1, ...")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr: warm-up, then cosine to 10%%")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--heads", type=int, default=2, help="attention heads (2 divides every token width here)")
    p.add_argument("--mlp-ratio", type=float, default=1.0, help="feed-forward width / token width (paper: 1)")
    p.add_argument("--dropout", type=float, default=0.2, help="encoder dropout (paper: 0.2)")
    p.add_argument("--fcn-width", type=int, default=32, help="the 1-D CNN's base width (Wang et al.: 128)")
    p.add_argument("--rocket-kernels", type=int, default=10_000)
    p.add_argument("--curve-points", type=int, default=10, help="test evaluations along training (curves only)")
    p.add_argument("--threads", type=int, default=1)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    m, s = _mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def run(args: argparse.Namespace) -> Report:
    if args.quick:
        args.seeds, args.steps, args.warmup, args.rocket_kernels, args.curve_points = 2, 4, 1, 40, 2
        args.batch_size = 16
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise ValueError(f"--datasets must name some of {sorted(DATASETS)}, got {args.datasets!r}")
    if args.seeds < 1 or args.steps < 1:
        raise ValueError(f"--seeds and --steps must be >= 1, got {args.seeds}, {args.steps}")
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.seeds)]
    runs: dict[str, dict[str, list[dict]]] = {}
    notes: list[str] = []
    cpu_total = 0.0
    for ds in datasets:
        task = create_task("uea", dataset=ds)
        n_test, n_train = task.num_examples("test"), task.num_examples("train")
        runs[ds] = {}
        for label, options in VARIANTS.items():
            runs[ds][label] = []
            for seed in seeds:
                config = TrainConfig(
                    task="uea", task_options={"dataset": ds}, layers=["mhsa"],
                    dim=args.fcn_width, num_heads=args.heads, mlp_ratio=args.mlp_ratio,
                    block_options={**options, **({"dropout": args.dropout} if options["network"] == "lsfan" else {})},
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps),
                    weight_decay=0.01, eval_every=max(1, args.steps // args.curve_points), eval_batches=1,
                    eval_batch_size=n_test, log_every=max(1, args.steps // args.curve_points),
                    checkpoint_every=0, seed=seed, threads=args.threads)
                result, model, task_s, seconds, cpu = train_and_load(config)
                metrics = task_s.score(model, "test")
                runs[ds][label].append({
                    "seed": seed, **{f"test_{k}": v for k, v in metrics.items()}, "params": result.params,
                    "curve": [(h["step"], h["val_accuracy"]) for h in result.history if "val_accuracy" in h],
                    "train_seconds": seconds, "cpu_seconds": cpu})
                cpu_total += cpu
        runs[ds][ROCKET_LABEL] = [run_rocket(task, args.rocket_kernels, seed) for seed in seeds]
        cpu_total += sum(r["cpu_seconds"] for r in runs[ds][ROCKET_LABEL])
        notes.append(f"{ds}: {n_train} training and {n_test} test series, {task.sensors} sensors, "
                     f"padded to {task.length} steps, {task.num_classes} classes "
                     f"({args.steps * args.batch_size / n_train:.0f} epochs of the training set).")

    # --- tables and verdict ------------------------------------------------------------------------
    headers = ["model", "params"] + [f"{ds} {m}" for ds in datasets for m in ("acc %", "macro-F1 %", "MCC %")]
    rows = []
    for label in list(VARIANTS) + [ROCKET_LABEL]:
        params = [runs[ds][label][0]["params"] for ds in datasets]          # the same for every seed
        row = [label, " / ".join(f"{p:,}" for p in params)]
        for ds in datasets:
            rs = runs[ds][label]
            row += [_cell([r["test_accuracy"] for r in rs]), _cell([r["test_macro_f1"] for r in rs]),
                    _cell([r["test_mcc"] for r in rs])]
        rows.append(row)
    table = Table(f"Test split of the UEA archive, mean ± std over {len(seeds)} seeds "
                  f"({args.steps} steps of {args.batch_size}, the last model; params per dataset in order)",
                  headers, rows)

    def acc(ds, label):
        return [r["test_accuracy"] for r in runs[ds][label]]

    def spread(a, b):
        return max(0.01, math.hypot(_mean_std(a)[1], _mean_std(b)[1]))

    verdict_rows, matches, helps = [], {}, {}
    for ds in datasets:
        tap = acc(ds, "L-SFAN TAP (mhsa)")
        best = max(BASELINES, key=lambda b: _mean_std(acc(ds, b))[0])
        gap = _mean_std(tap)[0] - _mean_std(acc(ds, best))[0]
        matches[ds] = gap >= -spread(tap, acc(ds, best))
        plain = acc(ds, "TAP, no attention")
        gain = _mean_std(tap)[0] - _mean_std(plain)[0]
        helps[ds] = gain > spread(tap, plain)
        verdict_rows.append([ds, best, f"{100 * gap:+.1f} (spread {100 * spread(tap, acc(ds, best)):.1f})",
                             "yes" if matches[ds] else "no",
                             f"{100 * gain:+.1f} (spread {100 * spread(tap, plain):.1f})", "yes" if helps[ds] else "no"])
    verdict_table = Table("Verdict per dataset (accuracy, pp)", ["dataset", "better baseline", "TAP - baseline",
                                                                 "TAP matches", "TAP - TAP without attention",
                                                                 "attention helps"], verdict_rows)
    n_match, n_help = sum(matches.values()), sum(helps.values())
    if n_match == len(datasets) and n_help >= 1:
        verdict = "holds"
    elif n_match >= 1:
        verdict = "partly"
    else:
        verdict = "does not hold"

    reference = Table(
        "Published reference accuracies",
        ["dataset", "published accuracy", "source"],
        [[ds, "not available offline",
          "the aeon wheel ships the data but no results (its published-results loaders download them at run "
          "time); the ROCKET paper reports univariate UCR sets only"] for ds in datasets])

    # --- figure and budget ---------------------------------------------------------------------------
    curves = {f"{ds}: {label}": [[(s, 100 * a) for s, a in r["curve"]] for r in runs[ds][label]]
              for ds in datasets for label in ("L-SFAN TAP (mhsa)", "TAP, no attention", "1-D CNN (FCN)")}
    figure = curve_figure(Path(args.out) / "lsfan_curves.png", curves,
                          ylabel="test accuracy (%)", title=f"lsfan: {args.steps} steps of {args.batch_size}")
    tails = " ".join(flattening(f"{ds} L-SFAN TAP", [[(s, 100 * a) for s, a in r["curve"]]
                                                    for r in runs[ds]["L-SFAN TAP (mhsa)"]],
                                higher_is_better=True, threshold=1.0) for ds in datasets)
    budget = (f"{args.steps} AdamW steps of batch {args.batch_size} (lr {args.lr}, warm-up {args.warmup}, cosine to "
              f"10%, weight decay 0.01) for every network and seed; ROCKET uses {args.rocket_kernels:,} kernels. {tails} "
              f"(test accuracy in %, mean over seeds; 'flattened' = under 1 pp over the last quarter; the curves are "
              f"shown only, the reported numbers are the last model's.) Total {cpu_total / 60:.1f} CPU minutes on "
              f"{args.threads} thread(s).")

    summary_bits = []
    for ds in datasets:
        m = {label: _mean_std(acc(ds, label))[0] for label in list(VARIANTS) + [ROCKET_LABEL]}
        summary_bits.append(f"{ds}: TAP {100 * m['L-SFAN TAP (mhsa)']:.1f}%, SAP {100 * m['L-SFAN SAP (mhsa)']:.1f}%, "
                            f"TAP without attention {100 * m['TAP, no attention']:.1f}%, 1-D CNN "
                            f"{100 * m['1-D CNN (FCN)']:.1f}%, ROCKET {100 * m[ROCKET_LABEL]:.1f}%")
    summary = ("Test accuracy over the seeds: " + "; ".join(summary_bits) + ". " +
               f"L-SFAN TAP matches the better baseline on {n_match} of {len(datasets)} set(s); its attention layer "
               f"helps beyond the seeds' spread on {n_help}.")
    notes += [
        "Verdict rule: per dataset, TAP matches the baselines when its mean accuracy is at least the better "
        "baseline's (1-D CNN or ROCKET) minus the spread sqrt(std_a^2 + std_b^2) (at least 1 pp); attention "
        "helps when TAP beats TAP-without-attention by more than that spread. holds = matches on every set and "
        "helps on at least one; partly = matches on at least one; else does not hold.",
        "Not comparable with the paper: it reports EmoPain (access-restricted) with leave-one-subject-out "
        "cross-validation and class-weighted cross-entropy, Adam lr 1e-3, batch 40; here the UEA archive's "
        "fixed split, plain cross-entropy and attnlab's AdamW schedule. L-SFAN's widths are the paper's; "
        f"heads = {args.heads} (the paper's 5 needs width 30), feed-forward = {args.mlp_ratio:g} x token width "
        f"(paper: 30 = d_model), dropout {args.dropout}.",
        "SAP is a mean over sensors (the paper's spatial pooling), and SAP with attention is ours: the code "
        "has CNN_SAP without attention only, and its AdaptiveAvgPool2d((1, H)) actually averages over time and "
        "resamples the sensor axis (see attnlab.models.lsfan). SAP's token width is the pooled time T' (22 "
        "for BasicMotions, 4 for JapaneseVowels).",
        "Budget chosen on the hold-out before the documented run: 300 (BasicMotions) and 600 (JapaneseVowels) "
        "steps of 32 at lr 3e-3 had every network fitting its training series; 600 is used for both.",
        "Nothing is selected on the test split: one fixed budget, chosen beforehand on a 25% stratified "
        "hold-out of the training series (task option holdout=0.25), the last model reported. The learning "
        "curves are test accuracy along training, for reading only.",
        "JapaneseVowels series (7..29 steps) are standardised per sensor with training statistics and "
        "zero-padded at their end to 29; L-SFAN, the 1-D CNN and ROCKET all see the padded series.",
        "ROCKET: multivariate kernels as in sktime/aeon's Rocket (written here, not their code), ppv and max "
        "features, features scaled by their train std, ridge with leave-one-out alpha over logspace(-3, 3, 10) "
        "(checked against sklearn's RidgeClassifierCV in the tests). Its seeds draw different kernels.",
    ]
    if args.quick:
        notes.append("--quick: a smoke run (4 steps, 2 seeds, 40 ROCKET kernels); its numbers mean nothing.")
    return Report(verdict=verdict, summary=summary, tables=[table, verdict_table, reference], notes=notes,
                  figures=[figure], budget=budget,
                  data={"datasets": datasets, "seeds": seeds, "runs": runs, "args": {
                      k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})


CLAIM = Claim(
    name="lsfan",
    paper="L-SFAN: Lightweight Spatially-focused Attention Network for Pain Behavior Detection (2024)",
    statement=("A small CNN with oriented (temporal) average pooling and one multi-head self-attention layer over "
               "its 16 channel tokens (about 8.3k parameters at the paper's input) is a competitive lightweight "
               "multivariate time-series classifier, and its attention layer adds over the pooled CNN alone."),
    add_arguments=add_arguments, run=run, url="https://arxiv.org/abs/2406.16913 (code: https://github.com/jortigoso/LSFAN)")
