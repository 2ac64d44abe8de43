"""Every seed network with BatchNorm refuses NaN / inf input with a clear error, before any BatchNorm
sees it: in training one bad input would otherwise poison the running statistics, and so every later
prediction, without an error anywhere."""
import pytest
import torch

from attnlab.models.htr_jand import HTRJAND
from attnlab.models.lsfan import LSFAN
from attnlab.models.medusa import MedusaNet
from attnlab.models.msga import MSGA
from attnlab.models.unet import UNet

CASES = {
    "medusa_net": (lambda: MedusaNet(10), (2, 28, 28)),
    "UNet": (lambda: UNet(1, 3, base=8, depth=3), (2, 1, 32, 32)),
    "MSGA": (lambda: MSGA(1, 3, dim=8), (2, 1, 32, 32)),
    "HTRJAND": (lambda: HTRJAND(10, dim=16, num_heads=2, layers=1), (2, 1, 32, 64)),
    "LSFAN": (lambda: LSFAN(4, length=16, sensors=3, num_heads=1), (2, 16, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_values_are_refused_and_batchnorm_is_untouched(name, bad):
    make, shape = CASES[name]
    torch.manual_seed(0)
    net = make().train()
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.rand(shape)
    net(x)                                                          # a good input runs
    before = [b.clone() for b in net.buffers()]
    x.view(-1)[5] = bad
    with pytest.raises(ValueError, match=rf"{name}: \w+ has 1 NaN or infinite value\(s\) of {x.numel()}"):
        net(x)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
