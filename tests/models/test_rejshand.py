"""ReJSHand's FeatureChatBlock against a naive float64 reference of the official formula; the ablations; the
finger-grid coordinate attention; the lifter and the MLP baseline; a short training that learns."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import create
from attnlab.models.rejshand import (FINGER_GRID, FeatureChatBlock, FingerGridCoordAttention, MLPLifter,
                                     ReJSHandLifter, mlp_params, mlp_width_for)
from attnlab.registry import list_specs


def naive_mhsa(block, x):
    """The official MultiHeadSelfAttention (separate biased q, k, v Linears, softmax(q k^T / sqrt(d)) v, fc_out),
    written out per head in float64 from the block's weights (attnlab's fused qkv: rows [q | k | v])."""
    attn = block.attn
    C, h = block.dim, block.num_heads
    d = C // h
    W, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ W[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C] for i in range(3))   # (B, J, C) each
    heads = []
    for j in range(h):
        sl = slice(j * d, (j + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)                 # (B, J, J)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])                        # (B, J, d)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def naive_block(block, x):
    """s = x; h = conv1x1(x); h = MHSA(h) + s; h = fc(h); relu(h + s), in float64 from the block's weights."""
    s = x
    h = x
    if block.conv is not None:
        h = h @ block.conv.weight[:, :, 0].T + block.conv.bias                          # 1x1 conv = per-token Linear
    if block.attn is not None:
        h = naive_mhsa(block, h)
    if block.skip:
        h = h + s
    h = h @ block.fc.weight.T + block.fc.bias
    if block.skip:
        h = h + s
    return torch.clamp_min(h, 0.0)


@pytest.mark.parametrize("opts", [dict(), dict(attention=None), dict(conv=False), dict(skip=False)],
                         ids=["official", "no-attention", "no-conv", "no-skip"])
def test_block_matches_naive_formula(opts):
    torch.manual_seed(0)
    block = FeatureChatBlock(32, 8, **opts).double()
    x = torch.randn(3, 21, 32, dtype=torch.float64, requires_grad=True)
    out, ref = block(x), naive_block(block, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, x, g)
    (gb,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(ga, gb)


def test_official_defaults_eight_biased_heads_no_norm():
    block = FeatureChatBlock(64)
    assert block.num_heads == 8 and block.attn.num_heads == 8 and block.mechanism == "mhsa"
    assert block.attn.qkv.bias is not None and block.attn.proj.bias is not None
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)) for m in block.modules())
    # conv (C^2 + C) + q, k, v, out (4 (C^2 + C)) + fc (C^2 + C): the official block's parameter count
    assert sum(p.numel() for p in block.parameters()) == 6 * (64 * 64 + 64)


def test_ablations_remove_what_they_say():
    full, no_attn = FeatureChatBlock(32, 4), FeatureChatBlock(32, 4, attention=None)
    no_conv, no_skip = FeatureChatBlock(32, 4, conv=False), FeatureChatBlock(32, 4, skip=False)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert no_attn.attn is None and n(full) - n(no_attn) == 4 * (32 * 32 + 32)
    assert no_conv.conv is None and n(full) - n(no_conv) == 32 * 32 + 32
    assert n(no_skip) == n(full)
    # Without attention the block is per token: changing joint 3 leaves every other joint's output alone.
    torch.manual_seed(1)
    x = torch.randn(2, 21, 32)
    y = x.clone()
    y[:, 3] += 1.0
    diff = (no_attn(x) - no_attn(y)).abs().amax(dim=(0, 2))
    assert diff[3] > 0 and torch.all(diff[torch.arange(21) != 3] == 0)
    diff = (full(x) - full(y)).abs().amax(dim=(0, 2))
    assert torch.all(diff > 0)                                              # attention mixes every joint
    # Without the skip the block's input no longer reaches the output except through fc(attn(conv(.))).
    with torch.no_grad():
        no_skip.fc.weight.zero_()
        no_skip.fc.bias.fill_(0.5)
    torch.testing.assert_close(no_skip(x), torch.full_like(x, 0.5))


