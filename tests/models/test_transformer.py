"""Block, Transformer, CausalLM and Classifier: structure, equivalences, caching, training sanity."""
import pytest
import torch
import torch.nn as nn

import attnlab
from attnlab.models import parse_layer
from attnlab.registry import _REGISTRY


def test_block_is_prenorm_residual():
    block = attnlab.Block(32, 4, mlp_ratio=2.0).eval()
    x = torch.randn(2, 9, 32)
    h = x + block.attn(block.norm1(x), is_causal=True)
    want = h + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x, is_causal=True), want)


def test_block_without_mlp_has_no_mlp_parameters():
    with_mlp = attnlab.Block(32, 4, mlp_ratio=4.0)
    without = attnlab.Block(32, 4, mlp_ratio=0)
    assert without.mlp is None
    mlp_params = 2 * 32 * 128 + 128 + 32 + 2 * 32  # fc1, fc2 (+ biases) and norm2
    assert sum(p.numel() for p in with_mlp.parameters()) - sum(p.numel() for p in without.parameters()) == mlp_params


@pytest.mark.parametrize("layer, want", [
    ("mhsa", ("mhsa", {})),
    ("deconstructed:fixed", ("deconstructed:fixed", {})),
    (("mhsa", {"qkv_bias": True}), ("mhsa", {"qkv_bias": True})),
    ({"name": "mhsa", "qk_norm": True}, ("mhsa", {"qk_norm": True})),
])
def test_parse_layer_forms(layer, want):
    assert parse_layer(layer) == want


def test_parse_layer_spec_and_errors():
    assert parse_layer(attnlab.get_spec("mhsa")) == ("mhsa", {})
    with pytest.raises(TypeError, match="a layer must be"):
        parse_layer(3)
    with pytest.raises(ValueError, match="'name'"):
        parse_layer({"qkv_bias": True})


def test_transformer_layers_and_options():
    body = attnlab.Transformer(32, 4, [("mhsa", {"qk_norm": True}), "mhsa"], mlp_ratio=1.0)
    assert body.layer_names == ["mhsa", "mhsa"]
    assert isinstance(body.blocks[0].attn.q_norm, nn.LayerNorm)
    assert isinstance(body.blocks[1].attn.q_norm, nn.Identity)
    assert attnlab.Transformer(32, 4, 3).layer_names == ["mhsa"] * 3
    with pytest.raises(TypeError, match="wrap it in a list"):
        attnlab.Transformer(32, 4, "mhsa")
    with pytest.raises(ValueError, match="unknown mechanism"):
        attnlab.Transformer(32, 4, ["mhsaa"])
    with pytest.raises(TypeError, match="unknown option 'qkv_biass'"):
        attnlab.Transformer(32, 4, [("mhsa", {"qkv_biass": True})])
    with pytest.raises(ValueError, match="one KVCache per layer"):
        body(torch.randn(1, 3, 32), is_causal=True, cache=[attnlab.KVCache()])


