"""fashion_dense: pure batches, the targets (segmentation from the label, the distance transform against
scipy and a brute-force oracle), mIoU on hand-made cases, baselines, the model options, the loss."""
import math

import numpy as np
import pytest
import torch

from attnlab.tasks import create_task
from attnlab.tasks.fashion_dense import confusion, distance_to_background, miou


@pytest.fixture(scope="module")
def task():
    try:
        return create_task("fashion_dense", train_size=500)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")


def brute_force_edt(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest background pixel of the image padded with background."""
    padded = np.pad(mask, 1)
    bg = np.argwhere(~padded)
    out = np.zeros(mask.shape)
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                out[y, x] = np.sqrt(((bg - [y + 1, x + 1]) ** 2).sum(1)).min()
    return out


def test_distance_transform_against_oracles():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 9, 7, generator=g) > 0.3
    masks[0] = True                                              # no background: only the outside ring
    got = distance_to_background(masks)
    for m, d in zip(masks.numpy(), got.numpy()):
        assert np.allclose(d, brute_force_edt(m), atol=1e-5)
    assert got[0, 4, 3] == pytest.approx(4.0)                    # centre of a 9x7 full mask: 4 to the ring
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:
        return
    for m, d in zip(masks.numpy(), got.numpy()):
        assert np.allclose(d, distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1], atol=1e-5)
    with pytest.raises(ValueError, match="bool masks"):
        distance_to_background(torch.zeros(2, 4, 4))


def test_miou_and_confusion_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    conf = confusion(pred, target, num_classes=4)
    assert conf.sum() == 8 and conf[0, 0] == 2 and conf[2, 0] == 1
    # IoU: class 0: tp 2, union 3 + 3 - 2 = 4 -> 0.5; class 1: 2 / 3; class 2: 2 / 3; class 3 absent
    assert miou(conf) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert miou(confusion(target, target, 4)) == 1.0
    with pytest.raises(ValueError, match="no ground-truth"):
        miou(torch.zeros(3, 3, dtype=torch.long))


def test_batches_are_pure_and_targets_consistent(task):
    a, b = task.batch("train", 3, 16), task.batch("train", 3, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 4, 16)["inputs"])
    assert a["inputs"].shape == (16, 28, 28) and a["seg"].dtype == torch.int64 and a["depth"].shape == (16, 28, 28)
    v = task.batch("val", 1, 8)
    rows = 8 + torch.arange(8)
    images = task.images["val"][rows]
    assert torch.equal(v["labels"], task.labels["val"][rows])
    fg = images.float() > 0.1 * 255
    assert torch.equal(v["seg"] > 0, fg)
    assert torch.equal(v["seg"][fg], (v["labels"][:, None, None] + 1).expand(-1, 28, 28)[fg])
    assert torch.all(v["depth"][~fg] == 0) and torch.all(v["depth"][fg] >= 1 / 8)
    assert np.allclose(v["depth"][0].numpy(), brute_force_edt(fg[0].numpy()) / 8, atol=1e-5)
    assert abs(float(a["inputs"].mean())) < 1.0


def test_options_and_errors(task):
    opts = task.options()
    assert opts["train_size"] == 500 and opts["threshold"] == 0.1 and opts["balance_weight"] == 0.01
    assert task.seq_len == 49 and task.num_examples("train") == 500
    with pytest.raises(ValueError, match="patch"):
        create_task("fashion_dense", patch=5)
    with pytest.raises(ValueError, match="threshold"):
        create_task("fashion_dense", threshold=1.5)
    with pytest.raises(ValueError, match="train_size"):
        create_task("fashion_dense", train_size=10 ** 6)
    with pytest.raises(ValueError, match="model"):
        task.build_model(16, 2, 2, model="sparse")


def test_models_loss_and_scores(task):
    torch.manual_seed(0)
    moe = task.build_model(16, 2, ["mhsa"] * 2, num_experts=4)
    dense = task.build_model(16, 2, ["mhsa"] * 2, model="dense")
    assert moe.moe_blocks == [1] and dense.moe_blocks == []
    b = task.batch("train", 0, 8)
    moe.train()
    loss, metrics = task.loss(moe, b)
    assert loss.requires_grad and math.isfinite(loss.item()) and metrics["balance"] > 0
    assert metrics["rmse"] == pytest.approx(metrics["mse"] ** 0.5)
    expected = metrics["ce"] + metrics["mse"] + 0.01 * metrics["balance"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss_d, metrics_d = task.loss(dense, b)
    assert metrics_d["balance"] == 0.0
    s = task.scores(dense, batches=2, batch_size=10)
    assert 0 <= s["miou"] <= 1 and len(s["iou"]) == 11 and s["rmse"] > 0
    assert set(task.evaluate(dense, batches=2, batch_size=10)) == {"miou", "rmse", "ce", "pixel_accuracy"}


def test_baselines(task):
    base = task.baselines(batches=2, batch_size=50)
    b = [task.batch("val", i, 50) for i in range(2)]
    seg = torch.cat([x["seg"] for x in b])
    assert base["all_background_miou"] == pytest.approx(float((seg == 0).float().mean()) / len(seg.unique()))
    depth = torch.cat([x["depth"] for x in b])
    assert base["mean_depth_rmse"] == pytest.approx(float(((depth - base["mean_depth"]) ** 2).mean().sqrt()), rel=1e-5)
