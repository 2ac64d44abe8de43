"""attnlab.probes.capture against what we did not write: transformers' eager attention (Llama,
Gemma3 with sliding windows, BERT with padding, DINOv2) on tiny random models, weight surgery
for edits, finite differences for head gates; attnlab's CausalLM against its reference backend."""
import pytest
import torch

from attnlab.probes.capture import ablate_heads, capture, hook_names, scale_heads

transformers = pytest.importorskip("transformers")


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        c = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
        model, inputs = transformers.LlamaForCausalLM(c), dict(input_ids=torch.randint(0, 50, (2, 7)))
    elif kind == "gemma3":
        c = transformers.Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=3,
                                          layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        model, inputs = transformers.Gemma3ForCausalLM(c), dict(input_ids=torch.randint(0, 50, (2, 7)))
    elif kind == "bert":
        c = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4)
        model = transformers.BertModel(c)
        inputs = dict(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))
    else:
        c = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      patch_size=4, image_size=16)
        model, inputs = transformers.Dinov2Model(c), dict(pixel_values=torch.randn(2, 3, 16, 16))
    model.eval()
    model.set_attn_implementation("eager")
    return model, inputs


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


ARCHS = ["llama", "gemma3", "bert", "dinov2"]


@pytest.mark.parametrize("kind", ARCHS)
def test_no_edit_equals_eager_outputs_and_attentions_exactly(kind):
    model, inputs = tiny(kind)
    ref = model(**inputs, output_attentions=True, output_hidden_states=True)
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    with capture(model) as cap:
        assert model.config._attn_implementation == "attnlab_capture"
        out = model(**inputs)
    assert model.config._attn_implementation == "eager"            # restored
    assert torch.equal(main_output(out), main_output(ref))
    L = len(ref.attentions)
    assert set(cap.keys()) == set(hook_names(L))
    for l, a in enumerate(ref.attentions):
        assert torch.equal(cap[f"blocks.{l}.attn.hook_pattern"], a)
        B, h, N, M = a.shape
        assert cap[f"blocks.{l}.attn.hook_q"].shape[:3] == (B, N, h)
        assert cap[f"blocks.{l}.attn.hook_z"].shape[:3] == (B, N, h)
    # each layer's output is the next hidden state (the last one of the causal LMs is normed after)
    for l in range(L - 1):
        assert torch.equal(cap[f"blocks.{l}.hook_resid_post"], ref.hidden_states[l + 1])
    # no hook is left behind (transformers keeps its own output recorders)
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before


