"""Multivariate time-series classification on UEA archive sets shipped inside the aeon wheel (offline).

    task = create_task("uea", dataset="BasicMotions")          # 6 sensors x 100 steps, 4 classes
    task = create_task("uea", dataset="JapaneseVowels")        # 12 x 7..29 steps (padded to 29), 9 classes
    model = task.build_model(64, 2, ["mhsa"], pooling="tap")   # L-SFAN (attnlab.models.lsfan)
    attnlab train --task uea --task-option dataset=BasicMotions --layers mhsa --heads 2 --mlp-ratio 1

Data: the archive's own .ts files (`<Name>_TRAIN.ts`, `<Name>_TEST.ts`) from aeon's
`aeon/datasets/data/<Name>/`, parsed here (aeon is never imported, so none of its dependencies is
needed; `pip install --no-deps aeon` is enough). Where the files are looked for:
    1. the `root=` option (a folder holding <Name>/<Name>_TRAIN.ts, or the two files themselves)
    2. the ATTNLAB_UEA environment variable (the same)
    3. the installed aeon package's datasets/data folder (found without importing aeon)

Splits: the archive's official train/test split. With `holdout=0` (default) the val split IS the
archive's test split (the claim trains a fixed budget and reports the last model, selecting
nothing on it). With `holdout=f` a stratified fraction f of each class's training series (fixed
permutation, seed 0, independent of the task seed) becomes the val split, the rest trains, and the
test split is still reachable through `arrays("test")` for a final report.

Pre-processing, fitted on the training series only (after the holdout is taken out):
- per-sensor standardisation: the mean and std over every time step of every training series;
- variable lengths (JapaneseVowels, 7..29 steps): each series is zero-padded at its end to
  `length` (default: the archive's maximum for the set, 29; 100 for BasicMotions), after
  standardisation, so padding sits at the training mean; a longer series is truncated to its
  first `length` steps. No mask goes to the model (L-SFAN has none); `lengths` are in the batch.

batch = {"inputs": (B, T, S) float32, "targets": (B,) int64, "lengths": (B,) int64}. Train
batches draw series uniformly with replacement from the task's generator; val batch i is the
fixed slice [i*B, (i+1)*B) of the val series (wrapping). Classes are numbered in the order of
the file's @classLabel line. quality = accuracy; `classification_metrics` adds macro-F1 and MCC.

Models (`build_model(dim, num_heads, layers, **options)`):
- network="lsfan" (default): attnlab.models.LSFAN with one encoder layer per entry of `layers`
  (a mechanism name or dict each; the paper has one), `pooling` "tap" | "sap", `attention=False`
  for the no-attention ablation (then `layers` is not used), feed-forward width
  round(mlp_ratio * token width) (the paper's is mlp_ratio = 1), `dropout` (0.2). The token width
  is set by the data (sensors for TAP, pooled time for SAP), so `dim` is not used; `num_heads`
  must divide that width.
- network="fcn": `FCNBaseline`, a plain 1-D CNN after Wang, Yan & Oates (2017, "Time series
  classification from scratch with deep neural networks") at reduced width: conv 8/5/3 with
  `dim`, 2*dim, dim channels, BN, ReLU, global average pooling over time, linear head. No attention:
  `layers` and `num_heads` are not used.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.lsfan import LSFAN
from attnlab.tasks import Batch, Task, register_task

ENV_VAR = "ATTNLAB_UEA"
# name -> (sensors, default padded length = the archive's maximum, classes)
DATASETS = {"BasicMotions": (6, 100, 4), "JapaneseVowels": (12, 29, 9)}
HOLDOUT_SEED = 0
NETWORKS = ("lsfan", "fcn")

_CACHE: dict[str, tuple] = {}      # per process: file path -> parsed (series, labels, class names)


# --- the .ts format --------------------------------------------------------------------------------

def read_ts(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
    """Parse a UEA/UCR .ts file: (series, labels, class names).

    series[i] is a float64 array (S, T_i); labels are int64 indices into the @classLabel names (in
    the file's order). Header lines start with '@', comments with '#'; after @data each line is
    the S dimensions separated by ':', each a comma-separated list of values, then the label.
    Missing values ('?' or NaN) and timestamped files are rejected with a clear error.
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _CACHE:
        return _CACHE[key]
    classes: tuple[str, ...] | None = None
    dimensions: int | None = None
    series: list[np.ndarray] = []
    labels: list[int] = []
    in_data = False
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise ValueError(f"{path}:{number}: expected a '@' header line before @data, got {line[:60]!r}")
                tag, _, rest = line[1:].partition(" ")
                tag = tag.lower()
                if tag == "data":
                    in_data = True
                    if classes is None:
                        raise ValueError(f"{path}: no '@classLabel true ...' line before @data (not a classification file)")
                elif tag == "classlabel":
                    words = rest.split()
                    if not words or words[0].lower() != "true" or len(words) < 2:
                        raise ValueError(f"{path}:{number}: expected '@classLabel true <names...>', got {line!r}")
                    classes = tuple(words[1:])
                elif tag == "dimensions":
                    dimensions = int(rest)
                elif tag == "timestamps" and rest.strip().lower() == "true":
                    raise NotImplementedError(f"{path}: timestamped .ts files are not supported")
                continue
            parts = line.split(":")
            label, dims = parts[-1].strip(), parts[:-1]
            if classes is not None and label not in classes:
                raise ValueError(f"{path}:{number}: label {label!r} is not one of the @classLabel names {classes}")
            if dimensions is not None and len(dims) != dimensions:
                raise ValueError(f"{path}:{number}: expected {dimensions} dimensions, got {len(dims)}")
            try:
                rows = [np.array([math.nan if v.strip() == "?" else float(v) for v in d.split(",")], dtype=np.float64)
                        for d in dims]
            except ValueError as e:
                raise ValueError(f"{path}:{number}: a value is not a number ({e})") from None
            if len({len(r) for r in rows}) != 1:
                raise ValueError(f"{path}:{number}: the dimensions have different lengths {[len(r) for r in rows]}")
            array = np.stack(rows)                                               # (S, T_i)
            if not np.isfinite(array).all():
                raise NotImplementedError(f"{path}:{number}: missing values are not supported")
            series.append(array)
            labels.append(classes.index(label))
    if not in_data or not series:
        raise ValueError(f"{path}: no @data section with series")
    result = (series, np.asarray(labels, dtype=np.int64), classes)
    _CACHE[key] = result
    return result


def find_files(dataset: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(<dataset>_TRAIN.ts, <dataset>_TEST.ts), or a FileNotFoundError saying how to get them."""
    if root is not None:
        candidates, origin = [Path(root).expanduser()], f"root={str(root)!r}"
    elif os.environ.get(ENV_VAR):
        candidates, origin = [Path(os.environ[ENV_VAR]).expanduser()], f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    else:
        spec = importlib.util.find_spec("aeon")            # locates the package without importing it
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(f) / "datasets" / "data" for f in folders]
        origin = "the installed aeon package" if folders else "aeon (not installed)"
    for base in candidates:
        for folder in (base / dataset, base):
            train, test = folder / f"{dataset}_TRAIN.ts", folder / f"{dataset}_TEST.ts"
            if train.is_file() and test.is_file():
                return train, test
    where = ", ".join(str(c) for c in candidates) or "nowhere"
    raise FileNotFoundError(
        f"uea: {origin} ({where}) has no {dataset}_TRAIN.ts / {dataset}_TEST.ts. Install the aeon wheel, which "
        f"ships them (`pip install --no-deps aeon`, as scripts/setup.sh does), or set {ENV_VAR} (or the task "
        f"option root=) to a folder holding {dataset}/{dataset}_TRAIN.ts and _TEST.ts.")


def standardise_and_pad(series: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray,
                        length: int) -> tuple[np.ndarray, np.ndarray]:
    """Series (S, T_i) -> ((n, length, S) float32 standardised, zero-padded at the end / truncated,
    (n,) int64 original lengths)."""
    out = np.zeros((len(series), length, len(mean)), dtype=np.float32)
    lengths = np.zeros(len(series), dtype=np.int64)
    for i, s in enumerate(series):
        t = min(s.shape[1], length)
        out[i, :t] = ((s[:, :t] - mean[:, None]) / std[:, None]).T               # (t, S)
        lengths[i] = s.shape[1]
    return out, lengths


# --- metrics ---------------------------------------------------------------------------------------

def classification_metrics(predictions: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """accuracy, macro-F1 (mean over all classes of 2PR/(P+R), 0 for a class never predicted nor
    present) and the multiclass Matthews correlation (Gorodkin 2004, sklearn's matthews_corrcoef)."""
    if predictions.shape != targets.shape or predictions.dim() != 1:
        raise ValueError(f"expected predictions and targets of one shape (n,), got {tuple(predictions.shape)} "
                         f"and {tuple(targets.shape)}")
    p, t = predictions.long().cpu(), targets.long().cpu()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    confusion.index_put_((t, p), torch.ones(len(t), dtype=torch.float64), accumulate=True)   # [true, pred]
    tp = confusion.diag()
    predicted, actual, n = confusion.sum(0), confusion.sum(1), confusion.sum()
    denom = predicted + actual
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(tp))
    correct = tp.sum()
    cov_ytyp = correct * n - (actual * predicted).sum()
    cov_ypyp = n * n - (predicted * predicted).sum()
    cov_ytyt = n * n - (actual * actual).sum()
    mcc = float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp)) if cov_ytyt * cov_ypyp > 0 else 0.0
    return {"accuracy": float(correct / n), "macro_f1": float(f1.mean()), "mcc": mcc}


