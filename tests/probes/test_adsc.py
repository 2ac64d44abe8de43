"""attnlab.probes.adsc against what it did not write: the unmodified transformers model (ratio 1 or
no layers must give its logits bit for bit), a by-hand reference that runs the layers after the
first thinned one itself (gathered rows, RoPE from the kept positions, an explicit causal mask, no
cache: a decode step is the last row of a longer prompt with the same span), torch's FLOP counter,
and a by-hand Dinov2 encoder loop."""
import pytest
import torch

from attnlab.probes import adsc
from attnlab.probes import fastlm as fl

transformers = pytest.importorskip("transformers")
import _tiny  # noqa: E402  (tests/probes/_tiny.py)


def tiny_llama(layers: int = 4, seed: int = 0, impl: str = "sdpa", double: bool = True):
    return _tiny.tiny_llama(layers, seed, impl, double)


def tokens(n, B=1, seed=1):
    return torch.randint(0, 61, (B, n), generator=torch.Generator().manual_seed(seed))


def naive_kept(n, num_layers, layers, ratio, lo, hi):
    """Python lists: kept[l] = original positions entering layer l."""
    cur, out = list(range(n)), []
    for l in range(num_layers):
        if l in layers:
            inside = [p for p in cur if lo <= p < hi]
            survive = set(inside[::-1][::ratio])               # from the span's end: the last one survives
            cur = [p for p in cur if not lo <= p < hi or p in survive]
        out.append(list(cur))
    return out


@torch.no_grad()
def naive_logits(model, ids, layers, ratio, lo, hi):
    """(logits of the kept rows, their positions): layers < s from the unhooked model's hidden states,
    the rest called one by one with gathered rows, RoPE of the kept positions, a float causal mask."""
    L = model.config.num_hidden_layers
    s = min(layers)
    h = model(ids, output_hidden_states=True).hidden_states[s]        # the input to layer s, (B, n, C)
    cur = list(range(ids.shape[1]))
    for l in range(s, L):
        if l in layers:
            inside = [p for p in cur if lo <= p < hi]
            survive = set(inside[::-1][::ratio])
            rows = [i for i, p in enumerate(cur) if not lo <= p < hi or p in survive]
            h = h[:, rows]
            cur = [cur[i] for i in rows]
        pos = torch.tensor([cur])
        cos, sin = model.model.rotary_emb(h, position_ids=pos)
        m = len(cur)
        mask = torch.full((m, m), float("-inf"), dtype=h.dtype).triu(1)[None, None]
        h = model.model.layers[l](h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return model.lm_head(model.model.norm(h)), cur


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layers,ratio", [([], 2), ([1, 2], 1)])
def test_ratio_one_or_no_layers_is_the_unmodified_model_bit_for_bit(impl, layers, ratio):
    model = tiny_llama(impl=impl, double=False)
    ids, cont = tokens(30), tokens(5, seed=2)
    ref_logits = model(ids).logits
    _, ref_cache = fl.prefill(model, ids)
    ref_steps = [fl.decode_step(model, cont[:, t:t + 1], ref_cache, 30 + t) for t in range(5)]
    with adsc.downsample(model, layers=layers, ratio=ratio, keep_last=4):
        assert torch.equal(model(ids).logits, ref_logits)
        _, cache = fl.prefill(model, ids)
        for t in range(5):
            assert torch.equal(fl.decode_step(model, cont[:, t:t + 1], cache, 30 + t), ref_steps[t])
    assert [l.keys.shape[-2] for l in cache.layers] == [35] * 4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layers,ratio,B", [([2], 2, 1), ([1, 3], 2, 2), ([1, 2], 3, 1)])
def test_prefill_equals_the_by_hand_reference_and_the_cache_holds_the_kept_tokens(impl, layers, ratio, B):
    model = tiny_llama(impl=impl)
    n, keep_last = 37, 5
    ids = tokens(n, B=B)
    ref, cur = naive_logits(model, ids, layers, ratio, 1, n - keep_last)
    kept = naive_kept(n, 4, layers, ratio, 1, n - keep_last)
    seen = {}
    grab = model.model.layers[3].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(pos=kwargs["position_ids"]), with_kwargs=True)
    with adsc.downsample(model, layers=layers, ratio=ratio, keep_last=keep_last) as ds:
        out = model(ids, cache=transformers.DynamicCache(config=model.config), use_cache=True)
    grab.remove()
    assert seen["pos"].tolist() == [kept[3]]                          # attention sees the original positions
    assert ds.kept_positions().tolist() == cur == kept[-1]
    assert ref.shape[1] < n and cur[0] == 0 and cur[-keep_last - 1:] == list(range(n - keep_last - 1, n))
    torch.testing.assert_close(out.logits, ref, atol=1e-10, rtol=1e-10)
    lengths = [l.keys.shape[-2] for l in out.cache.layers]
    assert lengths == [len(k) for k in kept] == ds.expected_cache_lengths()
    assert lengths[0] == n and lengths[-1] < n


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_decode_after_a_thinned_prefill_matches_the_reference_next_token_logits(impl):
    model = tiny_llama(impl=impl)
    n, layers, ratio, span = 33, [1, 3], 2, (2, 25)
    ids, cont = tokens(n), tokens(5, seed=3)
    with adsc.downsample(model, layers=layers, ratio=ratio, span=span) as ds:
        logits, cache = fl.prefill(model, ids)
        steps = [fl.decode_step(model, cont[:, t:t + 1], cache, n + t) for t in range(5)]
        lengths = [l.keys.shape[-2] for l in cache.layers]
    kept = naive_kept(n, 4, layers, ratio, *span)
    assert lengths == [len(k) + 5 for k in kept]
    assert ds.kept_positions(2).tolist() == kept[2]
    ref, _ = naive_logits(model, ids, layers, ratio, *span)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-10, rtol=1e-10)
    for t in range(5):
        longer = torch.cat([ids, cont[:, :t + 1]], 1)                 # the step = the last row, same span
        ref, _ = naive_logits(model, longer, layers, ratio, *span)
        torch.testing.assert_close(steps[t], ref[:, -1], atol=1e-10, rtol=1e-10)
    plain, _ = fl.prefill(model, ids)
    assert not torch.allclose(plain[:, -1], logits[:, -1], atol=1e-4)  # the thinning did something


