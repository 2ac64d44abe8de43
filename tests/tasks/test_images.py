import numpy as np
import pytest
import torch

from attnlab.tasks._images import pixel_statistics, patchify


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
