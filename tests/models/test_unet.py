"""attnlab.models.unet: the forward rebuilt from its parts in the U-Net order (encoder blocks with 2x2
max-pooling, transposed-conv up, skip concatenated before the decoder block), the parameter count by
hand, shapes and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attnlab.models.unet import UNet


def test_forward_is_the_u_net_wiring():
    m = UNet(1, 3, base=4, depth=3).double().eval()
    x = torch.randn(2, 1, 16, 12, dtype=torch.float64)
    e0 = m.down[0](x)                                           # (2, 4, 16, 12)
    e1 = m.down[1](F.max_pool2d(e0, 2))                         # (2, 8, 8, 6)
    e2 = m.down[2](F.max_pool2d(e1, 2))                         # (2, 16, 4, 3)
    d1 = m.merge[1](torch.cat((e1, m.up[1](e2)), 1))            # skip first, then the upsampled path
    d0 = m.merge[0](torch.cat((e0, m.up[0](d1)), 1))
    assert_close(m(x), m.head(d0), rtol=1e-12, atol=1e-12)
    assert m(x).shape == (2, 3, 16, 12)


def test_parameter_count_by_hand():
    base, depth, k = 5, 4, 3
    def block(i, o):                                             # two 3x3 convs with bias + two BatchNorms
        return (i * o * 9 + o) + (o * o * 9 + o) + 4 * o
    widths = [base * 2 ** i for i in range(depth)]
    want = sum(block(c, w) for c, w in zip([1] + widths[:-1], widths))
    want += sum(widths[i + 1] * widths[i] * 4 + widths[i] + block(2 * widths[i], widths[i]) for i in range(depth - 1))
    want += widths[0] * k + k
    assert sum(p.numel() for p in UNet(1, k, base, depth).parameters()) == want


def test_bad_input():
    with pytest.raises(ValueError, match=r"H, W divisible by 8, got \(1, 1, 20, 16\)"):
        UNet(1, 3, 4, 4)(torch.randn(1, 1, 20, 16))
    with pytest.raises(ValueError, match="depth must be an int >= 2"):
        UNet(1, 3, 4, 1)
