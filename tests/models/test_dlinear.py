"""attnlab.models.dlinear against numpy: an edge-padded moving average and the two linear maps."""
import numpy as np
import pytest
import torch

from attnlab.models.dlinear import DLinear, moving_average


def test_moving_average_is_numpy_convolve_with_edge_padding():
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    got = moving_average(x, 25).numpy()
    for b in range(2):
        for c in range(3):
            padded = np.pad(x[b, :, c].numpy(), 12, mode="edge")
            np.testing.assert_allclose(got[b, :, c], np.convolve(padded, np.ones(25) / 25, mode="valid"), rtol=1e-12)
    with pytest.raises(ValueError, match="positive odd"):
        moving_average(x, 4)


@pytest.mark.parametrize("individual", [False, True])
def test_dlinear_is_seasonal_plus_trend_maps(individual):
    torch.manual_seed(0)
    m = DLinear(30, 7, 3, individual=individual).double()
    x = torch.randn(4, 30, 3, dtype=torch.float64)
    trend = moving_average(x, 25)
    out = m(x)
    for c in range(3):
        k = c if individual else 0
        expect = m.seasonal[k](x[:, :, c] - trend[:, :, c]) + m.trend[k](trend[:, :, c])
        torch.testing.assert_close(out[:, :, c], expect)
    assert out.shape == (4, 7, 3)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 30, 3\)"):
        m(torch.randn(4, 29, 3))


def test_dlinear_gradients_and_non_finite_input():
    m = DLinear(30, 7, 3).double()
    x = torch.randn(2, 30, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    x = torch.randn(2, 30, 3)
    x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        DLinear(30, 7, 3)(x)