def test_run_once_composes_and_measures_the_shorter_cache():
    model = tiny_llama(double=False)
    ids, cont = tokens(40), tokens(6, seed=4)
    plain = fl.run_once(model, ids, cont, greedy_tokens=5)
    same = fl.run_once(model, ids, cont, greedy_tokens=5,
                       model_hooks=lambda: adsc.downsample(model, layers=[1, 2], ratio=1))
    assert (same.nll, same.greedy, same.kv_bytes) == (plain.nll, plain.greedy, plain.kv_bytes)
    thin = fl.run_once(model, ids, cont, greedy_tokens=5,
                       model_hooks=lambda: adsc.downsample(model, layers=[2], ratio=2, keep_last=4))
    frac = adsc.kv_fraction(4, [2], 2, 40, keep_last=4)
    assert thin.kv_bytes / plain.kv_bytes == pytest.approx(frac, abs=1e-12) and frac < 1
    # the teacher-forced NLL equals the reference's: each continuation token scored by a longer prompt
    model64 = tiny_llama()
    ref = []
    for t in range(6):
        longer = torch.cat([ids, cont[:, :t]], 1)
        logits, _ = naive_logits(model64, longer, [2], 2, 1, 36)
        ref.append(float(torch.nn.functional.cross_entropy(logits[:, -1], cont[:, t])))
    assert thin.nll == pytest.approx(sum(ref) / 6, abs=1e-4)
    # inside attnlab's own attention implementation too (a plan of Full rules)
    with fl.fast_attention(model, fl.Plan({})), adsc.downsample(model, layers=[2], ratio=2, keep_last=4):
        inside, _ = fl.prefill(model, ids)
    with adsc.downsample(model, layers=[2], ratio=2, keep_last=4):
        alone, _ = fl.prefill(model, ids)
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)


