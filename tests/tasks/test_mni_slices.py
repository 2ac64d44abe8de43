"""attnlab.tasks.mni_slices: the NIfTI-1 reader (against nibabel where installed, and hand-built headers),
the held-out slabs (disjoint, with the gap), the labels' rule, pure batches, Dice, the shapes source,
and a clear error when nilearn's files are missing (the MNI tests skip then)."""
from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from attnlab.tasks import create_task
from attnlab.tasks.mni_slices import (FILES, SIDE, axial_split, dice_per_class, find_mni, read_nifti,
                                      shapes_image)


def _mni_available() -> bool:
    try:
        find_mni()
        return True
    except FileNotFoundError:
        return False


needs_mni = pytest.mark.skipif(not _mni_available(), reason="the nilearn wheel (MNI template files) is not installed")


@pytest.fixture(scope="module")
def task():
    if not _mni_available():
        pytest.skip("the nilearn wheel (MNI template files) is not installed")
    return create_task("mni_slices", seed=0)


# --- the NIfTI reader ---------------------------------------------------------------------------

def write_nifti(path, data: np.ndarray, datatype: int, *, slope=1.0, inter=0.0, order="<", offset=352):
    """A minimal NIfTI-1 single file written from the standard's byte layout (independent of read_nifti)."""
    header = bytearray(offset)
    header[0:4] = np.array(348, f"{order}i4").tobytes()
    dim = np.ones(8, f"{order}i2")
    dim[0] = data.ndim
    dim[1:1 + data.ndim] = data.shape
    header[40:56] = dim.tobytes()
    header[70:72] = np.array(datatype, f"{order}i2").tobytes()
    header[72:74] = np.array(data.dtype.itemsize * 8, f"{order}i2").tobytes()
    header[76:108] = np.ones(8, f"{order}f4").tobytes()
    header[108:112] = np.array(offset, f"{order}f4").tobytes()
    header[112:120] = np.array([slope, inter], f"{order}f4").tobytes()
    header[344:348] = b"n+1\x00"
    body = data.astype(data.dtype.newbyteorder(order)).tobytes(order="F")
    raw = bytes(header) + body
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


@pytest.mark.parametrize("order", ["<", ">"])
def test_reader_on_hand_built_files(tmp_path, order):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 7
    write_nifti(tmp_path / "a.nii.gz", data, 4, slope=0.5, inter=2.0, order=order)
    got, header = read_nifti(tmp_path / "a.nii.gz")
    assert header["dim"] == (2, 3, 4) and header["datatype"] == 4 and header["vox_offset"] == 352
    np.testing.assert_array_equal(got, data * 0.5 + 2.0)           # voxel (i, j, k) stays (i, j, k)
    write_nifti(tmp_path / "b.nii", data.astype(np.float32), 16, slope=0.0, order=order)
    np.testing.assert_array_equal(read_nifti(tmp_path / "b.nii")[0], data)   # slope 0: no scaling


def test_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "short.nii").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="fewer than a NIfTI-1 header"):
        read_nifti(tmp_path / "short.nii")
    (tmp_path / "zeros.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(ValueError, match="sizeof_hdr is not 348"):
        read_nifti(tmp_path / "zeros.nii")
    write_nifti(tmp_path / "c.nii", np.zeros((2, 2), np.complex64), 32)
    with pytest.raises(NotImplementedError, match="datatype 32"):
        read_nifti(tmp_path / "c.nii")


def test_reader_matches_nibabel(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).normal(size=(5, 4, 3, 2)).astype(np.float32)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, -1.0)
    nib.save(image, str(tmp_path / "x.nii.gz"))
    ours, header = read_nifti(tmp_path / "x.nii.gz")
    theirs = np.asarray(nib.load(str(tmp_path / "x.nii.gz")).get_fdata())
    assert header["dim"] == (5, 4, 3, 2)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    if _mni_available():
        for kind, path in find_mni().items():
            np.testing.assert_array_equal(read_nifti(path)[0], np.asarray(nib.load(str(path)).get_fdata()))


# --- finding the files --------------------------------------------------------------------------

