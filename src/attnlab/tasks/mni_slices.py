"""Brain-tissue segmentation on slices of the MNI ICBM152 template (or on synthetic shapes).

The only real segmentation sample that installs offline: the MNI ICBM152 2009a nonlinear symmetric
template (Fonov et al. 2009/2011) with its grey- and white-matter probability maps, shipped inside the
nilearn wheel as `nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`
(197 x 233 x 189 voxels of 1 mm). nilearn is never imported: the folder is found with
importlib.util.find_spec (or $ATTNLAB_MNI, or the `root=` option) and the files are read by
`read_nifti` below (gzip + numpy, NIfTI-1 only), so `pip install --no-deps nilearn` is enough.

source="mni" (default):
- Every slice is zero-padded to a 233 x 233 mm square (the volume's largest side, centred) and
  resized to `size` x `size` (area averaging; default 64, i.e. 3.64 mm pixels: sized for CPU budgets).
- input = the T1 intensity divided by its 99.5th percentile over the head (voxels > 0) and clipped
  to [0, 1.5]; the probability maps are stored as uint8 0..255 and divided by 255; label = 0 (background) where both resized probabilities are below `threshold`
  (default 0.5), else 1 (GM) or 2 (WM), whichever probability is larger.
- Axial slices (z) with at least 1% tissue pixels. They are cut into contiguous slabs of `slab`
  slices (default 12); every `val_every`-th slab (default 4, starting with the second) is held out
  (split "val"), and the `gap` slices (default 2) on either side of a held-out slab are used by
  neither split, so no train slice is adjacent to a val slice.
- `coronal_slices()`: the coronal (y) slices with at least 1% tissue, every `coronal_stride`-th
  (default 2): a second test in another orientation. They cut through the same single brain whose
  axial slices are trained on (one template, one subject), so they measure transfer to an unseen
  orientation, not to unseen anatomy; `coronal_slices(held_out_rows=True)` also returns a mask of
  the rows whose z lies in a held-out slab.

source="shapes": `size` x `size` images of low-pass textured noise with 2-5 random ellipses (class 1),
rectangles (2) and triangles (3), each with its own texture and a random intensity offset of either
sign (so the class is the shape, not the brightness); later shapes occlude earlier ones.

Augmentation (train split, `augment=True`): a left-right flip (p = 0.5), a small affine (rotation
±10°, scale 0.9-1.1, shift ±5% of the side; bilinear for the image, nearest for the labels),
intensity gain 0.9-1.1, bias ±0.05 and Gaussian noise (std 0.02). Train batches draw slices
uniformly; val batches walk the held-out slices in order (batch i holds slices i B .. i B + B - 1,
cycling), un-augmented; `evaluate` pools Dice over the slices of its batches and counts each held-out
slice once. Every batch is a pure function of (options, seed, split, index).

batch = {"inputs": (B, 1, size, size) float32, "labels": (B, size, size) int64}. The model is MSGA
(attnlab.models.msga, block option model="msga", the default) or the plain U-Net baseline
(model="unet"); layers name MSGA's position and channel attention ([] or guided=False: the
unguided ablation). quality = "dice": the mean Dice over the foreground classes (GM and WM; the
three shapes), with every class's Dice also reported (Dice 1 for a class absent from both).
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.msga import MSGA, MSGAOutput, msga_loss
from attnlab.models.transformer import parse_layer
from attnlab.models.unet import UNet
from attnlab.tasks import Batch, Task, register_task

ENV_VAR = "ATTNLAB_MNI"
FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
SOURCES = ("mni", "shapes")
CLASSES = {"mni": ("background", "GM", "WM"), "shapes": ("background", "ellipse", "rectangle", "triangle")}
SIDE = 233                  # the template's largest side (mm): every slice is padded to SIDE x SIDE
MIN_TISSUE = 0.01           # a slice is used when at least this fraction of its pixels is GM or WM

# NIfTI-1 datatype codes -> numpy dtypes (the common ones).
NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
                512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64}


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI-1 single-file image (.nii or .nii.gz) -> (float32 array in voxel order (i, j, k, ...), header).

    The 348-byte header gives dim (int16[8] at byte 40), datatype (int16 at 70), bitpix (72), pixdim
    (float32[8] at 76), vox_offset (float32 at 108), scl_slope / scl_inter (float32 at 112 / 116) and
    the magic "n+1" at 344; the byte order is that for which sizeof_hdr reads 348. Voxels are stored
    with the first index fastest (Fortran order). Values are scaled as slope * v + inter when the slope
    is finite and non-zero (the standard's rule)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 352:
        raise ValueError(f"read_nifti: {path} holds {len(raw)} bytes, fewer than a NIfTI-1 header (348 + 4)")
    order = None
    for candidate in ("<", ">"):
        if np.frombuffer(raw, dtype=f"{candidate}i4", count=1)[0] == 348:
            order = candidate
    if order is None:
        raise ValueError(f"read_nifti: {path} is not NIfTI-1 (sizeof_hdr is not 348 in either byte order; NIfTI-2 "
                         "and Analyze files are not supported)")
    magic = raw[344:348]
    if magic not in (b"n+1\x00", b"ni1\x00"):
        raise ValueError(f"read_nifti: {path} has magic {magic!r}, expected b'n+1\\x00'")
    if magic == b"ni1\x00":
        raise NotImplementedError(f"read_nifti: {path} is a two-file (.hdr/.img) NIfTI-1 pair; only single files")
    dim = np.frombuffer(raw, dtype=f"{order}i2", count=8, offset=40)
    datatype = int(np.frombuffer(raw, dtype=f"{order}i2", count=1, offset=70)[0])
    bitpix = int(np.frombuffer(raw, dtype=f"{order}i2", count=1, offset=72)[0])
    pixdim = np.frombuffer(raw, dtype=f"{order}f4", count=8, offset=76).astype(np.float64)
    vox_offset = float(np.frombuffer(raw, dtype=f"{order}f4", count=1, offset=108)[0])
    slope, inter = (float(v) for v in np.frombuffer(raw, dtype=f"{order}f4", count=2, offset=112))
    if not 1 <= dim[0] <= 7:
        raise ValueError(f"read_nifti: {path} has dim[0] = {dim[0]}, expected 1..7")
    if datatype not in NIFTI_DTYPES:
        raise NotImplementedError(f"read_nifti: {path} has datatype {datatype}; supported: {sorted(NIFTI_DTYPES)}")
    dtype = np.dtype(NIFTI_DTYPES[datatype]).newbyteorder(order)
    if dtype.itemsize * 8 != bitpix:
        raise ValueError(f"read_nifti: {path} has bitpix {bitpix}, datatype {datatype} needs {dtype.itemsize * 8}")
    shape = tuple(int(d) for d in dim[1:1 + dim[0]])
    count = int(np.prod(shape))
    start = int(vox_offset)
    if start < 352 or start + count * dtype.itemsize > len(raw):
        raise ValueError(f"read_nifti: {path}: vox_offset {vox_offset} and shape {shape} ({dtype}) do not fit its "
                         f"{len(raw)} bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape, order="F")
    data = data.astype(np.float32)
    if math.isfinite(slope) and slope != 0.0 and not (slope == 1.0 and inter == 0.0):
        data = data * np.float32(slope) + np.float32(inter)
    header = {"dim": shape, "datatype": datatype, "bitpix": bitpix, "pixdim": tuple(pixdim[1:1 + dim[0]]),
              "vox_offset": vox_offset, "scl_slope": slope, "scl_inter": inter}
    return data, header


def find_mni(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """{"t1", "gm", "wm": path} of the template files: in `root`, else $ATTNLAB_MNI, else the installed
    nilearn package's datasets/data folder (found without importing nilearn)."""
    if root is not None:
        folders, origin = [Path(root).expanduser()], f"root={str(root)!r}"
    elif os.environ.get(ENV_VAR):
        folders, origin = [Path(os.environ[ENV_VAR]).expanduser()], f"{ENV_VAR}={os.environ[ENV_VAR]!r}"
    else:
        spec = importlib.util.find_spec("nilearn")          # locates the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        folders = [Path(p) / "datasets" / "data" for p in locations]
        origin = "the installed nilearn package" if folders else "nilearn (not installed)"
    for folder in folders:
        paths = {kind: folder / name for kind, name in FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    where = ", ".join(str(f) for f in folders) or "no folder"
    raise FileNotFoundError(
        f"mni_slices: {origin} ({where}) lacks the MNI ICBM152 files {sorted(FILES.values())}. They ship inside the "
        f"nilearn wheel: `pip install --no-deps nilearn` (as scripts/setup.sh does), or set {ENV_VAR} (or the task "
        "option root=) to a folder holding them; source=shapes needs no files.")


def _resize(slices: np.ndarray, size: int) -> Tensor:
    """(N, h, w) float32 -> (N, size, size): zero-padded (centred) to SIDE x SIDE, then area-resized."""
    n, h, w = slices.shape
    top, left = (SIDE - h) // 2, (SIDE - w) // 2
    canvas = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    canvas[:, top:top + h, left:left + w] = slices
    return F.interpolate(torch.from_numpy(canvas)[:, None], size=(size, size), mode="area")[:, 0]


_VOLUMES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_SLICES: dict[tuple, dict[str, Tensor]] = {}


def load_volumes(paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1 normalised to [0, 1.5], gm, wm) as (x, y, z) float32 arrays; cached per process."""
    key = str(paths["t1"].resolve())
    if key not in _VOLUMES:
        t1, gm, wm = (read_nifti(paths[k])[0] for k in ("t1", "gm", "wm"))
        if not (t1.shape == gm.shape == wm.shape) or t1.ndim != 3:
            raise ValueError(f"mni_slices: the template volumes differ in shape: t1 {t1.shape}, gm {gm.shape}, "
                             f"wm {wm.shape}")
        scale = float(np.percentile(t1[t1 > 0], 99.5))
        # The "converted" files store the probabilities as uint8 0..255: back to [0, 1].
        gm, wm = (v / 255.0 if v.max() > 1.0 else v for v in (gm, wm))
        _VOLUMES[key] = (np.clip(t1 / scale, 0.0, 1.5).astype(np.float32), gm.astype(np.float32),
                         wm.astype(np.float32))
    return _VOLUMES[key]


def slice_stack(paths: dict[str, Path], axis: str, size: int, threshold: float) -> dict[str, Tensor]:
    """Every slice along `axis` ("axial": z, "coronal": y) as {"images" (N, size, size), "labels" (N, size,
    size) int64, "tissue" (N,) tissue fraction, "index" (N,) the slice's voxel index}; cached.

    Axial slices are shown as (y, x) with anterior up, coronal ones as (z, x) with superior up."""
    key = (str(paths["t1"].resolve()), axis, size, threshold)
    if key not in _SLICES:
        t1, gm, wm = load_volumes(paths)
        if axis == "axial":
            view = lambda v: np.ascontiguousarray(np.flip(np.transpose(v, (2, 1, 0)), 1))   # (z, y, x), y flipped
        elif axis == "coronal":
            view = lambda v: np.ascontiguousarray(np.flip(np.transpose(v, (1, 2, 0)), 1))   # (y, z, x), z flipped
        else:
            raise ValueError(f"mni_slices: axis must be 'axial' or 'coronal', got {axis!r}")
        images, p_gm, p_wm = _resize(view(t1), size), _resize(view(gm), size), _resize(view(wm), size)
        labels = torch.where(torch.maximum(p_gm, p_wm) < threshold, 0, torch.where(p_wm > p_gm, 2, 1))
        tissue = (labels > 0).float().mean((1, 2))
        _SLICES[key] = {"images": images, "labels": labels.long(), "tissue": tissue,
                        "index": torch.arange(images.shape[0])}
    return _SLICES[key]


def axial_split(indices: Sequence[int], slab: int, val_every: int, gap: int) -> tuple[list[int], list[int]]:
    """(train, val) slice indices: `indices` (sorted, contiguous) cut into slabs of `slab`; slab j is val when
    j % val_every == 1; train drops the `gap` slices next to a val slab on either side."""
    indices = sorted(indices)
    val = [z for i, z in enumerate(indices) if (i // slab) % val_every == 1]
    held = set(val)
    near = {z + d for z in val for d in range(-gap, gap + 1)}
    train = [z for z in indices if z not in near and z not in held]
    return train, val


def shapes_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (size, size) float32 and its labels (size, size) int64 (see the module docstring)."""
    def texture(scale: int) -> np.ndarray:
        coarse = rng.normal(0.0, 1.0, (1, 1, scale, scale)).astype(np.float32)
        smooth = F.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False)
        return smooth[0, 0].numpy() * 0.3 + rng.normal(0.0, 0.1, (size, size)).astype(np.float32)

    image = texture(int(rng.integers(4, 9)))
    labels = np.zeros((size, size), dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(1, 4))
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.08, 0.2) * size
        angle = rng.uniform(0, math.pi)
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c     # rotated coordinates
        if kind == 1:                                                          # ellipse, aspect 0.5-1
            mask = (u / r) ** 2 + (v / (r * rng.uniform(0.5, 1.0))) ** 2 <= 1.0
        elif kind == 2:                                                        # rectangle
            mask = (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.4, 1.0))
        else:                                                                  # triangle (equilateral-ish)
            mask = (v >= -r / 2) & (v <= r - math.sqrt(3) * np.abs(u))
        offset = rng.uniform(0.4, 1.0) * (1 if rng.random() < 0.5 else -1)
        image = np.where(mask, texture(int(rng.integers(4, 9))) + offset, image)
        labels[mask] = kind
    return image.astype(np.float32), labels