def test_accounting_matches_the_reference_counts_and_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    n, layers, ratio = 50, [1, 3], 2
    counts = adsc.kept_counts(4, layers, ratio, n, keep_last=6)
    assert counts == [len(k) for k in naive_kept(n, 4, layers, ratio, 1, n - 6)]
    model = tiny_llama(impl="eager", double=False)
    dims = adsc.Dims.from_config(model.config)
    assert dims == adsc.Dims(48, 96, 6, 2, 8)
    ids = tokens(n)

    def counted():
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.model(ids)                                          # the decoder only: no LM head
        return fc.get_total_flops()

    plain = counted()
    with adsc.downsample(model, layers=layers, ratio=ratio, keep_last=6):
        thinned = counted()
    # eager attention computes every (query, key) pair (the mask is added, not skipped): m^2 pairs
    full = lambda m: dims.linear_flops(m) + dims.attention_flops(m * m)
    assert plain == 4 * full(n)
    assert thinned == sum(full(m) for m in counts)
    # the fraction counts causal pairs, m(m+1)/2
    causal = lambda m: dims.linear_flops(m) + dims.attention_flops(m * (m + 1) / 2)
    assert adsc.flops_fraction(4, layers, ratio, n, keep_last=6, config=model.config) == pytest.approx(
        sum(causal(m) for m in counts) / (4 * causal(n)))
    assert adsc.flops_fraction(4, [], 2, n) == 1.0 == adsc.kv_fraction(4, [1, 2], 1, n)
    assert adsc.kv_fraction(4, layers, ratio, n, keep_last=6, decode_tokens=7) == pytest.approx(
        (sum(counts) + 28) / (4 * 57))
    assert adsc.decode_flops_fraction(4, layers, ratio, n, keep_last=6, t=3, dims=dims) < 1
    # infer17's example: 8 of 30 layers whole, then 1/2, 1/4, 1/8 of the span
    assert adsc.token_budget(30, [8, 16, 24], 2, 10_001, span=(1, 10_001)) == pytest.approx(
        (8 + 8 * .5 + 8 * .25 + 6 * .125) / 30, abs=1e-3)


# --------------------------------------------------------------------------- DINOv2

def tiny_dinov2(seed=0):
    torch.manual_seed(seed)
    c = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                  image_size=28, patch_size=7, layerscale_value=0.5)
    return transformers.Dinov2Model(c).eval()


