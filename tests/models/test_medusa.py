"""attnlab.models.medusa (MedusaNet) against naive float64 references and its stated wiring.

The ResNet basic block is written out with F.conv2d and the eval-mode BatchNorm formula
(x - mean) / sqrt(var + eps) * gamma + beta; the shared-body network is recomputed step by step
from that formula and the gate formula X_s * sigmoid(bilinear(Head_s(t))), with t computed ONCE
from the stem's output (the MedusaGate body itself is checked against its naive reference in
tests/mechanisms/test_medusa.py). The isolated ablation's gates read their own stage's output;
the no-attention ablation is the bare backbone. Plus shapes, swapped body attentions, bad input
and a short training on sklearn's digits that learns.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attnlab.mechanisms.danet import DANetPositionAttention2d
from attnlab.mechanisms.mhsa import MultiHeadAttention
from attnlab.models.medusa import BasicBlock, MedusaNet

TIGHT = dict(rtol=1e-10, atol=1e-12)


def randomise_bn(net):
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype))
    return net


def naive_bn(x, bn):
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def naive_block(x, blk):
    """relu(BN2(conv2(relu(BN1(conv1(x))))) + shortcut(x)), shortcut = BN(conv1x1) or identity."""
    y = F.conv2d(x, blk.conv1.weight, stride=blk.conv1.stride, padding=1)
    y = torch.relu(naive_bn(y, blk.bn1))
    y = naive_bn(F.conv2d(y, blk.conv2.weight, padding=1), blk.bn2)
    if isinstance(blk.shortcut, torch.nn.Identity):
        s = x
    else:
        conv, bn = blk.shortcut
        s = naive_bn(F.conv2d(x, conv.weight, stride=conv.stride), bn)
    return torch.relu(y + s)


def naive_gate(t, x, head):
    """x (B, C, H, W) * sigmoid(Resize(Head(t))), t (B, h', w', D)."""
    a = (t @ head.weight.T + head.bias).permute(0, 3, 1, 2)            # (B, C, h', w')
    if a.shape[2:] != x.shape[2:]:
        a = F.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=False)
    return x * torch.sigmoid(a)


def naive_net(net, images, gate=True):
    x = images.unsqueeze(1)                                             # (B, 1, H, W)
    stem_conv, stem_bn, _ = net.stem
    x = torch.relu(naive_bn(F.conv2d(x, stem_conv.weight, padding=1), stem_bn))
    t = net.gate.body(x.permute(0, 2, 3, 1)) if gate else None         # (B, H/p, W/p, D), once
    for s, blk in enumerate(net.stages):
        x = naive_block(x, blk)
        if gate:
            x = naive_gate(t, x, net.gate.heads[s])
    return x.mean(dim=(2, 3)) @ net.head.weight.T + net.head.bias


def test_basic_block_matches_naive_reference():
    for cin, cout, stride in [(4, 4, 1), (4, 6, 2), (3, 5, 1)]:
        blk = randomise_bn(BasicBlock(cin, cout, stride)).double().eval()
        x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
        assert_close(blk(x), naive_block(x, blk), **TIGHT)


def test_shared_network_matches_naive_composition():
    net = randomise_bn(MedusaNet(7, image_size=12, stem_width=6, widths=(6, 8, 10), body_dim=8, num_heads=2))
    net = net.double().eval()
    images = torch.randn(3, 12, 12, dtype=torch.float64)
    assert_close(net(images), naive_net(net, images), **TIGHT)
    assert_close(net(images.unsqueeze(-1)), net(images), **TIGHT)


def test_bare_backbone_is_the_network_without_gates():
    net = randomise_bn(MedusaNet(7, image_size=12, stem_width=6, widths=(6, 8, 10), placement=None)).double().eval()
    assert net.parameter_count()["attention"] == 0
    assert net.gate is None and net.gates is None
    images = torch.randn(2, 12, 12, dtype=torch.float64)
    assert_close(net(images), naive_net(net, images, gate=False), **TIGHT)


def test_the_shared_body_runs_once_and_gates_every_stage():
    net = MedusaNet(10)
    fired = {"hook_q": [], "hook_gates": []}
    for name in fired:
        getattr(net.gate, name).register_forward_hook(lambda m, i, o, n=name: fired[n].append(tuple(o.shape)))
    net(torch.randn(2, 28, 28))
    assert fired["hook_q"] == [(2, 4, 196, 16)]                       # 14 x 14 tokens of the 28 x 28 stem map
    assert fired["hook_gates"] == [(2, 28, 28, 16), (2, 14, 14, 32), (2, 7, 7, 64)]


def test_isolated_gates_read_their_own_stage():
    net = MedusaNet(10, placement="isolated")
    assert net.gate is None and len(net.gates) == 3
    sources = []
    for g in net.gates:
        g.embed.register_forward_hook(lambda m, i, o: sources.append(tuple(i[0].shape)))
    net(torch.randn(2, 28, 28))
    # NCHW inputs of each body's patch embedding: the stage's own output (7 x 7 takes stride 1)
    assert sources == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]
    assert [g.stride for g in net.gates] == [2, 2, 1]


@pytest.mark.parametrize("placement", ["shared", "isolated", None])
def test_shapes_and_parameter_counts(placement):
    net = MedusaNet(10, placement=placement)
    out = net(torch.randn(4, 28, 28))
    assert out.shape == (4, 10)
    feats = net.features(torch.randn(1, 28, 28, 1))
    assert [tuple(f.shape) for f in feats] == [(1, 28, 28, 16), (1, 14, 14, 32), (1, 7, 7, 64)]
    counts = net.parameter_count()
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    bare = MedusaNet(10, placement=None).parameter_count()["total"]
    assert counts["total"] - counts["attention"] == bare


@pytest.mark.parametrize("name,cls", [("mhsa", MultiHeadAttention), ("danet_pam", DANetPositionAttention2d)])
def test_body_attention_swaps_by_name(name, cls):
    net = MedusaNet(10, attention=name)
    assert type(net.gate.attention) is cls
    assert net.gate.attention_layout == ("2d" if name == "danet_pam" else "seq")
    assert net(torch.randn(2, 28, 28)).shape == (2, 10)
    assert MedusaNet(10).gate.attention is None                        # "medusa": the built-in body


def test_bad_input_and_options():
    net = MedusaNet(10)
    with pytest.raises(ValueError, match=r"medusa_net: expected images \(B, 28, 28, 1\) channels-last or "
                                         r"\(B, 28, 28\), got \(2, 27, 28\)"):
        net(torch.randn(2, 27, 28))
    with pytest.raises(TypeError, match="medusa_net: expected floating point images, got torch.int64"):
        net(torch.zeros(2, 28, 28, dtype=torch.long))
    bad = torch.randn(2, 28, 28)
    bad[1, 3, 4] = float("nan")
    before = [b.clone() for b in net.buffers()]
    with pytest.raises(ValueError, match="medusa_net: images has 1 NaN or infinite value"):
        net.train()(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))      # BatchNorm stats untouched
    with pytest.raises(ValueError, match="placement must be one of"):
        MedusaNet(10, placement="everywhere")
    with pytest.raises(ValueError, match="widths and strides must be non-empty and of equal length"):
        MedusaNet(10, widths=(8, 16), strides=(1,))
    with pytest.raises(ValueError, match=r"must be a 'seq' or '2d' mechanism, got 'cross_mhsa' \(layout 'cross'\)"):
        MedusaNet(10, attention="cross_mhsa")
    with pytest.raises(ValueError, match="image_size=27 must be a multiple of body_stride=2"):
        MedusaNet(10, image_size=27)


def test_short_training_learns_digits():
    """60 steps on sklearn's 8 x 8 digits through attnlab.train: far above chance (10%)."""
    pytest.importorskip("sklearn")
    from attnlab.train import TrainConfig, train
    config = TrainConfig(task="digits", layers=["medusa"], dim=16, num_heads=2,
                         block_options={"network": "medusa", "widths": (8, 16, 16), "stem_width": 8},
                         steps=60, batch_size=32, lr=3e-3, warmup=10, eval_every=60, eval_batches=4,
                         eval_batch_size=64, checkpoint_every=0, seed=0)
    result = train(config, None, progress=False)
    assert result.final["val_accuracy"] > 0.6, result.final