@pytest.mark.parametrize("kind", ["llama", "gemma3", "dinov2"])
def test_residual_stream_is_the_sum_of_attn_out_and_mlp_out(kind):
    model, inputs = tiny(kind)
    with capture(model) as cap:
        model(**inputs)
    for l in range(1, cap.num_layers):
        pre = cap[f"blocks.{l - 1}.hook_resid_post"]
        post = pre + cap[f"blocks.{l}.hook_attn_out"] + cap[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(post, cap[f"blocks.{l}.hook_resid_post"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_causality_and_sliding_windows_hold_under_capture(kind):
    model, inputs = tiny(kind)
    ids = inputs["input_ids"]
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 50                         # change the future only
    with capture(model, names="blocks.*.attn.hook_pattern") as cap:
        a = model(input_ids=ids).logits
        patterns = {k: v for k, v in cap.cache.items()}
        b = model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert not torch.equal(a[:, 4:], b[:, 4:])
    N = ids.shape[1]
    future = torch.ones(N, N, dtype=torch.bool).triu(1)
    for l in range(len(patterns)):
        p = patterns[f"blocks.{l}.attn.hook_pattern"]
        assert torch.all(p[..., future] == 0)
        if kind == "gemma3" and model.config.layer_types[l] == "sliding_attention":
            far = torch.ones(N, N, dtype=torch.bool).tril(-model.config.sliding_window)   # i - j >= window
            assert torch.all(p[..., far] == 0) and torch.all(p[..., ~far & ~future] > 0)


def test_padding_keys_get_no_attention_in_bert():
    model, inputs = tiny("bert")
    with capture(model, names=["blocks.*.attn.hook_pattern"]) as cap:
        model(**inputs)
    assert set(cap.keys()) == {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"}
    for l in range(2):
        p = cap[f"blocks.{l}.attn.hook_pattern"]
        assert torch.all(p[1, :, :, 5:] == 0) and torch.all(p[0] > 0)


@pytest.mark.parametrize("kind", ["llama", "dinov2"])
def test_head_ablation_equals_zeroing_the_output_projection_columns(kind):
    model, inputs = tiny(kind)
    layer, head = 1, 2
    with capture(model, names=[], edits=ablate_heads({layer: [head]})):
        edited = main_output(model(**inputs))
    attn = model.model.layers[layer].self_attn if kind == "llama" else model.encoder.layer[layer].attention
    proj = attn.o_proj
    d = proj.in_features // 4
    with torch.no_grad():
        proj.weight[:, head * d:(head + 1) * d] = 0
    torch.testing.assert_close(edited, main_output(model(**inputs)), rtol=1e-6, atol=1e-6)


def test_pattern_edit_flows_into_the_output():
    # A <- I (SoftPAG with u = 1, bidirectional BERT): each head's output is its own value: z == v.
    model, inputs = tiny("bert")
    inputs.pop("attention_mask")

    def identity(p, hook):
        return torch.eye(p.shape[-1]).expand_as(p).clone()
    with capture(model, names="blocks.0.attn.*", edits={"blocks.0.attn.hook_pattern": identity}) as cap:
        model(**inputs)
    torch.testing.assert_close(cap["blocks.0.attn.hook_z"], cap["blocks.0.attn.hook_v"], rtol=0, atol=0)


def test_head_gate_gradients_match_finite_differences():
    # BERT: every op runs in float64 (Llama's RMSNorm and rotary drop to float32, which FD cannot resolve)
    model, inputs = tiny("bert")
    model.double()
    target = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gates = torch.ones(4, dtype=torch.float64, requires_grad=True)

    def loss_at(g):
        with capture(model, names=[], edits=scale_heads({0: g})):
            hidden = model(**inputs).last_hidden_state
        return ((hidden - target) ** 2).mean()

    loss_at(gates).backward()
    assert gates.grad.abs().max() > 1e-4              # the gates matter
    eps = 1e-6
    for h in range(4):
        up, down = gates.detach().clone(), gates.detach().clone()
        up[h] += eps
        down[h] -= eps
        with torch.no_grad():
            fd = (loss_at(up) - loss_at(down)) / (2 * eps)
        assert abs(float(fd) - float(gates.grad[h])) < 1e-9


def test_bad_use_is_refused_clearly():
    model, inputs = tiny("llama")
    with pytest.raises(KeyError, match="no hook named 'blocks.9.attn.hook_z'"):
        with capture(model, edits={"blocks.9.attn.hook_z": lambda z, h: z}):
            pass
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with capture(model, edits={"blocks.0.attn.hook_z": lambda z, h: z[:, :1]}):
            model(**inputs)
    assert model.config._attn_implementation == "eager"            # restored after the error
    with pytest.raises(TypeError, match="neither a HuggingFace"):
        with capture(torch.nn.Linear(2, 2)):
            pass
    with capture(model) as cap:
        with pytest.raises(RuntimeError, match="already inside another capture"):
            with capture(model):
                pass
    with pytest.raises(KeyError, match="was not recorded"):
        cap["blocks.0.attn.hook_pattern"]


def test_attnlab_causal_lm_matches_its_reference_backend():
    from attnlab.models import CausalLM
    torch.manual_seed(0)
    model = CausalLM(50, 32, 4, 2).eval()
    ids = torch.randint(0, 50, (2, 9))
    fast = model(ids)
    for block in model.body.blocks:
        block.attn.backend = "reference"
    eager = model(ids)
    for block in model.body.blocks:
        block.attn.backend = None
    with capture(model) as cap:
        captured = model(ids)
    assert all(block.attn.backend is None for block in model.body.blocks)       # restored
    assert torch.equal(captured, eager)
    torch.testing.assert_close(captured, fast, rtol=1e-5, atol=1e-5)
    for l in range(2):
        p = cap[f"blocks.{l}.attn.hook_pattern"]
        assert p.shape == (2, 4, 9, 9)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 9))
        assert torch.all(p[..., torch.ones(9, 9, dtype=torch.bool).triu(1)] == 0)
        # the pattern is softmax(q k^T / sqrt(d) + causal mask) of the captured q and k
        q, k = cap[f"blocks.{l}.attn.hook_q"], cap[f"blocks.{l}.attn.hook_k"]      # (B, N, h, d)
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / 8 ** 0.5
        s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(p, s.softmax(-1), rtol=1e-5, atol=1e-6)
    # ablating a head == zeroing its columns of the output projection
    with capture(model, names=[], edits=ablate_heads([(1, 3)])):
        ablated = model(ids)
    with torch.no_grad():
        model.body.blocks[1].attn.proj.weight[:, 3 * 8:4 * 8] = 0
        for block in model.body.blocks:
            block.attn.backend = "reference"
        torch.testing.assert_close(ablated, model(ids), rtol=1e-6, atol=1e-6)


# --- the real models (skipped where their packages are absent) ---------------------------------------

def _real(name: str):
    from attnlab.probes import assets
    module = assets.ASSETS[name][0]
    import importlib.util
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs the {assets.ASSETS[name][1]} package ({assets.ASSETS[name][2]})")
    loader = {"dinov2": assets.load_dinov2, "minilm": assets.load_minilm, "smollm2": assets.load_smollm2,
              "gemma3": assets.load_gemma3}[name]
    return loader()


def _check_real(model, inputs, key: str):
    ref = model(**inputs, output_attentions=True)
    with capture(model, names="blocks.*.attn.hook_pattern") as cap:
        out = model(**inputs)
    assert torch.equal(getattr(out, key), getattr(ref, key))
    for l, a in enumerate(ref.attentions):
        assert torch.equal(cap[f"blocks.{l}.attn.hook_pattern"], a)
    return cap


def test_real_dinov2_capture_equals_eager():
    model = _real("dinov2")
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    cap = _check_real(model, {"pixel_values": pixels}, "last_hidden_state")
    assert cap["blocks.0.attn.hook_pattern"].shape == (1, 6, 65, 65)


def test_real_minilm_capture_equals_eager_with_padding():
    model, tokenizer = _real("minilm")
    batch = tokenizer(["a cat sits on the mat", "stocks fell"], padding=True, return_tensors="pt")
    cap = _check_real(model, dict(batch), "last_hidden_state")
    p = cap["blocks.5.attn.hook_pattern"]
    pad = batch["attention_mask"][1] == 0
    assert pad.any() and torch.all(p[1][..., pad] == 0)


def test_real_smollm2_capture_equals_eager_and_stays_causal():
    model, tokenizer = _real("smollm2")
    ids = torch.tensor([[1] + tokenizer("To be, or not to be, that is the question")["input_ids"]])
    cap = _check_real(model, {"input_ids": ids}, "logits")
    N = ids.shape[1]
    p = cap["blocks.29.attn.hook_pattern"]
    assert p.shape == (1, 9, N, N) and torch.all(p[..., torch.ones(N, N, dtype=torch.bool).triu(1)] == 0)


def test_real_gemma3_capture_equals_eager_with_its_sliding_windows():
    """600 tokens, past the 512-token window: the sliding layers' captured patterns must be zero
    beyond the window (and the full layers' not), and equal eager's exactly. The decoder stack
    (model.model) skips the 262k-vocab head, which only the logits need."""
    model, tokenizer = _real("gemma3")
    ids = torch.randint(3, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = tokenizer.bos_token_id
    cap = _check_real(model.model, {"input_ids": ids, "use_cache": False}, "last_hidden_state")
    N, W = ids.shape[1], model.config.sliding_window
    i, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    future, far = j > i, (i - j) >= W
    for l, kind in enumerate(model.config.layer_types):
        p = cap[f"blocks.{l}.attn.hook_pattern"]
        assert p.shape == (1, 4, N, N) and torch.all(p[..., future] == 0)
        if kind == "sliding_attention":
            assert torch.all(p[..., far] == 0), l
        else:
            assert p[..., far].sum() > 0, l


def test_any_list_of_blocks_with_attn_and_mlp_is_captured():
    """Not only attnlab's Block: a .blocks ModuleList whose items have .attn (a mechanism) and .mlp."""
    import attnlab

    class MyBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attnlab.create("mhsa", 16, 2)
            self.mlp = torch.nn.Linear(16, 16)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([MyBlock(), MyBlock()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 5, 16)
    with capture(net) as cap:
        out = net(x)
    assert cap.num_layers == 2 and set(cap.keys()) == set(hook_names(2))
    assert cap["blocks.1.attn.hook_pattern"].shape == (2, 2, 5, 5)
    assert torch.equal(cap["blocks.1.hook_resid_post"], out)
    torch.testing.assert_close(cap["blocks.0.hook_resid_post"],
                               x + cap["blocks.0.hook_attn_out"] + cap["blocks.0.hook_mlp_out"])
    # a list whose items lack .attn is not a block list
    net.blocks.append(torch.nn.Linear(16, 16))
    with pytest.raises(TypeError, match="neither a HuggingFace"):
        with capture(net):
            pass
