"""DiT: shapes, patchify/unpatchify, adaLN-Zero's identity blocks at init, one block against a naive
float64 forward written from the paper's Fig. 3, the embeddings against their formulas, the noise
schedule, and capture's hook points on a DiT."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.models import DiT, DiTBlock, NoiseSchedule
from attnlab.models.dit import sincos_2d, timestep_embedding
from attnlab.probes.capture import capture, hook_names


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Every parameter redrawn (the adaLN-Zero init leaves gates at 0, which would hide the branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    opts = dict(input_size=8, patch_size=2, in_channels=1, dim=16, num_heads=4, layers=2, num_classes=3)
    opts.update(kw)
    return DiT(**opts).eval()


def test_shapes_and_patch_round_trip():
    model = tiny(input_size=28, patch_size=4, dim=32, in_channels=2)
    x = torch.randn(3, 2, 28, 28)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 1, 3])       # 3 = the null class
    assert model(x, t, y).shape == (3, 2, 28, 28)
    assert model.patchify(x).shape == (3, 49, 32)
    assert model.num_patches == 49 and model.null_class == 3
    # unpatchify inverts the row-major cut into p x p patches, each laid out (p_row, p_col, C)
    p, g = 4, 7
    tokens = x.reshape(3, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(3, g * g, p * p * 2)
    assert torch.equal(model.unpatchify(tokens), x)
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(3, 1, 28, 28), t, y)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\]"):
        model(x, t, torch.tensor([0, 1, 4]))


def test_adaln_zero_init_makes_every_block_the_identity_and_the_output_zero():
    model = tiny()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    h, c = model.patchify(x), model.condition(t, y)
    assert c.abs().max() > 0                                            # the condition is not trivially 0
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    # after training-like changes the blocks are no longer identities
    randomize(model.blocks[0])
    assert not torch.equal(model.blocks[0](h, c), h)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def naive_block(block: DiTBlock, x, c, num_heads):
    """DiT Fig. 3 (adaLN-Zero) written out with loops over heads, float64."""
    B, N, C = x.shape
    d = C // num_heads
    lin = block.adaLN_modulation[1]
    mod = (c * torch.sigmoid(c)) @ lin.weight.T + lin.bias             # SiLU then Linear, (B, 6C)
    shift1, scale1, gate1, shift2, scale2, gate2 = [mod[:, i * C:(i + 1) * C] for i in range(6)]

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6)

    a = ln(x) * (1 + scale1[:, None]) + shift1[:, None]
    qkv = a @ block.attn.qkv.weight.T + block.attn.qkv.bias              # (B, N, 3C)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    heads = []
    for j in range(num_heads):
        sl = slice(j * d, (j + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)   # (B, N, N)
        heads.append(w @ v[..., sl])
    attn = torch.cat(heads, -1) @ block.attn.proj.weight.T + block.attn.proj.bias
    x = x + gate1[:, None] * attn
    m = ln(x) * (1 + scale2[:, None]) + shift2[:, None]
    hidden = gelu_tanh(m @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + gate2[:, None] * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)


def test_block_forward_matches_a_naive_reference():
    torch.manual_seed(0)
    block = DiTBlock(16, 4, mlp_ratio=2.0).double().eval()
    randomize(block)
    x, c = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x, c), naive_block(block, x, c, 4), rtol=1e-10, atol=1e-10)
    assert block.attn.qkv.bias is not None                             # DiT: qkv bias on


def test_whole_model_matches_naive_blocks_end_to_end():
    model = tiny().double()
    randomize(model)
    x, t, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 900]), torch.tensor([1, 3])
    h = F.conv2d(x, model.x_embedder.weight, model.x_embedder.bias, stride=2).flatten(2).transpose(1, 2)
    h = h + model.pos_embed
    te = timestep_embedding(t, 256).double()
    temb = model.t_embedder[2](F.silu(model.t_embedder[0](te)))
    c = temb + model.y_embedder.weight[y]
    for block in model.blocks:
        h = naive_block(block, h, c, 4)
    fl = model.final_layer
    mod = F.silu(c) @ fl.adaLN_modulation[1].weight.T + fl.adaLN_modulation[1].bias
    shift, scale = mod[:, :16], mod[:, 16:]
    out = F.layer_norm(h, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = out @ fl.linear.weight.T + fl.linear.bias                      # (B, 16, 4)
    torch.testing.assert_close(model(x, t, y), model.unpatchify(out), rtol=1e-10, atol=1e-10)


def test_sincos_positions_and_timestep_embedding_follow_their_formulas():
    dim, grid = 8, 3
    pos = sincos_2d(dim, grid)
    assert pos.shape == (9, 8)
    for n in range(9):
        r, col = divmod(n, grid)
        for j in range(dim):
            half, q = divmod(j, dim // 2)                 # half 0: column, half 1: row
            p = (col, r)[half]
            k = q % (dim // 4)
            w = 10000 ** (-k / (dim / 4))
            want = math.sin(p * w) if q < dim // 4 else math.cos(p * w)
            assert abs(float(pos[n, j]) - want) < 1e-6
    t = torch.tensor([0.0, 7.0, 999.0])
    emb = timestep_embedding(t, 6, max_period=100.0)
    for i, tv in enumerate(t.tolist()):
        for j in range(3):
            f = 100.0 ** (-j / 3)
            assert abs(float(emb[i, j]) - math.cos(tv * f)) < 1e-5
            assert abs(float(emb[i, 3 + j]) - math.sin(tv * f)) < 1e-5
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2)


def test_learned_positions_and_other_mechanisms():
    model = tiny(pos="learned", layers=["mhsa", ("mhsa", {"qk_norm": True})])
    assert isinstance(model.pos_embed, torch.nn.Parameter) and model.pos_embed.std() > 0
    assert model.layer_names == ["mhsa", "mhsa"]
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0])).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="sequence mechanism"):
        DiTBlock(16, 4, mechanism="halo2d")


def test_noise_schedule_and_label_dropout():
    s = NoiseSchedule(timesteps=10, beta_start=0.1, beta_end=0.5)
    betas = [0.1 + i * 0.4 / 9 for i in range(10)]
    want = [math.prod(1 - b for b in betas[:i + 1]) for i in range(10)]
    torch.testing.assert_close(s.alpha_bar, torch.tensor(want, dtype=torch.float64))
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    xt = s.q_sample(x0, torch.tensor([0, 9]), noise)
    for i, t in enumerate((0, 9)):
        torch.testing.assert_close(xt[i], torch.full((1, 2, 2), math.sqrt(want[t]) + 2 * math.sqrt(1 - want[t])))
    model = tiny()
    y = torch.zeros(10000, dtype=torch.long)
    dropped = model.drop_labels(y, 0.25, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3}
    assert abs(float((dropped == 3).float().mean()) - 0.25) < 0.02
    assert torch.equal(model.drop_labels(y, 0.0), y)


def test_a_tiny_dit_fits_a_few_images():
    """The simple loss falls well below its value at init on 8 fixed images (the model learns)."""
    model = tiny(dim=32).train()
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(8) % 3
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def mean_loss(seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return sum(float(sched.loss(model, x0, y, generator=gen)) for _ in range(8)) / 8

    before = mean_loss(123)
    assert abs(before - 1.0) < 0.1                                     # output 0 at init: MSE = E[eps^2]
    for _ in range(150):
        loss = sched.loss(model, x0, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_loss(123) < 0.6 * before


def test_capture_finds_dit_blocks_and_their_gated_branches():
    model = tiny()
    randomize(model)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 400]), torch.tensor([0, 1])
    plain = model(x, t, y)
    with capture(model) as cap:
        out = model(x, t, y)
    assert cap.num_layers == 2
    assert set(cap.keys()) == set(hook_names(2))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)        # eager reference path vs SDPA
    for l in range(2):
        p = cap[f"blocks.{l}.attn.hook_pattern"]
        assert p.shape == (2, 4, 16, 16)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 16))
        assert cap[f"blocks.{l}.attn.hook_z"].shape == (2, 16, 4, 4)
    # the residual stream is the sum of the gated branches (what each adds), not of raw attn/mlp outputs
    h0 = model.patchify(x)
    for l in range(2):
        pre = h0 if l == 0 else cap[f"blocks.{l - 1}.hook_resid_post"]
        post = pre + cap[f"blocks.{l}.hook_attn_out"] + cap[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(post, cap[f"blocks.{l}.hook_resid_post"], rtol=1e-6, atol=1e-6)
    # an edit of the pattern changes the output
    with capture(model, names=[], edits={"blocks.1.attn.hook_pattern": lambda a, h: torch.ones_like(a) / 16}):
        edited = model(x, t, y)
    assert not torch.allclose(edited, plain, atol=1e-4)
    assert all(b.attn.backend is None for b in model.blocks)           # restored