def test_missing_files_give_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nilearn"):
        find_mni(tmp_path)
    monkeypatch.delenv("ATTNLAB_MNI", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"nilearn \(not installed\)"):
        create_task("mni_slices")
    monkeypatch.setenv("ATTNLAB_MNI", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ATTNLAB_MNI"):
        find_mni()
    create_task("mni_slices", source="shapes")                      # needs no files


@needs_mni
def test_files_are_found_without_importing_nilearn():
    import subprocess
    import sys
    code = ("import sys; from attnlab.tasks import create_task; from attnlab.tasks.mni_slices import find_mni; "
            "p = find_mni(); create_task('mni_slices'); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'nilearn'], 'nilearn was imported'; "
            "print(sorted(p))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['gm', 't1', 'wm']"
    assert find_mni()["t1"].name == FILES["t1"]


# --- slabs and labels ---------------------------------------------------------------------------

def test_axial_split_holds_out_contiguous_slabs_with_a_gap():
    train, val = axial_split(range(10, 110), slab=10, val_every=4, gap=2)
    assert val == list(range(20, 30)) + list(range(60, 70)) + list(range(100, 110))
    assert not set(train) & set(val)
    assert min(abs(t - v) for t in train for v in val) == 3           # gap 2: the nearest train slice is 3 away
    assert len(train) == 100 - 30 - 2 * 2 - 2 * 2 - 2                 # the last slab has one neighbour


def test_task_slabs_are_disjoint_and_not_adjacent(task):
    train, val = set(task.slices["train"].tolist()), set(task.slices["val"].tolist())
    assert train and val and not train & val
    assert min(abs(t - v) for t in train for v in val) > task.gap
    assert len(val) % task.slab == 0                                  # whole slabs


def test_labels_follow_the_template(task):
    images, labels = task.axial["images"], task.axial["labels"]
    assert images.shape[1:] == (64, 64) and labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1, 2}
    assert (labels[images == 0] == 0).all()                           # outside the head: background
    # T1: white matter is brighter than grey matter, on every slice with enough of both.
    brighter = [float(images[z][labels[z] == 2].mean() > images[z][labels[z] == 1].mean())
                for z in range(images.shape[0]) if (labels[z] == 2).sum() > 20 and (labels[z] == 1).sum() > 20]
    assert len(brighter) > 50 and sum(brighter) == len(brighter)
    fractions = [(labels[task.slices["val"]] == k).float().mean().item() for k in range(3)]
    assert 0.6 < fractions[0] < 0.9 and 0.05 < fractions[1] < 0.3 and 0.03 < fractions[2] < 0.2
    lower = create_task("mni_slices", threshold=0.3)
    assert (lower.axial["labels"] > 0).sum() > (labels > 0).sum()    # a lower threshold: more tissue


def test_coronal_slices_and_their_held_out_rows(task):
    c = task.coronal_slices(held_out_rows=True)
    assert c["inputs"].shape[1:] == (1, 64, 64) and c["labels"].shape[1:] == (64, 64)
    assert len(c["index"]) > 40 and (c["index"].diff() == task.coronal_stride).all()
    mask = c["row_mask"]
    # 3 held-out slabs of 12 mm, seen through pixels of SIDE / 64 mm: about 36 / 3.64 rows.
    assert mask.dtype == torch.bool and 6 <= int(mask.sum()) <= 12
    ax = task.held_out_slices()
    assert ax["inputs"].shape[0] == len(task.slices["val"])


# --- batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["mni", "shapes"])
def test_batches_are_pure_functions_of_seed_split_index(source):
    if source == "mni" and not _mni_available():
        pytest.skip("the nilearn wheel is not installed")
    a, b = create_task("mni_slices", source=source, seed=3), create_task("mni_slices", source=source, seed=3)
    for split in ("train", "val"):
        x, y = a.batch(split, 5, 4), b.batch(split, 5, 4)
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["labels"], y["labels"])
        assert x["inputs"].shape == (4, 1, 64, 64) and x["labels"].shape == (4, 64, 64)
    assert not torch.equal(a.batch("train", 5, 4)["inputs"], a.batch("train", 6, 4)["inputs"])
    other = create_task("mni_slices", source=source, seed=4)
    assert not torch.equal(a.batch("train", 5, 4)["inputs"], other.batch("train", 5, 4)["inputs"])