# --- the plain baseline ----------------------------------------------------------------------------

class FCNBaseline(nn.Module):
    """A small fully-convolutional 1-D CNN (after Wang et al. 2017's FCN): x (B, T, S) -> (B, classes).

    conv(k=8, width) - BN - ReLU - conv(k=5, 2 width) - BN - ReLU - conv(k=3, width) - BN - ReLU,
    'same' padding, then the mean over time and a linear head. Wang et al. use 128/256/128.
    """

    def __init__(self, num_classes: int, sensors: int, width: int = 32):
        super().__init__()
        widths = (width, 2 * width, width)
        layers: list[nn.Module] = []
        c = sensors
        for w, k in zip(widths, (8, 5, 3)):
            # 'same' padding written out ((k-1)//2 left, k//2 right, as Keras does for the even k = 8)
            layers += [nn.ConstantPad1d(((k - 1) // 2, k // 2), 0.0), nn.Conv1d(c, w, k), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x.transpose(1, 2))                                         # (B, S, T) -> (B, width, T)
        return self.head(h.mean(-1))                                             # (B, width) -> (B, classes)


# --- the task --------------------------------------------------------------------------------------

@register_task
class UEA(Task):
    name = "uea"
    kind = "classify"
    quality = "accuracy"
    higher_is_better = True
    causal = False
    description = "UEA multivariate time series (BasicMotions, JapaneseVowels) from the aeon wheel, offline (accuracy)"

    def __init__(self, seed: int = 0, *, dataset: str = "BasicMotions", length: int | None = None,
                 holdout: float = 0.0, root: str | None = None):
        super().__init__(seed)
        if dataset not in DATASETS:
            raise ValueError(f"uea: dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        sensors, default_length, classes = DATASETS[dataset]
        length = default_length if length is None else length
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"uea: length must be a positive int or None, got {length!r}")
        if not (isinstance(holdout, (int, float)) and not isinstance(holdout, bool) and 0.0 <= holdout < 1.0):
            raise ValueError(f"uea: holdout must be a fraction in [0, 1), got {holdout!r}")
        self.dataset, self.length, self.holdout, self.root = dataset, length, float(holdout), root
        self.sensors, self.num_classes = sensors, classes
        train_file, test_file = find_files(dataset, root)
        train_series, train_y, names = read_ts(train_file)
        test_series, test_y, test_names = read_ts(test_file)
        if names != test_names or len(names) != classes:
            raise ValueError(f"uea: {dataset}: class names differ between the files or from the expected "
                             f"{classes} classes: {names} vs {test_names}")
        if train_series[0].shape[0] != sensors:
            raise ValueError(f"uea: {dataset}: expected {sensors} dimensions, the file has {train_series[0].shape[0]}")
        self.class_names = names
        fit_rows = np.arange(len(train_series))
        val_rows = np.zeros(0, dtype=np.int64)
        if self.holdout > 0:
            order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train_series))
            held = []
            for c in range(classes):
                rows = order[train_y[order] == c]
                held.extend(rows[:int(round(self.holdout * len(rows)))].tolist())
            val_rows = np.array(sorted(held), dtype=np.int64)
            fit_rows = np.setdiff1d(fit_rows, val_rows)
            if len(val_rows) == 0 or len(fit_rows) == 0:
                raise ValueError(f"uea: holdout={holdout} leaves {len(fit_rows)} training and {len(val_rows)} "
                                 "held-out series; choose a fraction that keeps both non-empty")
        fit = [train_series[i] for i in fit_rows]
        steps = np.concatenate([s for s in fit], axis=1)                            # (S, total steps)
        self.mean, self.std = steps.mean(1), steps.std(1)                           # (S,) each
        if (self.std <= 0).any():
            raise ValueError(f"uea: {dataset}: a sensor is constant over the training series; cannot standardise")
        parts = {"train": ([train_series[i] for i in fit_rows], train_y[fit_rows]),
                 "test": (test_series, test_y)}
        if self.holdout > 0:
            parts["val"] = ([train_series[i] for i in val_rows], train_y[val_rows])
        self._inputs: dict[str, Tensor] = {}
        self._targets: dict[str, Tensor] = {}
        self._lengths: dict[str, Tensor] = {}
        for split, (series, y) in parts.items():
            x, lengths = standardise_and_pad(series, self.mean, self.std, length)
            self._inputs[split] = torch.from_numpy(x)                               # (n, T, S)
            self._targets[split] = torch.from_numpy(y)                              # (n,)
            self._lengths[split] = torch.from_numpy(lengths)                        # (n,)
        if self.holdout == 0:
            for store in (self._inputs, self._targets, self._lengths):
                store["val"] = store["test"]
        self.truncated = {s: int((v > length).sum()) for s, v in self._lengths.items()}

    # -- data ---------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.length

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "dataset": self.dataset, "length": self.length, "holdout": self.holdout,
                "root": self.root}

    def num_examples(self, split: str) -> int:
        if split not in self._targets:
            raise ValueError(f"split must be one of {tuple(self._targets)}, got {split!r}")
        return len(self._targets[split])

    def arrays(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole split as (inputs (n, T, S) float32, targets (n,) int64); split in train, val, test."""
        self.num_examples(split)
        return self._inputs[split], self._targets[split]

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        rows = self.example_rows(split, index, batch_size, self.num_examples(split))      # (B,)
        return {"inputs": self._inputs[split][rows], "targets": self._targets[split][rows],
                "lengths": self._lengths[split][rows]}

    # -- model and loss -----------------------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, network: str = "lsfan",
                    pooling: str = "tap", attention: bool = True, mlp_ratio: float = 1.0, dropout: float = 0.2,
                    **unknown) -> nn.Module:
        if unknown:
            raise ValueError(f"uea: unknown model option(s) {sorted(unknown)} (options: network, pooling, attention, "
                             "mlp_ratio, dropout)")
        if network not in NETWORKS:
            raise ValueError(f"uea: network must be one of {NETWORKS}, got {network!r}")
        if network == "fcn":
            return FCNBaseline(self.num_classes, self.sensors, width=dim)
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["mhsa"] * layers
        if not isinstance(attention, bool):
            raise ValueError(f"uea: attention must be true or false, got {attention!r}")
        probe = LSFAN(self.num_classes, length=self.length, sensors=self.sensors, pooling=pooling, attention=None)
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"uea: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        return LSFAN(self.num_classes, length=self.length, sensors=self.sensors, num_heads=num_heads,
                     pooling=pooling, attention=list(layers) if attention else None, num_layers=len(layers),
                     dim_feedforward=max(1, int(round(mlp_ratio * probe.width))), dropout=dropout)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])                                               # (B, classes)
        targets = batch["targets"]
        if logits.shape != (targets.shape[0], self.num_classes):
            raise ValueError(f"uea: expected logits ({targets.shape[0]}, {self.num_classes}), got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "accuracy": accuracy}

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str = "test", *, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """(predicted classes, targets) over a whole split, the model in eval mode (restored after)."""
        inputs, targets = self.arrays(split)
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            preds = [model(inputs[i:i + batch_size].to(device)).argmax(-1).cpu()
                     for i in range(0, len(inputs), batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(preds), targets

    def score(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """accuracy, macro-F1 and MCC of `model` over a whole split."""
        return classification_metrics(*self.predict(model, split), self.num_classes)


__all__ = ["UEA", "FCNBaseline", "read_ts", "find_files", "standardise_and_pad", "classification_metrics",
           "DATASETS", "ENV_VAR"]
