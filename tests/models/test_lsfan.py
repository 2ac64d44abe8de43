"""L-SFAN: shapes and errors, the parameter count at the paper's input, each official block against a
naive float64 reference written from the official code (conv stack with BN and pools, the oriented
pooling, the post-norm encoder layer's attention), the whole network against torch's own modules
laid out as the official CNN_TAP_Att (through `from_official`), another mechanism swapped in, and a
short training on real BasicMotions data that learns."""
import math
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.models import LSFAN, LSFANConvStack, LSFANEncoderLayer, oriented_pool
from attnlab.models.lsfan import pooled_length


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (eval mode uses the latter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.3 * torch.randn(c, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=m.running_var.dtype))


# --- naive references (float64, written from the official code: Conv2d k=3 padding (0, 1), BN, ReLU,
# --- MaxPool2d((2, 1)); AdaptiveAvgPool2d; nn.TransformerEncoderLayer's post-norm formula) --------

def naive_conv(x, w, b):
    """x (B, Cin, H, W), w (Cout, Cin, 3, 3): valid in H, zero padding 1 in W, as sums of shifted products."""
    B, Cin, H, W = x.shape
    xp = torch.zeros(B, Cin, H, W + 2, dtype=x.dtype)
    xp[..., 1:-1] = x
    out = torch.zeros(B, w.shape[0], H - 2, W, dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            patch = xp[:, :, di:di + H - 2, dj:dj + W]                    # (B, Cin, H-2, W)
            out += torch.einsum("bchw,oc->bohw", patch, w[:, :, di, dj])
    return out + b[None, :, None, None]


def naive_bn(x, bn, *, training):
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps) \
        * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def naive_pool_time(x):
    """MaxPool2d((2, 1), stride (2, 1)): the max of rows 2i and 2i+1, a last odd row dropped."""
    H = x.shape[2] // 2
    return torch.maximum(x[:, :, 0:2 * H:2], x[:, :, 1:2 * H:2])


def naive_stack(stack: LSFANConvStack, x, *, training=False):
    convs = [m for m in stack.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in stack.features if isinstance(m, nn.BatchNorm2d)]
    h = x
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        h = torch.relu(naive_bn(naive_conv(h, conv.weight, conv.bias), bn, training=training))
        if i in (1, 3):
            h = naive_pool_time(h)
    return h


def naive_layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def naive_mhsa(x, wqkv, bqkv, wo, bo, heads):
    """softmax(q k^T / sqrt(d)) v per head, the fused in-projection laid out [q; k; v], heads in order."""
    B, N, C = x.shape
    d = C // heads
    q, k, v = (x @ wqkv.T + bqkv).split(C, dim=-1)
    outs = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)     # (B, N, N)
        outs.append(torch.softmax(scores, -1) @ v[..., sl])                 # (B, N, d)
    return torch.cat(outs, -1) @ wo.T + bo


def naive_encoder_layer(layer: LSFANEncoderLayer, x, heads):
    a = layer.attn
    x = naive_layer_norm(x + naive_mhsa(x, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias, heads), layer.norm1)
    ff = torch.relu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return naive_layer_norm(x + ff, layer.norm2)


# --- tests ----------------------------------------------------------------------------------------

def test_parameter_count_at_the_papers_input():
    model = LSFAN()                                  # 2 classes, 180 x 30, TAP, mhsa with 5 heads, ff 30
    count = sum(p.numel() for p in model.parameters())
    assert count == 8282
    stack = sum(p.numel() for p in model.stack.parameters())
    layer = sum(p.numel() for p in model.encoder[0].parameters())
    attn = sum(p.numel() for p in model.encoder[0].attn.parameters())
    assert (stack, layer, attn) == (1620, 5700, 3720)
    assert sum(p.numel() for p in model.head.parameters()) == 16 * 30 * 2 + 2
    # the code's CNN_TAP (no attention): the stack and the head
    assert sum(p.numel() for p in LSFAN(attention=None).parameters()) == 1620 + 962