def naive_vit_kept(h, w, layer_count, layers, ratio, mode):
    cur, out = list(range(1 + h * w)), []
    for l in range(layer_count):
        if l in layers:
            patches = [p for p in cur if p > 0]
            if mode == "raster":
                keep = set(patches[::ratio])
            else:
                rows = sorted({(p - 1) // w for p in patches})[::ratio]
                cols = sorted({(p - 1) % w for p in patches})[::ratio]
                keep = {p for p in patches if (p - 1) // w in rows and (p - 1) % w in cols}
            cur = [0] + [p for p in patches if p in keep]
        out.append(cur)
    return out


@torch.no_grad()
def test_dinov2_ratio_one_is_exact_and_thinning_equals_a_by_hand_encoder_loop():
    model = tiny_dinov2()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    ref = model(pixel_values=x)
    with adsc.downsample_vit(model, layers=[0, 2], ratio=1):
        same = model(pixel_values=x)
    assert torch.equal(same.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(same.pooler_output, ref.pooler_output)
    for layers, mode in (([1], "raster"), ([0, 2], "raster"), ([1], "grid"), ([0, 1], "grid")):
        with adsc.downsample_vit(model, layers=layers, ratio=2, mode=mode) as ds:
            out = model(pixel_values=x)
        kept = naive_vit_kept(4, 4, 3, layers, 2, mode)
        assert [ds.kept_tokens(l).tolist() for l in range(3)] == kept
        h = model.embeddings(x)
        for l, block in enumerate(model.encoder.layer):
            if l in layers:
                prev = kept[l - 1] if l else list(range(17))
                h = h[:, [prev.index(p) for p in kept[l]]]
            h = block(h)
        h = model.layernorm(h)
        torch.testing.assert_close(out.last_hidden_state, h, atol=1e-6, rtol=1e-6)
        assert out.last_hidden_state.shape[1] == len(kept[-1]) < 17
    assert naive_vit_kept(4, 4, 3, [0], 2, "grid")[0] == [0, 1, 3, 9, 11]
    assert adsc.vit_flops_fraction([17, 17, 17], 17, hidden=32) == 1.0
    assert adsc.vit_flops_fraction([17, 9, 9], 17, hidden=32) < 1


# --------------------------------------------------------------------------- bad input

def test_bad_layers_ratio_span_padding_and_models_are_refused():
    model = tiny_llama(double=False)
    ids = tokens(20)
    with pytest.raises(ValueError, match=r"layer 0 stays whole"):
        with adsc.downsample(model, layers=[0], ratio=2):
            pass
    with pytest.raises(ValueError, match=r"\[1, 3\].*got \[4\]"):
        with adsc.downsample(model, layers=[4], ratio=2):
            pass
    with pytest.raises(ValueError, match="at most once"):
        with adsc.downsample(model, layers=[1, 1], ratio=2):
            pass
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ratio: expected an int >= 1"):
            with adsc.downsample(model, layers=[1], ratio=bad):
                pass
    with pytest.raises(ValueError, match="keep_last"):
        with adsc.downsample(model, layers=[1], ratio=2, keep_last=-3):
            pass
    with pytest.raises(ValueError, match="span"):
        with adsc.downsample(model, layers=[1], ratio=2, span=(5, 2)):
            pass
    with adsc.downsample(model, layers=[1], ratio=2, span=(1, 30)):
        with pytest.raises(ValueError, match=r"end <= 20"):
            model(ids)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, :3] = 0
    with adsc.downsample(model, layers=[1], ratio=2):
        with pytest.raises(ValueError, match="padded batches are not supported"):
            model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones(1, 20, dtype=torch.long))      # no padding: fine
    with pytest.raises(ValueError, match="Llama-style"):
        with adsc.downsample(torch.nn.Linear(2, 2), layers=[1], ratio=2):
            pass
    vit = tiny_dinov2()
    with pytest.raises(ValueError, match="mode"):
        with adsc.downsample_vit(vit, layers=[1], ratio=2, mode="diagonal"):
            pass
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        with adsc.downsample_vit(vit, layers=[3], ratio=2):
            pass
    with pytest.raises(ValueError, match="Dinov2Model"):
        with adsc.downsample_vit(model, layers=[1], ratio=2):
            pass
    # the hooks are gone after the context, also after an error inside it
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(m._forward_pre_hooks for m in vit.modules())


def test_run_writes_the_sweep_report_with_the_unmodified_row_first(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_tiny.letters())
    model = tiny_llama(double=False)
    doc = adsc.run(model, tokenizer=_tiny.CharTokenizer(), out=tmp_path / "out", settings=[((2,), 2), ((1, 3), 3)],
                   tokens=96, continuation=6, greedy=4, keep_last=8, text_path=text)
    assert [r["setting"] for r in doc["rows"]] == ["unmodified", "layers [2] r=2", "layers [1, 3] r=3"]
    base, half, third = doc["rows"]
    assert base["nll_delta"] == 0 and base["greedy_agreement"] == 1.0 and base["kv_fraction_measured"] == 1.0
    # the measured cache matches the analytic count of kept tokens
    assert half["kv_fraction_measured"] == pytest.approx(half["kv_fraction_analytic"])
    assert third["kv_fraction_measured"] < half["kv_fraction_measured"] < 1
    page = (tmp_path / "out" / "adsc.md").read_text()
    assert "layers [1, 3] r=3" in page and "stand-in model" in page
    assert {p.split("/")[-1] for p in doc["files"]} == {"adsc.md", "adsc.json"}
    with pytest.raises(ValueError, match="fewer than the 999999 needed"):
        adsc.run(model, tokenizer=_tiny.CharTokenizer(), out=tmp_path / "o2", tokens=999990, continuation=9,
                 text_path=text)
