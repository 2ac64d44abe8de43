"""The probes' default inputs: tinyshakespeare text and sample photographs, found offline."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def default_text_path() -> Path:
    """The tinyshakespeare file the probes read when given none: attnlab._data's lookup
    ($ATTNLAB_TINYSHAKESPEARE, then ../shared/data/tinyshakespeare/input.txt from the current
    directory or the repository root); the repository-relative path when none exists."""
    from attnlab._data import DEFAULT_RELATIVE, REPO_ROOT, find_corpus

    try:
        return find_corpus(None)
    except FileNotFoundError:
        return (REPO_ROOT / DEFAULT_RELATIVE).resolve()


def read_text(path: str | Path | None = None) -> str:
    """The probes' text: `path`, else tinyshakespeare found as the tinyshakespeare task finds it."""
    from attnlab._data import find_corpus

    try:
        found = find_corpus(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the probes: pass text_path=, the CLI's --text, to read another file)") from None
    return found.read_text(encoding="utf-8")


def sample_images(n: int = 4, *, seed: int = 0) -> tuple[list[np.ndarray], list[str], str]:
    """Up to n RGB uint8 images, their names and where they came from: skimage.data (astronaut, chelsea,
    coffee, rocket) when installed; else the photographs shipped inside scikit-learn (china,
    flower) and matplotlib (grace_hopper); else synthetic images (smooth blobs and stripes)."""
    import importlib.util
    if importlib.util.find_spec("skimage") is not None:
        from skimage import data
        names = ["astronaut", "chelsea", "coffee", "rocket"][:n]
        return [np.asarray(getattr(data, k)())[..., :3] for k in names], names, "skimage.data: " + ", ".join(names)
    images, names = [], []
    try:
        from sklearn.datasets import load_sample_images
        bunch = load_sample_images()
        images += [np.asarray(im) for im in bunch.images]
        names += [Path(f).stem for f in bunch.filenames]
    except Exception:                                               # scikit-learn or Pillow absent
        pass
    try:
        import matplotlib
        import matplotlib.image
        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if path.is_file():
            images.append(np.asarray(matplotlib.image.imread(path))[..., :3])
            names.append("grace_hopper")
    except Exception:
        pass
    if images:
        return images[:n], names[:n], "photographs bundled with scikit-learn/matplotlib: " + ", ".join(names[:n])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    out = []
    for _ in range(n):
        img = np.zeros((224, 224, 3))
        for _ in range(6):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
            img += rng.uniform(0, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
        img += 0.3 * np.sin(2 * np.pi * rng.uniform(2, 8) * (xx + rng.uniform(0, 1) * yy))[..., None]
        out.append((255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8))
    return out, [f"synthetic{i}" for i in range(n)], f"synthetic (seed {seed}): install scikit-image for its sample photographs"


def token_window(tokenizer, text: str, n: int, *, bos: int | None = None, what: str = "probe"):
    """(1, n) int64 token ids of the start of `text`, with `bos` (default: the tokenizer's
    bos_token_id, if any) first when the tokenizer did not put it there. Raises ValueError when the
    text is too short."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    b = bos if bos is not None else getattr(tokenizer, "bos_token_id", None)
    if b is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != int(b)):
        ids = torch.cat([torch.tensor([[int(b)]]), ids], 1)
    if ids.shape[1] < n:
        raise ValueError(f"{what}: the text gives {ids.shape[1]} tokens, fewer than the {n} needed")
    return ids[:, :n]


__all__ = ["default_text_path", "read_text", "sample_images", "token_window"]