@pytest.mark.parametrize("pooling,width", [("tap", 6), ("sap", pooled_length(100))])
def test_shapes(pooling, width):
    model = LSFAN(4, length=100, sensors=6, num_heads=2, pooling=pooling).eval()
    x = torch.randn(3, 100, 6)
    assert pooled_length(100) == 22 and pooled_length(180) == 42
    assert model.stack(x.unsqueeze(1)).shape == (3, 16, 22, 6)
    assert model.features(x).shape == (3, 16, width) and model.width == width
    assert model(x).shape == (3, 4)
    torch.testing.assert_close(model(x.unsqueeze(1)), model(x))            # the official (B, 1, T, S) too
    plain = LSFAN(4, length=100, sensors=6, pooling=pooling, attention=None)
    assert not plain.attention and len(plain.encoder) == 0 and plain(x).shape == (3, 4)
    two = LSFAN(4, length=100, sensors=6, num_heads=2, pooling=pooling, num_layers=2)
    assert len(two.encoder) == 2 and two(x).shape == (3, 4)


def test_bad_input_and_options_say_what_was_expected():
    model = LSFAN(4, length=100, sensors=6, num_heads=2)
    with pytest.raises(ValueError, match=r"expected x \(B, T, S\) = \(B, 100, 6\)"):
        model(torch.randn(2, 100, 5))
    with pytest.raises(ValueError, match=r"num_heads=4 does not divide the token width 6.*\[1, 2, 3, 6\]"):
        LSFAN(4, length=100, sensors=6, num_heads=4)
    with pytest.raises(ValueError, match=r"pooled time T' = 22 .*\[1, 2, 11, 22\]"):
        LSFAN(4, length=100, sensors=6, num_heads=4, pooling="sap")
    with pytest.raises(ValueError, match="length must be an int >= 16"):
        LSFAN(4, length=15, sensors=6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        LSFAN(4, length=100, sensors=6, pooling="max")
    with pytest.raises(TypeError, match="attention must be a mechanism name"):
        LSFAN(4, length=100, sensors=6, num_heads=2, attention=3)
    with pytest.raises(ValueError, match="unknown"):
        LSFAN(4, length=100, sensors=6, num_heads=2, attention="no_such_mechanism")


@pytest.mark.parametrize("training", [False, True])
def test_conv_stack_matches_naive_reference(training):
    torch.manual_seed(0)
    stack = LSFANConvStack().double()
    randomize_bn(stack)
    stack.train(training)
    x = torch.randn(3, 1, 37, 5, dtype=torch.float64)                       # odd T: the pools drop a row
    ref = naive_stack(stack, x, training=training)
    assert ref.shape == (3, 16, pooled_length(37), 5)
    torch.testing.assert_close(stack(x), ref)


def test_oriented_pooling_matches_explicit_means():
    f = torch.randn(2, 16, 7, 5, dtype=torch.float64)
    tap = torch.stack([sum(f[:, :, t, :] for t in range(7)) / 7], 0)[0]     # over time -> (B, C, S)
    sap = torch.stack([sum(f[:, :, :, s] for s in range(5)) / 5], 0)[0]     # over sensors -> (B, C, T')
    torch.testing.assert_close(oriented_pool(f, "tap"), tap)
    torch.testing.assert_close(oriented_pool(f, "sap"), sap)
    # TAP is the official AdaptiveAvgPool2d((1, W)); SAP (over sensors) is AdaptiveAvgPool2d((H, 1))
    torch.testing.assert_close(oriented_pool(f, "tap"), nn.AdaptiveAvgPool2d((1, 5))(f).squeeze(2))
    torch.testing.assert_close(oriented_pool(f, "sap"), nn.AdaptiveAvgPool2d((7, 1))(f).squeeze(3))


def test_the_official_cnn_sap_pooling_is_a_time_mean_resampled_not_a_sensor_mean():
    """The code's CNN_SAP calls AdaptiveAvgPool2d((1, H)) on (B, 16, H, W): height 1 averages over
    TIME, and the sensor axis is resampled from W to H adaptive bins. The docstring's deviation."""
    f = torch.randn(2, 16, 7, 5, dtype=torch.float64)
    official = nn.AdaptiveAvgPool2d((1, 7))(f).squeeze(2)                   # (B, 16, 7)
    torch.testing.assert_close(official, F.adaptive_avg_pool1d(f.mean(2), 7))
    assert not torch.allclose(official, oriented_pool(f, "sap"))


@pytest.mark.parametrize("width,heads", [(30, 5), (6, 2), (12, 3)])
def test_encoder_layer_matches_naive_post_norm_attention(width, heads):
    torch.manual_seed(0)
    layer = LSFANEncoderLayer(width, heads, dim_feedforward=width + 3).double().eval()
    with torch.no_grad():                        # LayerNorm affine away from (1, 0) so it is checked
        for ln in (layer.norm1, layer.norm2):
            ln.weight.add_(0.3 * torch.randn_like(ln.weight))
            ln.bias.add_(0.3 * torch.randn_like(ln.bias))
    x = torch.randn(2, 16, width, dtype=torch.float64, requires_grad=True)
    out, ref = layer(x), naive_encoder_layer(layer, x, heads)
    torch.testing.assert_close(out, ref)
    g1, = torch.autograd.grad(out.square().sum(), x)
    g2, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g1, g2)
    # the official defaults for mhsa: biases on q/k/v and out, dropout on the probabilities
    assert layer.attn.qkv.bias is not None and layer.attn.attn_drop == 0.2


