"""Fashion-MNIST classification from patch tokens (Xiao, Rasul & Vollgraf, 2017).

28x28 grey images of 10 clothing classes: 60,000 train (the train split) and 10,000 test
(the val split). With patch=4 each image is 49 tokens of 16 pixels, standardised with the
train-set pixel mean and std; a mean-pooled `Classifier` reads them. quality = accuracy.

Where the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; plain or gzipped) are looked for:
    1. the `root=` option
    2. the ATTNLAB_FASHION_MNIST environment variable
    3. /usr/share/datasets/fashion-mnist (Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist`)
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from attnlab.tasks import register_task
from attnlab.tasks._images import ImageClassTask

ENV_VAR = "ATTNLAB_FASHION_MNIST"
SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "val_images": "t10k-images-idx3-ubyte", "val_labels": "t10k-labels-idx1-ubyte"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")

# Per-process cache: resolved root -> (train_images, train_labels, val_images, val_labels).
_ARRAYS: dict[str, tuple[np.ndarray, ...]] = {}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz) -> uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files, or a FileNotFoundError saying how to get them."""
    if root is not None:
        where, origin = Path(root).expanduser(), f"root={str(root)!r}"
    elif os.environ.get(ENV_VAR):
        where, origin = Path(os.environ[ENV_VAR]).expanduser(), f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    else:
        where, origin = SYSTEM_ROOT, "the default location"
    missing = [name for name in FILES.values()
               if not (where / f"{name}.gz").is_file() and not (where / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"fashion_mnist: {origin} ({where}) lacks {', '.join(n + '[.gz]' for n in missing)}. "
            f"Install the data with `sudo apt-get install dataset-fashion-mnist` (files land in {SYSTEM_ROOT}), "
            f"or set {ENV_VAR} (or the task option root=) to a folder with the four IDX files, "
            "or use `--task digits`, which needs no download.")
    return where


def load_fashion_mnist(root: Path) -> tuple[np.ndarray, ...]:
    """(train_images (60000, 28, 28) uint8, train_labels (60000,), val_images, val_labels), cached."""
    key = str(root.resolve())
    if key not in _ARRAYS:
        arrays = {}
        for part, name in FILES.items():
            file = root / f"{name}.gz"
            arrays[part] = read_idx(file if file.is_file() else root / name)
        for split in ("train", "val"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
                raise ValueError(f"fashion_mnist: {split} files in {root} hold images {images.shape} and labels "
                                 f"{labels.shape}; expected (n, 28, 28) and (n,)")
            if labels.max(initial=0) >= len(CLASSES):
                raise ValueError(f"fashion_mnist: {split} labels in {root} exceed {len(CLASSES) - 1}")
        _ARRAYS[key] = tuple(arrays[part] for part in FILES)
    return _ARRAYS[key]


@register_task
class FashionMNIST(ImageClassTask):
    name = "fashion_mnist"
    description = "Fashion-MNIST, 10 classes, 28x28 images as patch tokens (test-set accuracy)"
    image_size = 28
    pixel_max = 255.0
    num_classes = 10
    default_patch = 4

    def __init__(self, seed: int = 0, *, patch: int = 4, train_size: int | None = None, root: str | None = None):
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a str or None, got {type(root).__name__}")
        self.root_option = None if root is None else str(root)   # saved as given: None = look it up
        self.root = find_root(root)
        super().__init__(seed, patch=patch, train_size=train_size)

    def _load_arrays(self):
        return load_fashion_mnist(self.root)

    def options(self) -> dict:
        return {**super().options(), "root": self.root_option}
