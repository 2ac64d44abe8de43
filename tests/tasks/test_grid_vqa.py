"""grid_vqa: shapes, determinism per (seed, split, index), a val set fixed across seeds, answers that
are the digit at the asked cell (checked by finding the cell's pixels among the digits images), and a
VisorClassifier that learns it well above chance (1/10)."""
import numpy as np
import pytest
import torch

from attnlab.models import VisorClassifier
from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks.digits import load_digits_split


def test_registered_and_listed():
    cls = get_task("grid_vqa")
    assert cls.kind == "classify" and cls.quality == "accuracy" and cls.higher_is_better and not cls.causal
    assert "grid_vqa" in [t.name for t in list_tasks()]


@pytest.mark.parametrize("grid, patch, tokens", [(2, 2, 64), (3, 4, 36), (4, 4, 64), (1, 8, 1)])
def test_shapes_and_dtypes(grid, patch, tokens):
    task = create_task("grid_vqa", grid=grid, patch=patch, val_size=50)
    assert task.visual_len == tokens and task.seq_len == tokens + 3 and task.vocab_size == 2 + grid * grid
    for split in ("train", "val"):
        b = task.batch(split, 0, 8)
        assert b["inputs"].shape == (8, tokens, patch * patch) and b["inputs"].dtype == torch.float32
        assert b["question"].shape == (8, 3) and b["question"].dtype == torch.int64
        assert b["targets"].shape == (8,) and b["targets"].dtype == torch.int64
        assert b["cell"].shape == (8,) and 0 <= b["cell"].min() and b["cell"].max() < grid * grid
        assert torch.equal(b["question"][:, 1], 2 + b["cell"])               # [WHICH, CELL_k, ANSWER]
        assert (b["question"][:, 0] == 0).all() and (b["question"][:, 2] == 1).all()
        assert ((0 <= b["targets"]) & (b["targets"] < 10)).all()
    assert task.num_examples("train") == 1437 and task.num_examples("val") == 50


def test_batches_are_deterministic_per_seed_and_index():
    task = create_task("grid_vqa", seed=3, grid=3, patch=4, val_size=100)
    a, b = task.batch("train", 5, 32), task.batch("train", 5, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 32)["inputs"])
    again = create_task("grid_vqa", seed=3, grid=3, patch=4, val_size=100).batch("train", 5, 32)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["inputs"], create_task("grid_vqa", seed=4, grid=3, patch=4).batch("train", 5, 32)["inputs"])


def test_val_is_fixed_across_seeds_and_wraps_around():
    one = create_task("grid_vqa", seed=0, grid=3, patch=4, val_size=100)
    two = create_task("grid_vqa", seed=9, grid=3, patch=4, val_size=100)
    val = [one.batch("val", i, 25) for i in range(4)]                       # 4 x 25 = the whole val set
    for i in range(4):
        other = two.batch("val", i, 25)
        assert all(torch.equal(val[i][k], other[k]) for k in other)
    assert torch.equal(one.batch("val", 4, 25)["inputs"], val[0]["inputs"])    # wraps around
    whole = one.batch("val", 0, 100)
    assert torch.equal(torch.cat([v["targets"] for v in val]), whole["targets"])


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("grid, patch", [(3, 4), (2, 2), (4, 8)])
def test_the_answer_is_the_digit_at_the_asked_cell(split, grid, patch):
    """Undo the standardisation and the patching, cut out cell k, find those 8 x 8 pixels among the
    split's digits images: one of the matches has the target's label; every cell is some digit."""
    task = create_task("grid_vqa", seed=1, grid=grid, patch=patch, val_size=64)
    train_x, train_y, val_x, val_y = load_digits_split()
    images, labels = (train_x, train_y) if split == "train" else (val_x, val_y)
    b = task.batch(split, 2, 16)
    side = 8 * grid // patch                                                # patches per picture side
    pixels = b["inputs"] * task.std + task.mean                            # (B, M, p^2) in [0, 1]
    picture = pixels.reshape(16, side, side, patch, patch).permute(0, 1, 3, 2, 4).reshape(16, 8 * grid, 8 * grid)
    values = torch.round(picture.double() * 16).long().numpy()             # integer pixels 0..16
    assert np.abs(picture.double().numpy() * 16 - values).max() < 1e-4
    flat = images.reshape(len(images), 64).astype(np.int64)
    for i in range(16):
        for k in range(grid * grid):
            r, c = divmod(k, grid)
            cell = values[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(64)
            match = np.flatnonzero((flat == cell).all(1))
            assert len(match) > 0, (i, k)
            if k == int(b["cell"][i]):
                assert int(b["targets"][i]) in set(labels[match].tolist())


def test_pixels_are_standardised_by_the_train_digits():
    task = create_task("grid_vqa", grid=2, patch=2)
    x = task.batch("train", 0, 512)["inputs"]
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_one_cell_grid_is_digit_classification():
    """grid=1: every question asks about cell 0, and the answer is the image's digit."""
    task = create_task("grid_vqa", grid=1, patch=2, val_size=20)
    b = task.batch("val", 0, 20)
    assert (b["cell"] == 0).all() and task.vocab_size == 3


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"patch must be a divisor of the digit side 8 \(1, 2, 4, 8\), got 3"):
        create_task("grid_vqa", patch=3)
    with pytest.raises(ValueError, match="grid must be a positive int, got 0"):
        create_task("grid_vqa", grid=0)
    with pytest.raises(ValueError, match="grid must be a positive int, got True"):
        create_task("grid_vqa", grid=True)
    with pytest.raises(ValueError, match="val_size must be a positive int"):
        create_task("grid_vqa", val_size=0)
    with pytest.raises(ValueError, match="split"):
        create_task("grid_vqa", val_size=10).batch("test", 0, 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        create_task("grid_vqa", val_size=10).batch("train", 0, 0)


def test_a_visor_classifier_learns_it_fast():
    """A 2-layer VisorClassifier (refinement at layer 0, cross at layer 1) on a 2 x 2 grid with
    4 x 4 patches (16 visual tokens): chance is 1/10; measured 0.9 after 300 steps."""
    task = create_task("grid_vqa", grid=2, patch=4, val_size=500)
    torch.manual_seed(0)
    model = task.build_model(dim=32, num_heads=4, layers=2, refine_layers=[0])
    assert isinstance(model, VisorClassifier) and model.body.modes() == ["full", "cross"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = task.evaluate(model, batches=2, batch_size=250)["accuracy"]
    for i in range(300):
        loss, _ = task.loss(model, task.batch("train", i, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, batches=2, batch_size=250)["accuracy"]
    assert start < 0.2 and end > 0.6, (start, end)