def test_causal_lm_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    lm = attnlab.CausalLM(50, 32, 4, 3, max_len=32).double().eval()
    tokens = torch.randint(0, 50, (2, 12))
    full = lm(tokens)
    cache = lm.new_cache()
    steps = [lm(tokens[:, :5], cache=cache)] + [lm(tokens[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_causal_lm_no_leak_and_greedy_generate():
    lm = attnlab.CausalLM(50, 32, 4, 2, max_len=32).eval()
    a = torch.randint(0, 50, (1, 10))
    b = a.clone()
    b[:, 6:] = torch.randint(0, 50, (1, 4))
    torch.testing.assert_close(lm(a)[:, :6], lm(b)[:, :6])
    out = lm.generate(a[:, :4], 6, temperature=0)
    assert out.shape == (1, 10)
    # greedy decoding with the cache equals greedy decoding by recomputing the prefix
    ids = a[:, :4]
    for _ in range(6):
        ids = torch.cat([ids, lm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_causal_lm_learns_a_tiny_batch():
    torch.manual_seed(0)
    lm = attnlab.CausalLM(16, 32, 4, 2, max_len=16)
    tokens = torch.randint(0, 16, (4, 12))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        _, loss = lm(tokens[:, :-1], tokens[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_causal_lm_bad_input():
    lm = attnlab.CausalLM(10, 16, 2, 1, max_len=8)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        lm(torch.tensor([[3, 12]]))
    with pytest.raises(ValueError, match="exceeds max_len=8"):
        lm(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        lm(torch.randn(1, 4))
    with pytest.raises(ValueError, match="targets must have the shape"):
        lm(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_classifier_ignores_padding(pool):
    torch.manual_seed(0)
    clf = attnlab.Classifier(5, 32, 4, 2, in_dim=8, pool=pool, max_len=16).double().eval()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    y = clf(x, attn_mask=mask)
    x2 = x.clone()
    x2[0, 5:] = 1e3 * torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(clf(x2, attn_mask=mask), y)
    # the padded sample alone, unpadded, gives the same logits
    torch.testing.assert_close(clf(x[:1, :5]), y[:1])


def test_classifier_bad_input():
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        attnlab.Classifier(5, 16, 2, 1)
    clf = attnlab.Classifier(5, 16, 2, 1, in_dim=4)
    with pytest.raises(ValueError, match=r"expected features \(B, N, 4\)"):
        clf(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="key-padding"):
        clf(torch.randn(2, 3, 4), attn_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pool must be"):
        attnlab.Classifier(5, 16, 2, 1, in_dim=4, pool="max")


@pytest.fixture
def aux_mechanism():
    @attnlab.register(attnlab.MechanismSpec(
        name="_test_aux", paper="test", year=2026, family="test", layout="seq", time="-", memory="-",
        exact=False, causal=True))
    class WithAux(nn.Module):
        def __init__(self, dim, num_heads=8):
            super().__init__()
            self.lin = nn.Linear(dim, dim)
            self.aux_loss = None

        def forward(self, x, *, attn_mask=None, is_causal=False, cache=None):
            self.aux_loss = x.pow(2).mean()
            return self.lin(x)
    yield WithAux
    del _REGISTRY["_test_aux"]


def test_aux_losses_are_summed(aux_mechanism):
    body = attnlab.Transformer(8, 2, ["_test_aux", "mhsa", "_test_aux"])
    assert body.aux_loss is None
    body(torch.randn(2, 3, 8))
    want = body.blocks[0].attn.aux_loss + body.blocks[2].attn.aux_loss
    torch.testing.assert_close(body.aux_loss, want)


def test_block_runs_a_2d_mechanism_on_grid_tokens():
    # A 2-D mechanism in a Block sees the tokens as the (H, W) image they came from, row-major.
    block = attnlab.Block(16, 2, mechanism=("neighborhood2d", {"kernel_size": 3}), mlp_ratio=0, grid=(4, 5)).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    image = block.norm1(x).reshape(2, 4, 5, 16)
    expected = x + block.attn(image).reshape(2, 20, 16)
    torch.testing.assert_close(block(x), expected)
    with pytest.raises(ValueError, match="expected 20 tokens"):
        block(torch.randn(2, 21, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="grid"):
        attnlab.Block(16, 2, mechanism="neighborhood2d")
    with pytest.raises(ValueError, match="is_causal"):
        block(x, is_causal=True)


def test_classifier_mixes_2d_and_sequence_layers_on_image_tokens():
    clf = attnlab.Classifier(10, 16, 2, [("halo2d", {"block_size": 2, "halo_size": 1}), "mhsa"], in_dim=4,
                             max_len=16, grid=(4, 4))
    out = clf(torch.randn(3, 16, 4))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_pos_std_sets_the_position_scale_and_rejects_bad_values():
    lm = attnlab.CausalLM(11, 32, 4, 1, max_len=4096, pos_std=1.0)
    assert 0.95 < lm.embed.pos_embed.std().item() < 1.05
    assert attnlab.Classifier(3, 32, 4, 1, in_dim=5, max_len=4096).embed.pos_embed.std().item() < 0.03
    with pytest.raises(ValueError, match="pos_std"):
        attnlab.CausalLM(11, 32, 4, 1, pos_std=-1.0)
