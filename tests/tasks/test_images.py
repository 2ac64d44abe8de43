import numpy as np
import pytest
import torch

from attnlab.tasks._images import PatchImageNet, patchify, pixel_statistics, unpatchify


def test_patchify_matches_explicit_slicing():
    images = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    tokens = patchify(images, 2)                                      # (2, 3*2, 4)
    assert tokens.shape == (2, 6, 4)
    for b in range(2):
        for r in range(3):
            for c in range(2):
                expected = images[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)
                assert torch.equal(tokens[b, r * 2 + c], expected)     # row-major patch order


def test_patchify_rejects_non_divisor():
    with pytest.raises(ValueError, match="patch=3 does not divide"):
        patchify(torch.zeros(1, 8, 8), 3)


def testpixel_statistics_are_exact():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(50, 8, 8)).astype(np.uint8)
    mean, std = pixel_statistics(images, 16.0)
    unit = images.astype(np.float64) / 16
    assert mean == pytest.approx(unit.mean(), abs=1e-12) and std == pytest.approx(unit.std(ddof=1), abs=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        pixel_statistics(images.astype(np.float32), 16.0)
    with pytest.raises(ValueError, match="constant"):
        pixel_statistics(np.zeros((3, 8, 8), np.uint8), 16.0)


def test_unpatchify_inverts_patchify_and_checks_shapes():
    images = torch.randn(3, 12, 12)
    for p in (1, 2, 3, 4, 6):
        assert torch.equal(unpatchify(patchify(images, p), p, 12), images)
    with pytest.raises(ValueError, match=r"expected tokens \(B, 9, 16\) of a 12x12 image cut into 4x4 patches, "
                                         r"got \(3, 9, 9\)"):
        unpatchify(torch.zeros(3, 9, 9), 4, 12)


def test_patch_image_net_feeds_the_image_back():
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.sum(dim=(1, 2))

    images = torch.randn(2, 8, 8)
    PatchImageNet(Net(), 2, 8)(patchify(images, 2))
    assert torch.equal(seen[0], images)


def test_medusa_network_option_on_digits():
    pytest.importorskip("sklearn")
    from attnlab.models.medusa import MedusaNet
    from attnlab.tasks import create_task
    task = create_task("digits")
    batch = task.batch("train", 0, 4)
    shared = task.build_model(16, 2, ["medusa"], network="medusa", mlp_ratio=4.0)
    assert isinstance(shared.net, MedusaNet) and shared.net.placement == "shared"
    assert shared.net.gate.body_dim == 16 and shared.net.gate.num_heads == 2
    assert shared(batch["inputs"]).shape == (4, 10)
    loss, metrics = task.loss(shared, batch)
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    bare = task.build_model(16, 2, [], network="medusa")
    assert bare.net.placement is None and bare.net.parameter_count()["attention"] == 0
    assert task.build_model(16, 2, ["mhsa"], network="medusa").net.gate.attention is not None
    assert task.accepts_no_layers()
    with pytest.raises(ValueError, match=r"digits: network must be one of \('vit', 'medusa'\), got 'resnet'"):
        task.build_model(16, 2, ["mhsa"], network="resnet")
    with pytest.raises(ValueError, match="one shared attention body"):
        task.build_model(16, 2, ["medusa", "medusa"], network="medusa")
    with pytest.raises(ValueError, match="placement=None is the model without attention"):
        task.build_model(16, 2, ["medusa"], network="medusa", placement=None)
    with pytest.raises(ValueError, match="network='vit' needs at least one attention layer"):
        task.build_model(16, 2, [])


def test_example_rows_train_draws_val_slices():
    """Task.example_rows: train rows are a pure function of (seed, index); val rows the fixed wrapping slice."""
    from attnlab.tasks import create_task
    task = create_task("assoc_recall", seed=3)
    a, b = task.example_rows("train", 5, 8, 100), task.example_rows("train", 5, 8, 100)
    assert torch.equal(a, b) and a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 100
    assert not torch.equal(a, task.example_rows("train", 6, 8, 100))
    assert task.example_rows("val", 2, 4, 10).tolist() == [8, 9, 0, 1]
    with pytest.raises(ValueError, match="split must be one of"):
        task.example_rows("test", 0, 4, 10)