def test_val_batches_walk_the_held_out_slices_unaugmented(task):
    batch = task.batch("val", 1, 5)
    rows = task.slices["val"][5:10]
    assert torch.equal(batch["inputs"][:, 0], task.axial["images"][rows])
    assert torch.equal(batch["labels"], task.axial["labels"][rows])
    plain = create_task("mni_slices", augment=False)
    raw = plain.batch("train", 0, 8)                                  # un-augmented train slices are template slices
    train_images = plain.axial["images"][plain.slices["train"]]
    for image in raw["inputs"][:, 0]:
        assert any(torch.equal(image, t) for t in train_images)
    augmented = task.batch("train", 0, 8)["inputs"][:, 0]
    assert not any(torch.equal(image, t) for image in augmented for t in train_images)


class IntensityBands(torch.nn.Module):
    """A fixed segmenter: class = which intensity band a pixel falls in (logits (B, 3, S, S))."""

    def forward(self, x):
        v = x[:, 0]
        return torch.stack([-(v - 0.0).abs(), -(v - 0.6).abs(), -(v - 1.0).abs()], 1)


def test_evaluate_pools_dice_over_each_held_out_slice_once(task):
    """evaluate over more batches than the held-out slices fill (the last wraps around) equals Dice
    pooled by hand, in numpy, over every held-out slice exactly once."""
    model = IntensityBands()
    held = task.held_out_slices()
    n, b = len(held["labels"]), 12
    got = task.evaluate(model, batches=-(-n // b) + 2, batch_size=b)
    pred = model(held["inputs"]).argmax(1).numpy()
    true = held["labels"].numpy()
    for k, name in enumerate(task.classes):
        p, t = pred == k, true == k
        assert got[f"dice_{name.lower()}"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-12)
    assert got["dice"] == pytest.approx(np.mean([got[f"dice_{c.lower()}"] for c in task.classes[1:]]))
    assert got["pixel_accuracy"] == pytest.approx((pred == true).mean())
    ce = torch.nn.functional.cross_entropy(model(held["inputs"]), held["labels"])
    assert got["loss"] == pytest.approx(float(ce), rel=1e-5)
    assert 0.05 < got["dice"] < 0.95                                  # a non-trivial prediction
    with pytest.raises(ValueError, match="batches must be >= 1"):
        task.evaluate(model, batches=0)


def test_shapes_labels_name_the_shape():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(20):
        image, labels = shapes_image(rng, 64)
        assert image.shape == labels.shape == (64, 64) and image.dtype == np.float32
        kinds |= set(np.unique(labels).tolist())
    assert kinds == {0, 1, 2, 3}


# --- metrics, models, errors --------------------------------------------------------------------

def test_dice_per_class_by_hand():
    p = torch.tensor([[0, 1, 1, 2]])
    t = torch.tensor([[0, 1, 2, 2]])
    d = dice_per_class(p, t, 4)
    assert d.tolist() == pytest.approx([1.0, 2 / 3, 2 / 3, 1.0])     # class 3: absent from both -> 1


def test_build_model_variants_and_errors():
    t = create_task("mni_slices", source="shapes")
    guided = t.build_model(8, 1, ["danet_pam", "danet_cam"])
    plain = t.build_model(8, 1, [])
    unet = t.build_model(8, 1, [], model="unet", base=12)
    assert guided.guided and not plain.guided and type(unet).__name__ == "UNet"
    batch = t.batch("train", 0, 2)
    for m in (guided, plain, unet):
        loss, metrics = t.loss(m, batch)
        assert loss.requires_grad and 0.0 <= metrics["dice"] <= 1.0 and "dice_triangle" in metrics
    with pytest.raises(ValueError, match="at most 2"):
        t.build_model(8, 1, ["danet_pam"] * 3)
    with pytest.raises(ValueError, match="model='unet' has no attention layers"):
        t.build_model(8, 1, ["danet_pam"], model="unet")
    with pytest.raises(ValueError, match="size must be a multiple of 32"):
        create_task("mni_slices", source="shapes", size=48)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        create_task("mni_slices", source="shapes", threshold=1.5)
    with pytest.raises(ValueError, match="source must be one of"):
        create_task("mni_slices", source="ct")
    with pytest.raises(ValueError, match="needs source='mni'"):
        t.coronal_slices()
    assert SIDE == 233