def official_cnn_tap_att(length, sensors, classes, heads, pooling="tap", attention=True):
    """torch's own modules laid out as the official CNN_TAP_Att / CNN_TAP (names included)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, (3, 3), padding=(0, 1)), nn.BatchNorm2d(cout), nn.ReLU()]
    m = nn.Module()
    m.FrameFeatureExtractor = nn.Sequential(*block(1, 2), *block(2, 4), nn.MaxPool2d((2, 1), (2, 1)),
                                            *block(4, 8), *block(8, 16), nn.MaxPool2d((2, 1), (2, 1)))
    width = sensors
    if attention:
        m.encoderlayer = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=width, dropout=0.2,
                                                    batch_first=True, norm_first=False)
        m.encoder = nn.TransformerEncoder(m.encoderlayer, num_layers=1, enable_nested_tensor=False)
    m.Classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * width, classes))

    def forward(frame):
        f = m.FrameFeatureExtractor(frame)                                   # (B, 16, T', S)
        pooled = nn.AdaptiveAvgPool2d((1, f.shape[3]))(f).squeeze(2)         # TAP: (B, 16, S)
        return m.Classifier(m.encoder(pooled) if attention else pooled)
    m.forward = forward
    return m


@pytest.mark.parametrize("length,sensors,classes,heads,pooling,attention",
                         [(180, 30, 2, 5, "tap", True), (60, 6, 4, 3, "tap", True), (100, 6, 4, 0, "tap", False)])
def test_whole_network_equals_torchs_modules_in_the_official_layout(length, sensors, classes, heads, pooling,
                                                                    attention):
    torch.manual_seed(1)
    official = official_cnn_tap_att(length, sensors, classes, heads, pooling, attention).double()
    randomize_bn(official)
    official.eval()
    options = dict(num_classes=classes, length=length, sensors=sensors, pooling=pooling)
    if attention:
        options["num_heads"] = heads
    else:
        options["attention"] = None
    ours = LSFAN.from_official(official.state_dict(), **options).double().eval()
    x = torch.randn(4, 1, length, sensors, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official.forward(x))
    # the official module also registers the template encoderlayer (never run): its parameters()
    # over-count by one layer; the used ones are ours
    if attention and (length, sensors) == (180, 30):
        assert sum(p.numel() for p in official.parameters()) == 8282 + 5700


def test_another_mechanism_swaps_in():
    x = torch.randn(2, 100, 6)
    for attention in ("proxima", {"name": "moh", "shared_heads": 1, "top_k": 1}, ["mhsa", "routing"]):
        num_layers = len(attention) if isinstance(attention, list) else 1
        model = LSFAN(4, length=100, sensors=6, num_heads=2, attention=attention, num_layers=num_layers)
        assert model(x).shape == (2, 4)
    assert LSFAN(4, length=100, sensors=6, num_heads=2, attention="proxima").encoder[0].mechanism == "proxima"


def test_short_training_on_basic_motions_learns():
    from attnlab.tasks import create_task
    from attnlab.tasks.uea import find_files
    from attnlab.train import TrainConfig, train
    try:
        find_files("BasicMotions")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config = TrainConfig(task="uea", task_options={"dataset": "BasicMotions"}, layers=["mhsa"], dim=32, num_heads=2,
                         mlp_ratio=1.0, block_options={"pooling": "tap"}, steps=150, batch_size=32, lr=3e-3, warmup=10,
                         eval_every=150, eval_batches=1, eval_batch_size=40, log_every=150, checkpoint_every=0,
                         seed=0, threads=1)
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, folder, progress=False)
    # 4 balanced classes: chance is 0.25 and log(4) = 1.39 nats; the 40 test series are the val split
    assert result.history[0]["val_accuracy"] <= 0.5
    assert result.final["val_accuracy"] >= 0.8
    assert result.final["val_loss"] < 0.5 * math.log(4)
    assert create_task("uea", dataset="BasicMotions").num_examples("val") == 40