def test_finger_grid_coord_attention():
    torch.manual_seed(0)
    ca = FingerGridCoordAttention(16, 4, reduction=4, min_channels=2).eval()
    x = torch.randn(2, 21, 16)
    out = ca(x)
    torch.testing.assert_close(out[:, 0], x[:, 0])                          # the wrist passes ungated
    H, W = FINGER_GRID
    torch.testing.assert_close(out[:, 1:], ca.attn(x[:, 1:].reshape(2, H, W, 16)).reshape(2, 20, 16))
    # Row (finger) and column (level) means: the index MCP (token 5) depends on the thumb CMC (token 1, same
    # level) and on the index tip (token 8, same finger), not on the wrist.
    for other, moves in ((1, True), (8, True), (0, False)):
        y = x.clone()
        y[:, other] += 1.0
        changed = (ca(y)[:, 5] - out[:, 5]).abs().max() > 0
        assert bool(changed) == moves, other
    block = FeatureChatBlock(16, 4, attention=None, coord_attn=dict(reduction=4, min_channels=2))
    assert isinstance(block.coord, FingerGridCoordAttention) and block.coord.attn.mip == 4
    with pytest.raises(ValueError, match="21 joint tokens"):
        FingerGridCoordAttention(16, 4)(torch.randn(2, 20, 16))
    with pytest.raises(ValueError, match="2-D mechanism"):
        FingerGridCoordAttention(16, 4, mechanism="mhsa")


def test_lifter_and_mlp_shapes_and_errors():
    x = torch.randn(5, 21, 3)
    for model in (ReJSHandLifter(32, 8, 2), ReJSHandLifter(32, 4, [None, {"name": "mhsa"}], coord_attn=True),
                  MLPLifter(64, 2)):
        assert model(x).shape == (5, 21, 3)
    with pytest.raises(ValueError, match=r"\(B, 21, 3\)"):
        ReJSHandLifter(32, 8, 1)(torch.randn(5, 21, 2))
    with pytest.raises(ValueError, match=r"\(B, 21, 3\)"):
        MLPLifter(64)(torch.randn(5, 20, 3))
    with pytest.raises(TypeError, match="non-empty list"):
        ReJSHandLifter(32, 8, [])
    with pytest.raises(ValueError, match="sequence mechanism"):
        FeatureChatBlock(32, 4, attention="coord_attn")
    with pytest.raises(TypeError, match="conv must be a bool"):
        FeatureChatBlock(32, 4, conv=1)
    with pytest.raises(ValueError, match="5 x 4 finger grid"):
        ReJSHandLifter(32, 4, 1, num_joints=17, coord_attn=True)


def test_any_sequence_mechanism_swaps_in():
    specs = [s for s in list_specs(layout="seq") if s.name in ("moh", "minimal", "lowrank")]
    assert specs
    for spec in specs:
        model = ReJSHandLifter(32, 4, [{"name": spec.name, **spec.test_kwargs}])
        assert model.layer_names == [spec.name] and model(torch.randn(2, 21, 3)).shape == (2, 21, 3)
        assert type(model.blocks[0].attn) is type(create(spec.name, 32, 4, **spec.test_kwargs))


def test_mlp_width_matches_parameters():
    lifter = ReJSHandLifter(64, 8, 3)
    target = sum(p.numel() for p in lifter.parameters())
    width = mlp_width_for(target, 2)
    mlp = MLPLifter(width, 2)
    assert mlp_params(width, 2) == sum(p.numel() for p in mlp.parameters())
    assert abs(mlp_params(width, 2) - target) / target < 0.01
    assert abs(mlp_params(width, 2) - target) <= min(abs(mlp_params(w, 2) - target) for w in (width - 1, width + 1))


def test_short_training_learns_well_below_the_mean_pose():
    pytest.importorskip("safetensors")
    from attnlab.tasks import create_task
    from attnlab.tasks.hand_lift import mpjpe
    from attnlab.train import TrainConfig, train
    torch.manual_seed(0)
    task = create_task("hand_lift", seed=0)
    val = [task.batch("val", i, 256) for i in range(2)]
    train_mean = torch.cat([task.batch("train", i, 256)["targets"] for i in range(8)]).mean(0)      # (21, 3)
    mean_pose = sum(float(mpjpe(train_mean.expand_as(b["targets"]), b["targets"])) for b in val) / len(val)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(task="hand_lift", layers=["mhsa"] * 2, dim=32, num_heads=8, steps=150, batch_size=128,
                             lr=1e-2, warmup=10, eval_every=150, eval_batches=2, eval_batch_size=256,
                             checkpoint_every=0, seed=0, threads=1)
        result = train(config, tmp, progress=False)
    final = result.history[-1]
    # Measured: about 49 mm after 150 steps against about 90 mm for the mean training pose.
    assert final["val_mpjpe"] < 0.65 * mean_pose, (final["val_mpjpe"], mean_pose)
    assert final["val_pa_mpjpe"] < final["val_mpjpe"]