def augment(images: Tensor, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B, 1, S, S), (B, S, S) -> the same, with a flip, a small affine and intensity jitter drawn from g."""
    B = images.shape[0]
    flip = torch.rand(B, generator=g) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
    angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(B, generator=g)
    shift = (torch.rand(B, 2, generator=g) * 2 - 1) * 0.1                  # ±5% of the side = ±0.1 in [-1, 1]
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, S, S, 2)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].long()
    gain = 0.9 + 0.2 * torch.rand(B, 1, 1, 1, generator=g)
    bias = (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1) * 0.05
    noise = torch.randn(images.shape, generator=g) * 0.02
    return images * gain + bias + noise, labels


def dice_counts(predictions: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(|P ∩ L|, |P| + |L|) per class, (num_classes,) float64 each: Dice's counts, which add over batches."""
    inter = torch.zeros(num_classes, dtype=torch.float64)
    sizes = torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        p, t = predictions == k, labels == k
        inter[k] = int((p & t).sum())
        sizes[k] = int(p.sum()) + int(t.sum())
    return inter, sizes


def dice_from_counts(inter: Tensor, sizes: Tensor) -> Tensor:
    """Dice 2 |P ∩ L| / (|P| + |L|) per class; 1 for a class absent from both."""
    return torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.ones_like(sizes))


