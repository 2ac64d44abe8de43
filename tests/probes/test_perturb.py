"""attnlab.probes.perturb: SoftPAG's edit against its definition (u = 0 exact no-op, u = 1 makes
z equal v, the interpolation in between), the guidance formula against a hand computation from
three separate forwards, DDIM against closed-form denoisers, HeadHunter's greedy search on
synthetic objectives with a known best set (and an exhaustive search), and the LM stand-in."""
import itertools
import math

import pytest
import torch

from attnlab.models import CausalLM, DiT, NoiseSchedule
from attnlab.probes.capture import capture
from attnlab.probes.perturb import (Guidance, ddim_sample, ddim_timesteps, guided_eps, head_hunter, heads_by_layer,
                                    identity_pattern, layer_heads, run, soft_pag_edits, softpag_nll)


def dit(seed: int = 0) -> DiT:
    """A tiny DiT with every parameter redrawn (at adaLN-Zero init the attention would not matter)."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, dim=16, num_heads=4, layers=3, num_classes=3).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def inputs(B: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 1, 8, 8, generator=g), torch.tensor([10, 600, 300, 999][:B]), torch.tensor([0, 2, 1, 0][:B])


def test_heads_forms():
    assert heads_by_layer([(1, 2), (0, 1), (1, 0)]) == {1: [0, 2], 0: [1]}
    assert heads_by_layer({2: [3, 3, 1], 0: None}) == {2: [1, 3], 0: None}
    assert heads_by_layer([(1, 2), (1, None)]) == {1: None}
    assert layer_heads([0, 2]) == {0: None, 2: None}
    assert torch.equal(identity_pattern(2, 4), torch.tensor([[0., 0., 1., 0.], [0., 0., 0., 1.]]))
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        soft_pag_edits({0: [1]}, 1.5)
    with pytest.raises(TypeError, match="heads must be"):
        heads_by_layer([3])


def test_u0_is_an_exact_no_op_on_a_dit_and_a_causal_lm():
    model = dit()
    x, t, y = inputs()
    with capture(model, names="blocks.*.attn.hook_pattern") as cap:
        clean = model(x, t, y)
        clean_patterns = dict(cap.cache)
    with capture(model, names="blocks.*.attn.hook_pattern", edits=soft_pag_edits(layer_heads(range(3)), 0.0)) as cap:
        edited = model(x, t, y)
    assert torch.equal(edited, clean)
    assert all(torch.equal(cap[k], v) for k, v in clean_patterns.items())
    lm = CausalLM(40, 16, 4, 2).eval()
    ids = torch.randint(0, 40, (2, 9))
    assert softpag_nll(lm, ids, {0: [1], 1: None}, 0.0) == softpag_nll(lm, ids, None, 0.0)


def test_u1_gives_z_equal_v_on_the_perturbed_heads_only():
    model = dit()
    x, t, y = inputs()
    names = ["blocks.1.attn.hook_v", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"]
    with capture(model, names=names) as cap:
        model(x, t, y)
        clean_pattern = cap["blocks.1.attn.hook_pattern"]
    with capture(model, names=names, edits=soft_pag_edits([(1, 0), (1, 2)], 1.0)) as cap:
        model(x, t, y)
    v, z, a = cap["blocks.1.attn.hook_v"], cap["blocks.1.attn.hook_z"], cap["blocks.1.attn.hook_pattern"]
    for head in (0, 2):
        assert torch.equal(z[:, :, head], v[:, :, head])                       # (B, N, d)
        assert torch.equal(a[:, head], torch.eye(16).expand(2, 16, 16))
    for head in (1, 3):
        assert not torch.allclose(z[:, :, head], v[:, :, head])
        assert torch.equal(a[:, head], clean_pattern[:, head])                 # layer 1's input is unchanged


def test_intermediate_u_interpolates_the_map_and_rows_limit_the_edit():
    model = dit()
    x, t, y = inputs()
    with capture(model, names="blocks.0.attn.hook_pattern") as cap:
        model(x, t, y)
        A = cap["blocks.0.attn.hook_pattern"]
    with capture(model, names="blocks.0.attn.hook_pattern", edits=soft_pag_edits({0: [3]}, 0.3)) as cap:
        model(x, t, y)
    want = A.clone()
    want[:, 3] = 0.7 * A[:, 3] + 0.3 * torch.eye(16)
    torch.testing.assert_close(cap["blocks.0.attn.hook_pattern"], want, rtol=0, atol=1e-7)
    torch.testing.assert_close(want.sum(-1), torch.ones(2, 4, 16))            # still a distribution
    # rows: two copies of one input, only the second perturbed
    xx, tt, yy = x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), y[:1].repeat(2)
    with capture(model, names=[]):
        clean = model(xx, tt, yy)
    with capture(model, names=[], edits=soft_pag_edits(layer_heads([0, 1]), 1.0, rows=[1])):
        out = model(xx, tt, yy)
    assert torch.equal(out[0], clean[0]) and not torch.allclose(out[1], clean[1])


def test_u1_on_a_grouped_query_llama_sets_z_to_the_shared_value_head():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(c).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 50, (2, 7))
    names = ["blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    with capture(model, names=names, edits=soft_pag_edits({1: [3]}, 1.0)) as cap:
        model(input_ids=ids)
    v, z = cap["blocks.1.attn.hook_v"], cap["blocks.1.attn.hook_z"]          # v (B, N, h_kv, d)
    assert torch.equal(z[:, :, 3], v[:, :, 1])                                 # query head 3 reads kv head 1
    assert not torch.allclose(z[:, :, 2], v[:, :, 1])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    plain = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    assert softpag_nll(model, ids, None, 0.0) == pytest.approx(plain, abs=1e-6)
    assert softpag_nll(model, ids, layer_heads([0, 1]), 1.0) != pytest.approx(plain, abs=1e-3)


def test_guidance_formula_against_a_hand_computation():
    model = dit().double()                     # float64: one batched forward vs three separate ones
    x, t, y = inputs(3)
    x = x.double()
    heads, u, w, s = {0: [1], 2: None}, 0.6, 2.5, 3.0
    with capture(model, names=[]):                                              # three separate forwards
        eps_c = model(x, t, y)
        eps_u = model(x, t, torch.full_like(y, 3))
    with capture(model, names=[], edits=soft_pag_edits(heads, u)):
        eps_p = model(x, t, y)
    record = []
    got = guided_eps(model, x, t, y, heads, u, w, cfg_scale=s, record=record)
    torch.testing.assert_close(got, eps_u + s * (eps_c - eps_u) + w * (eps_c - eps_p), rtol=1e-10, atol=1e-10)
    assert record == [pytest.approx(float((eps_c - eps_p).detach().norm() / eps_c.detach().norm()), rel=1e-6)]
    # without CFG: (1 + w) eps_c - w eps_p; without either: eps_c
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(guided_eps(model, x, t, y, heads, u, w), (1 + w) * eps_c - w * eps_p, **close)
    torch.testing.assert_close(guided_eps(model, x, t, y), eps_c, **close)
    torch.testing.assert_close(guided_eps(model, x, t, y, cfg_scale=s), eps_u + s * (eps_c - eps_u), **close)
    # u = 0: the perturbed pass equals the conditional one, so the guidance term vanishes
    torch.testing.assert_close(guided_eps(model, x, t, y, heads, 0.0, w), eps_c, **close)
    g = Guidance(model, y, heads=heads, u=u, w=w)
    torch.testing.assert_close(g(x, t), (1 + w) * eps_c - w * eps_p, **close)
    assert g.mean_relative_change > 0


def test_ddim_timesteps_and_a_point_mass_is_recovered_exactly():
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    sched = NoiseSchedule()
    target = torch.tensor([0.5, -0.25, 0.0])
    ab = sched.alpha_bar

    def oracle(x, t):                       # E[eps | x_t] when the data is the single point `target`
        a = ab[t].float()[:, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    for eta in (0.0, 1.0):
        out = ddim_sample(oracle, sched, (5, 3), steps=7, eta=eta, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target.expand(5, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_a_gaussian_with_its_mean_and_spread(eta):
    """Data N(m, s^2): the exact denoiser is E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab)."""
    sched = NoiseSchedule()
    m, s = 0.7, 0.4
    ab = sched.alpha_bar

    def oracle(x, t):
        a = ab[t].float()[:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s ** 2 + 1 - a)

    # eta = 1 (ancestral) with the exact E[x0 | x_t] loses x0's posterior variance at each step: its error
    # vanishes only as the steps shrink (std 0.367 at 100 steps), where DDIM (eta = 0) is exact already
    out = ddim_sample(oracle, sched, (4000, 2), steps=100 if eta == 0 else 1000, eta=eta, clip=None,
                      generator=torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - m) < 0.03
    assert abs(float(out.std()) - s) < 0.03


def test_sampling_with_a_guided_dit_runs_and_guidance_changes_the_samples():
    model = dit()
    sched = NoiseSchedule()
    y = torch.tensor([0, 1])

    def sample(guidance, clip=None):
        return ddim_sample(guidance, sched, (2, 1, 8, 8), steps=3, clip=clip, generator=torch.Generator().manual_seed(0))

    base = sample(Guidance(model, y))
    pag = Guidance(model, y, heads=layer_heads([1]), u=1.0, w=2.0)
    guided = sample(pag)
    assert base.shape == guided.shape == (2, 1, 8, 8)
    assert not torch.allclose(base, guided) and len(pag.history) == 3
    torch.testing.assert_close(sample(Guidance(model, y, heads=layer_heads([1]), u=0.0, w=2.0)), base,
                               rtol=1e-5, atol=1e-5)                            # u = 0: no guidance
    clipped = sample(Guidance(model, y), clip=1.0)
    assert base.abs().max() > 1 and clipped.abs().max() <= 1.0


def test_head_hunter_finds_the_known_best_set_of_an_additive_objective():
    weights = {(l, h): float(w) for (l, h), w in zip(itertools.product(range(3), range(4)),
                                                       [3, 9, 1, 7, 2, 11, 5, 0, 8, 4, 6, 10])}
    calls = []

    def objective(heads):
        calls.append(list(heads))
        return sum(weights[c] for c in heads)

    result = head_hunter(list(weights), objective, rounds=3, top_k=2)
    best = sorted(weights, key=lambda c: -weights[c])[:6]
    assert result.selected == best                                            # (1,1) 11, (2,3) 10, (0,1) 9, ...
    assert [r.chosen for r in result.rounds] == [best[:2], best[2:4], best[4:6]]
    assert result.evaluations == len(calls) == 12 + 10 + 8
    # every call is the set chosen so far plus one new candidate
    assert all(c[:-1] == result.rounds[0].selected for c in calls[12:22])
    assert result.to_json()["selected"][0] == [1, 1]
    low = head_hunter(list(weights), objective, rounds=1, top_k=3, maximize=False)
    assert low.selected == [(1, 3), (0, 2), (1, 0)]


def test_head_hunter_greedy_rounds_find_the_exhaustive_optimum_with_interactions():
    """Heads of one layer are redundant (a second head of a layer adds nothing): one head per round finds
    the best set of 3, as an exhaustive search does; three heads in one round pick redundant ones."""
    weights = {(0, 0): 9, (0, 1): 8, (0, 2): 7.5, (1, 0): 6, (1, 1): 2, (2, 0): 5, (2, 1): 4.5}

    def objective(heads):
        best_per_layer = {}
        for l, h in heads:
            best_per_layer[l] = max(best_per_layer.get(l, 0), weights[(l, h)])
        return sum(best_per_layer.values())

    exhaustive = max(itertools.combinations(weights, 3), key=objective)
    greedy = head_hunter(list(weights), objective, rounds=3, top_k=1)
    assert set(greedy.selected) == set(exhaustive) == {(0, 0), (1, 0), (2, 0)}
    assert objective(greedy.selected) == 20
    one_round = head_hunter(list(weights), objective, rounds=1, top_k=3)
    assert one_round.selected == [(0, 0), (0, 1), (0, 2)] and objective(one_round.selected) == 9
    assert head_hunter([(0, 0)], objective, rounds=5, top_k=2).evaluations == 1   # stops when none is left
    with pytest.raises(ValueError, match="distinct"):
        head_hunter([(0, 0), (0, 0)], objective, rounds=1, top_k=1)


def test_run_writes_its_table_and_plot_for_a_model_and_ids(tmp_path):
    lm = CausalLM(40, 16, 4, 2).eval()
    ids = torch.randint(0, 40, (1, 12))
    doc = run(lm, out=tmp_path, ids=ids, us=(0.0, 0.5, 1.0), head=2)
    assert doc["base_nll"] == doc["one_head_per_layer"][0] == doc["all_heads"][0]
    assert doc["all_heads"][2] != doc["base_nll"] and len(doc["per_layer_pag"]) == 2
    for name in ("perturb.md", "perturb.json", "perturb_nll.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| 0.5 |" in (tmp_path / "perturb.md").read_text()
    with pytest.raises(ValueError, match="head 4 does not exist"):
        run(lm, out=tmp_path, ids=ids, head=4)


@pytest.mark.hf
def test_smollm2_nll_rises_with_u_on_one_head_per_layer():
    pytest.importorskip("transformers")
    from attnlab.probes.assets import SMOLLM2_BOS, MissingAsset, load_smollm2
    from attnlab.probes.sinks import default_text_path, read_text
    if not default_text_path().is_file():
        pytest.skip(f"no {default_text_path()}")
    try:
        model, tok = load_smollm2()
    except MissingAsset as e:
        pytest.skip(str(e))
    text = read_text()
    ids = torch.cat([torch.tensor([[SMOLLM2_BOS]]), tok(text[:2000], return_tensors="pt")["input_ids"]], 1)[:, :128]
    one = {l: [0] for l in range(30)}
    nll = [softpag_nll(model, ids, one, u) for u in (0.0, 0.5, 1.0)]
    # measured: see docs/probes.md (SoftPAG section); the rise is monotone in u
    assert 3.0 < nll[0] < 5.0
    assert nll[0] < nll[1] < nll[2]
