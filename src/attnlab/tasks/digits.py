"""Handwritten digits classification from patch tokens (scikit-learn's `load_digits`, UCI optdigits).

1,797 grey 8x8 images (pixel values 0..16) of the digits 0-9, shipped inside scikit-learn, so
this task needs no download: the image task that always exists. A fixed permutation (seed 0,
independent of the task seed) puts 80% (1,437 images) in the train split and 20% (360) in the
val split. With patch=2 each image is 16 tokens of 4 pixels. quality = accuracy.
"""
from __future__ import annotations

import numpy as np

from attnlab.tasks import register_task
from attnlab.tasks._images import ImageClassTask

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8

_ARRAYS: dict[str, tuple[np.ndarray, ...]] = {}     # per-process cache


def load_digits_split() -> tuple[np.ndarray, ...]:
    """(train_images (1437, 8, 8) uint8, train_labels, val_images (360, 8, 8), val_labels), cached."""
    if "digits" not in _ARRAYS:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits task needs scikit-learn: pip install scikit-learn "
                              "(or re-run scripts/setup.sh)") from e
        data = load_digits()
        images = data.images.astype(np.uint8)                                   # (1797, 8, 8), 0..16
        labels = data.target.astype(np.int64)                                   # (1797,)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        cut = int(len(images) * TRAIN_FRACTION)
        train, val = order[:cut], order[cut:]
        _ARRAYS["digits"] = (images[train], labels[train], images[val], labels[val])
    return _ARRAYS["digits"]


@register_task
class Digits(ImageClassTask):
    name = "digits"
    description = "sklearn digits, 10 classes, 8x8 images as patch tokens, fixed 80/20 split (accuracy)"
    image_size = 8
    pixel_max = 16.0
    num_classes = 10
    default_patch = 2

    def __init__(self, seed: int = 0, *, patch: int = 2, train_size: int | None = None):
        super().__init__(seed, patch=patch, train_size=train_size)

    def _load_arrays(self):
        return load_digits_split()