def dice_per_class(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(num_classes,) Dice 2 |P ∩ L| / (|P| + |L|) pooled over the batch; 1 for a class absent from both."""
    return dice_from_counts(*dice_counts(predictions, labels, num_classes))


@register_task
class MNISlices(Task):
    name = "mni_slices"
    kind = "classify"
    quality = "dice"
    higher_is_better = True
    causal = False
    description = ("GM/WM segmentation of MNI ICBM152 template slices (nilearn wheel, read without nilearn; held-out "
                   "axial slabs, coronal slices as a second test) or synthetic shapes; mean foreground Dice")

    def __init__(self, seed: int = 0, *, source: str = "mni", size: int = 64, threshold: float = 0.5,
                 slab: int = 12, val_every: int = 4, gap: int = 2, coronal_stride: int = 2, augment: bool = True,
                 root: str | None = None):
        super().__init__(seed)
        if source not in SOURCES:
            raise ValueError(f"mni_slices: source must be one of {SOURCES}, got {source!r}")
        for arg, v, low in (("size", size, 32), ("slab", slab, 1), ("val_every", val_every, 2), ("gap", gap, 0),
                            ("coronal_stride", coronal_stride, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"mni_slices: {arg} must be an int >= {low}, got {v!r}")
        if size % 32:
            raise ValueError(f"mni_slices: size must be a multiple of 32 (MSGA and the U-Net halve it 4-5 times), "
                             f"got {size}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"mni_slices: threshold must be a number in (0, 1), got {threshold!r}")
        if not isinstance(augment, bool):
            raise TypeError(f"mni_slices: augment must be a bool, got {augment!r}")
        self.source, self.size, self.threshold = source, size, float(threshold)
        self.slab, self.val_every, self.gap, self.coronal_stride = slab, val_every, gap, coronal_stride
        self.augment = augment
        self.root_option = None if root is None else str(root)
        self.classes = CLASSES[source]
        if source == "mni":
            self.paths = find_mni(root)
            axial = slice_stack(self.paths, "axial", size, self.threshold)
            used = [int(i) for i in torch.nonzero(axial["tissue"] >= MIN_TISSUE).flatten()]
            train, val = axial_split(used, slab, val_every, gap)
            if not train or not val:
                raise ValueError(f"mni_slices: slab={slab}, val_every={val_every}, gap={gap} leave {len(train)} train "
                                 f"and {len(val)} val slices of {len(used)}")
            self.slices = {"train": torch.tensor(train), "val": torch.tensor(val)}
            self.axial = axial

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "source": self.source, "size": self.size, "threshold": self.threshold,
                "slab": self.slab, "val_every": self.val_every, "gap": self.gap,
                "coronal_stride": self.coronal_stride, "augment": self.augment, "root": self.root_option}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def seq_len(self) -> int:
        return self.size * self.size

    # -- data ---------------------------------------------------------------------------------
    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = self.generator(split, index)                       # validates split and index
        if self.source == "shapes":
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            pairs = [shapes_image(rng, self.size) for _ in range(batch_size)]
            images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]      # (B, 1, S, S)
            labels = torch.from_numpy(np.stack([p[1] for p in pairs]))               # (B, S, S)
        else:
            pool = self.slices[split]
            if split == "train":
                rows = pool[torch.randint(0, len(pool), (batch_size,), generator=g)]
            else:
                rows = pool[(index * batch_size + torch.arange(batch_size)) % len(pool)]
            images = self.axial["images"][rows][:, None].clone()                     # (B, 1, S, S)
            labels = self.axial["labels"][rows].clone()                              # (B, S, S)
        if split == "train" and self.augment:
            images, labels = augment(images, labels, g)
        return {"inputs": images.float(), "labels": labels.long()}

    def held_out_slices(self) -> Batch:
        """Every held-out axial slice (the val split), un-augmented: {"inputs", "labels", "index" (z)}."""
        self._need_mni("held_out_slices")
        rows = self.slices["val"]
        return {"inputs": self.axial["images"][rows][:, None].clone(), "labels": self.axial["labels"][rows].clone(),
                "index": rows.clone()}

    def coronal_slices(self, *, held_out_rows: bool = False) -> Batch:
        """The second test: every `coronal_stride`-th coronal slice with >= 1% tissue, un-augmented:
        {"inputs" (N, 1, S, S), "labels" (N, S, S), "index" (N,) y}; with held_out_rows, also "row_mask" (S,)
        bool: the image rows whose z lies within a held-out axial slab (voxels never trained on as such)."""
        self._need_mni("coronal_slices")
        stack = slice_stack(self.paths, "coronal", self.size, self.threshold)
        used = torch.nonzero(stack["tissue"] >= MIN_TISSUE).flatten()[::self.coronal_stride]
        out = {"inputs": stack["images"][used][:, None].clone(), "labels": stack["labels"][used].clone(),
               "index": used.clone()}
        if held_out_rows:
            out["row_mask"] = self._held_out_rows()
        return out

    def _held_out_rows(self) -> Tensor:
        """(S,) bool: coronal image rows (superior up, padded to SIDE) whose centre z is in a val slab."""
        depth = self.axial["images"].shape[0]                   # the number of z slices
        top = (SIDE - depth) // 2
        centres = (torch.arange(self.size) + 0.5) * SIDE / self.size - top        # padded-canvas row -> flipped z
        z = (depth - 1 - torch.floor(centres)).long()
        held = set(int(v) for v in self.slices["val"])
        return torch.tensor([0 <= int(v) < depth and int(v) in held for v in z])

    def _need_mni(self, what: str) -> None:
        if self.source != "mni":
            raise ValueError(f"mni_slices: {what} needs source='mni', this task has source={self.source!r}")

    # -- model and loss -----------------------------------------------------------------------
    def accepts_no_layers(self) -> bool:
        return True                                            # [] builds the unguided ablation (or the U-Net)

    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, model: str = "msga",
                    guided: bool = True, base: int | None = None, mlp_ratio: float | None = None,
                    **block_options) -> nn.Module:
        """model="msga": MSGA with layers = [position] or [position, channel] mechanism names (default
        danet_pam, danet_cam; [] or guided=False: the unguided ablation); block_options go to MSGA
        (stem_stride, widths, position_options, channel_options). model="unet": the U-Net baseline with
        `base` channels (default dim), depth 4; layers must be []. mlp_ratio (from TrainConfig) is unused."""
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["danet_pam", "danet_cam"][:layers] if layers else []
        layers = list(layers)
        if model == "unet":
            if layers or block_options:
                raise ValueError(f"mni_slices: model='unet' has no attention layers or MSGA options, got layers="
                                 f"{layers!r}, options {sorted(block_options)}")
            return UNet(1, self.num_classes, base=dim if base is None else base, depth=4)
        if model != "msga":
            raise ValueError(f"mni_slices: model must be 'msga' or 'unet', got {model!r}")
        if len(layers) > 2:
            raise ValueError(f"mni_slices: layers names MSGA's position and channel attention (at most 2), got "
                             f"{layers!r}")
        names, options = [], []
        for layer in layers:
            name, opts = parse_layer(layer)
            names.append(name)
            options.append(opts)
        kw: dict[str, Any] = dict(block_options)
        if names:
            kw.update(position=names[0], position_options=options[0] or None)
        if len(names) == 2:
            kw.update(channel=names[1], channel_options=options[1] or None)
        return MSGA(1, self.num_classes, dim, num_heads, guided=guided and bool(names), **kw)

    def logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """The model's final logits (B, K, S, S) (MSGA: the mean of its step-2 predictions)."""
        out = model(inputs)
        return out if isinstance(out, Tensor) else out.final

    def metrics(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Dice per class (pooled over the batch; `mask` (S,) bool keeps those image rows only) and their
        foreground mean ("dice")."""
        predictions = logits.argmax(1)                                       # (B, S, S)
        if mask is not None:
            predictions, labels = predictions[:, mask], labels[:, mask]
        dice = dice_per_class(predictions, labels, self.num_classes)
        out = {f"dice_{name.lower()}": float(d) for name, d in zip(self.classes, dice)}
        out["dice"] = float(dice[1:].mean())
        out["pixel_accuracy"] = float((predictions == labels).float().mean())
        return out

    def evaluate(self, model: nn.Module, *, batches: int = 4, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """Val metrics over the first `batches` val batches with Dice pooled over all their pixels (one
        count per class, as `metrics` does for one batch) and the losses averaged per slice. On the template
        a slice is counted once: the rows a batch wraps around to (index >= the number of held-out slices)
        are dropped, so `batches=ceil(n_val / batch_size)` scores every held-out slice exactly once."""
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        was_training = model.training
        model.eval()
        inter = torch.zeros(self.num_classes, dtype=torch.float64)
        sizes = torch.zeros(self.num_classes, dtype=torch.float64)
        sums: dict[str, float] = {}
        rows = correct = pixels = 0
        try:
            with torch.no_grad():
                for i in range(batches):
                    b = self.batch("val", i, batch_size)
                    if self.source == "mni":
                        keep = max(0, min(batch_size, len(self.slices["val"]) - i * batch_size))
                        if keep == 0:
                            break
                        b = {k: v[:keep] for k, v in b.items()}
                    b = {k: v.to(device) for k, v in b.items()}
                    loss, logits, parts = self._loss(model(b["inputs"]), b["labels"])
                    n = b["labels"].shape[0]
                    for k, v in {"loss": float(loss), **parts}.items():
                        sums[k] = sums.get(k, 0.0) + v * n
                    predictions, labels = logits.argmax(1).cpu(), b["labels"].cpu()
                    i_k, s_k = dice_counts(predictions, labels, self.num_classes)
                    inter += i_k
                    sizes += s_k
                    correct += int((predictions == labels).sum())
                    pixels += labels.numel()
                    rows += n
        finally:
            model.train(was_training)
        dice = dice_from_counts(inter, sizes)
        out = {k: v / rows for k, v in sums.items()}
        out.update({f"dice_{name.lower()}": float(d) for name, d in zip(self.classes, dice)})
        out["dice"] = float(dice[1:].mean())
        out["pixel_accuracy"] = correct / pixels
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        loss, logits, extra = self._loss(model(batch["inputs"]), batch["labels"])
        with torch.no_grad():
            metrics = self.metrics(logits.detach(), batch["labels"])
        return loss, {"loss": loss.item(), **extra, **metrics}

    def _loss(self, out: Tensor | MSGAOutput, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(loss, final logits (B, K, S, S), the loss's parts) of a model output."""
        if isinstance(out, MSGAOutput):
            loss, parts = msga_loss(out, labels)
            return loss, out.final, {k: float(v.detach()) for k, v in parts.items()}
        if out.shape != (labels.shape[0], self.num_classes, *labels.shape[1:]):
            raise ValueError(f"mni_slices: expected logits {(labels.shape[0], self.num_classes, *labels.shape[1:])}, "
                             f"got {tuple(out.shape)}")
        loss = F.cross_entropy(out, labels)
        return loss, out, {"ce": float(loss.detach())}


__all__ = ["MNISlices", "read_nifti", "find_mni", "slice_stack", "axial_split", "shapes_image", "augment",
           "dice_per_class", "dice_counts", "FILES", "CLASSES", "ENV_VAR"]
