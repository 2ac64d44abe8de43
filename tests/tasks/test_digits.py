import numpy as np
import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.models import Classifier


def test_registered_and_listed():
    cls = get_task("digits")
    assert cls.kind == "classify" and cls.quality == "accuracy" and cls.higher_is_better and not cls.causal
    assert "digits" in [t.name for t in list_tasks()]


def test_split_is_a_fixed_partition():
    from sklearn.datasets import load_digits
    task = create_task("digits")
    assert task.num_examples("train") == 1437 and task.num_examples("val") == 360
    everything = load_digits()
    rows = lambda images, labels: sorted(img.tobytes() + bytes([int(y)]) for img, y in zip(images, labels))
    split = np.concatenate([task.images["train"].numpy(), task.images["val"].numpy()])
    split_labels = np.concatenate([task.labels["train"].numpy(), task.labels["val"].numpy()])
    assert rows(split, split_labels) == rows(everything.images.astype(np.uint8), everything.target)
    assert torch.equal(create_task("digits", seed=5).labels["val"], task.labels["val"])   # seed-independent


def test_shapes_dtypes_and_standardisation():
    task = create_task("digits")
    assert task.seq_len == task.num_patches == 16
    b = task.batch("train", 0, 8)
    assert b["inputs"].shape == (8, 16, 4) and b["inputs"].dtype == torch.float32
    assert b["targets"].shape == (8,) and b["targets"].dtype == torch.int64
    tokens = task.tokens(task.images["train"])                               # (1437, 16, 4)
    assert abs(tokens.mean().item()) < 1e-5 and abs(tokens.std().item() - 1) < 1e-4
    assert create_task("digits", patch=4).batch("val", 0, 2)["inputs"].shape == (2, 4, 16)


def test_batches_are_deterministic_and_val_covers_the_set():
    task = create_task("digits", seed=3)
    a, b = task.batch("train", 5, 32), task.batch("train", 5, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 32)["inputs"])
    assert not torch.equal(a["inputs"], create_task("digits", seed=4).batch("train", 5, 32)["inputs"])
    val = [task.batch("val", i, 120) for i in range(3)]                      # 3 x 120 = 360
    assert torch.equal(torch.cat([v["targets"] for v in val]), task.labels["val"])
    assert torch.equal(torch.cat([v["inputs"] for v in val]), task.tokens(task.images["val"]))
    assert torch.equal(task.batch("val", 3, 120)["targets"], val[0]["targets"])   # wraps around


def test_train_size_subsamples_deterministically():
    small, large = create_task("digits", train_size=100), create_task("digits", train_size=200)
    assert small.num_examples("train") == 100
    assert torch.equal(small.images["train"], large.images["train"][:100])   # nested subsets
    assert torch.equal(small.labels["val"], create_task("digits").labels["val"])
    assert create_task("digits", **small.options()).options() == small.options()


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"divisor of the image side 8 \(1, 2, 4, 8\), got 3"):
        create_task("digits", patch=3)
    with pytest.raises(ValueError, match="train_size"):
        create_task("digits", train_size=0)
    with pytest.raises(ValueError, match="exceeds the 1437"):
        create_task("digits", train_size=5000)
    with pytest.raises(TypeError, match="options"):
        create_task("digits", root="/tmp")
    with pytest.raises(ValueError, match="split"):
        create_task("digits").batch("test", 0, 2)


def test_mhsa_classifier_learns_it():
    task = create_task("digits")
    torch.manual_seed(0)
    model = task.build_model(dim=32, num_heads=4, layers=1)
    assert isinstance(model, Classifier)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = task.evaluate(model, batches=3, batch_size=120)["accuracy"]      # the whole val set
    for i in range(150):
        loss, _ = task.loss(model, task.batch("train", i, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, batches=3, batch_size=120)["accuracy"]
    assert start < 0.25 and end > 0.6, (start, end)    # chance is 1/10
