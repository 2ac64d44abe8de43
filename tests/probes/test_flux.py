"""attnlab.probes.flux against what we did not write: transformers' own SDPA model (routers at init
must route every layer to full attention and give its logits bit for bit), fastlm's plans (all
layers routed sparse must equal a Plan of the sparse rule), HF's q_proj / input_layernorm (the
router's input is the pre-RoPE query), and the paper's formulas (the mix, the Gumbel gate, tau)."""
import json
import math

import pytest
import torch

from attnlab.probes import fastlm as fl
from attnlab.probes import flux

transformers = pytest.importorskip("transformers")
import _tiny  # noqa: E402  (tests/probes/_tiny.py)
pytest.importorskip("safetensors")

SPARSE = dict(sink=8, window=16, block=8)


def tiny_llama(layers: int = 3, seed: int = 0):
    return _tiny.tiny_llama(layers, seed)


def tokens(n, seed=1):
    return torch.randint(0, 61, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(model, ids, steps=5):
    logits, cache = fl.prefill(model, ids, keep_logits=ids.shape[1])
    return logits, [fl.decode_step(model, ids[:, t:t + 1], cache, ids.shape[1] + t) for t in range(steps)]


def assert_same(a, b):
    (la, sa), (lb, sb) = a, b
    assert torch.equal(la, lb)
    for x, y in zip(sa, sb):
        assert torch.equal(x, y)


def test_router_is_the_official_two_stage_mlp_and_starts_at_full_attention():
    r = flux.LayerRouter(8)
    shapes = [tuple(m.weight.shape) for m in list(r.feature) + list(r.head) if isinstance(m, torch.nn.Linear)]
    assert shapes == [(64, 8), (16, 64), (32, 16), (8, 32), (2, 8)]
    assert torch.equal(r.head[4].weight, torch.zeros(2, 8)) and r.head[4].bias.tolist() == [0.0, 4.5]
    with torch.no_grad():
        logits = r(torch.randn(5, 8))
    assert torch.equal(logits, torch.tensor([[0.0, 4.5]]).expand(5, 2))           # class 1 = FA for any input
    assert logits.softmax(-1)[0, flux.FA] == pytest.approx(1 / (1 + math.exp(-4.5)))


def test_pool_queries_is_the_mean_of_the_first_and_last_pool_tokens_then_of_heads():
    q = torch.randn(2, 30, 3, 4)
    expect = torch.cat([q[:, :10], q[:, 20:]], 1).mean((1, 2))
    torch.testing.assert_close(flux.pool_queries(q, 10), expect)
    torch.testing.assert_close(flux.pool_queries(q, 16), q.mean((1, 2)))          # short prompt: every token
    assert flux.pool_queries(q, 10)[0].tolist() != flux.pool_queries(q, 10)[1].tolist()


def test_the_router_input_is_the_pre_rope_query_of_each_layer():
    model = tiny_llama()
    ids = tokens(40)
    routers = flux.make_routers(model)
    for r in routers:
        torch.nn.init.normal_(r.head[4].weight)                                     # input-dependent logits
    routing = flux.FluxRouting(model, routers, fl.Streaming(**SPARSE), pool=8)
    with routing:
        fl.prefill(model, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states                    # embeddings, then each layer
        for l, layer in enumerate(model.model.layers):
            q = layer.self_attn.q_proj(layer.input_layernorm(hs[l])).view(1, 40, 6, 8)   # (B, N, Hq, D), no RoPE
            expect = routers[l](flux.pool_queries(q, 8))[0]
            torch.testing.assert_close(routing.logits[l], expect, atol=1e-6, rtol=1e-6)


def test_routers_at_init_route_every_layer_full_and_give_the_unmodified_model_exactly():
    model = tiny_llama()
    ids = tokens(100)
    ref = prefill_and_decode(model, ids)
    routing = flux.FluxRouting(model, flux.make_routers(model), fl.Streaming(**SPARSE), pool=20)
    with routing:
        got = prefill_and_decode(model, ids)
    assert_same(got, ref)
    assert routing.decisions == {0: False, 1: False, 2: False} and routing.sparse_fraction == 0.0
    assert routing.prefills == 1 and routing.describe() == "FFF"
    assert model.config._attn_implementation == "sdpa"                              # restored
    assert not any(m.q_proj._forward_hooks for m in fl.attention_modules(model))    # hooks removed


def test_all_layers_forced_sparse_equal_a_fastlm_plan_of_the_sparse_rule_and_decode_keeps_it():
    model = tiny_llama()
    ids = tokens(100)
    sparse = fl.Streaming(**SPARSE)
    with fl.fast_attention(model, fl.Plan({l: sparse for l in range(3)})):
        ref = prefill_and_decode(model, ids)
    assert not torch.equal(ref[0], prefill_and_decode(model, ids)[0])              # sparse really differs
    routers = flux.make_routers(model)
    for r in routers:
        r.set_constant(full=False)
    routing = flux.FluxRouting(model, routers, sparse, pool=20)
    with routing:
        got = prefill_and_decode(model, ids)
    assert_same(got, ref)
    assert routing.sparse_fraction == 1.0 and routing.prefills == 1                 # decode steps did not re-route
    assert all(routing.plan.rules[l] is sparse for l in range(3))


def test_a_mixed_routing_equals_the_plan_with_the_same_layers_sparse():
    model = tiny_llama()
    ids = tokens(100)
    sparse = fl.Streaming(**SPARSE)
    routers = flux.make_routers(model)
    routers[1].set_constant(full=False)
    with fl.fast_attention(model, fl.Plan({1: sparse})):
        ref = prefill_and_decode(model, ids)
    routing = flux.FluxRouting(model, routers, sparse, pool=20)
    with routing:
        got = prefill_and_decode(model, ids)
    assert_same(got, ref)
    assert routing.describe() == "FSF" and routing.sparse_fraction == pytest.approx(1 / 3)


def test_the_training_mix_at_z_1_is_full_and_at_z_0_is_sparse_exactly():
    """Exact (torch.equal): z is exactly 0 or 1 in the forward, and 1 * x + 0 * y == x."""
    model = tiny_llama()
    ids = tokens(100)
    sparse = fl.Streaming(**SPARSE)
    full_ref, _ = fl.prefill(model, ids, keep_logits=100)
    with fl.fast_attention(model, fl.Plan({l: sparse for l in range(3)})):
        sparse_ref, _ = fl.prefill(model, ids, keep_logits=100)
    routers = flux.make_routers(model)
    for full, ref in ((True, full_ref), (False, sparse_ref)):
        for r in routers:
            r.set_constant(full=full, margin=100.0)                                 # no Gumbel flip possible
        routers.train()
        logits, gates = flux.flux_forward(model, ids, routers, tau=1.5, sparse=sparse, pool=20,
                                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(gates.z, torch.full((3, 1), float(full)))
        assert torch.equal(logits, ref)
        assert torch.equal(gates.sparsity(), torch.tensor([0.0 if full else 1.0]))


def test_mix_rule_interpolates_the_two_attentions_per_sample():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 64, 8, generator=g), torch.randn(2, 2, 64, 8, generator=g), \
        torch.randn(2, 2, 64, 8, generator=g)
    sparse = fl.Streaming(**SPARSE)
    plan = fl.Plan({0: flux.MixRule(sparse)})
    plan.state["flux_z"] = {0: torch.tensor([0.25, 1.0])}
    out = plan.rules[0](q, k, v, 0.3, plan, 0)
    full, part = fl.dense_attention(q, k, v, 0.3), sparse(q, k, v, 0.3, plan, 0)
    torch.testing.assert_close(out[0], 0.25 * full[0] + 0.75 * part[0])
    assert torch.equal(out[1], full[1])
    with pytest.raises(RuntimeError, match="no gate was set"):
        plan.rules[0](q, k, v, 0.3, fl.Plan(), 0)


def test_gumbel_gate_is_hard_forward_soft_backward_and_tau_follows_the_cosine():
    logits = torch.tensor([[0.0, 4.5], [4.5, 0.0], [1.0, 1.2]], requires_grad=True)
    z, soft = flux.gumbel_gate(logits, 1.5, generator=torch.Generator().manual_seed(0))
    assert set(z.tolist()) <= {0.0, 1.0}
    (z * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    grad_st = logits.grad.clone()
    logits.grad = None
    z2, soft2 = flux.gumbel_gate(logits, 1.5, generator=torch.Generator().manual_seed(0))
    (soft2 * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)                                # the straight-through gradient
    # the hard sample is the argmax of logits + Gumbel noise: class 1 about 98.9% of the time at [0, 4.5]
    many = torch.tensor([[0.0, 4.5]]).expand(20000, 2)
    zf, _ = flux.gumbel_gate(many, 1.0, generator=torch.Generator().manual_seed(1))
    assert zf.mean().item() == pytest.approx(1 / (1 + math.exp(-4.5)), abs=0.003)
    taus = [flux.tau_at(s, 100) for s in range(100)]
    assert taus[0] == 1.5 and taus[30] == pytest.approx(1.25) and taus[60] == 1.0 and taus[-1] == 1.0
    assert all(a >= b for a, b in zip(taus, taus[1:]))


def test_gradients_reach_the_routers_and_not_the_frozen_base_model():
    model = tiny_llama()
    data = torch.randint(0, 61, (3000,), generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # one forward/backward by hand, the base frozen as train() freezes it
    routers = flux.make_routers(model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    logits, gates = flux.flux_forward(model, data[:64].view(1, -1), routers, sparse=fl.Streaming(**SPARSE),
                                      pool=16, generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(logits[0, :-1], data[1:64]).backward()
    for l, r in enumerate(routers):
        assert r.head[4].bias.grad is not None and r.head[4].bias.grad.abs().sum() > 0, l
        assert r.feature[0].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    # train(): routers change, the base model does not, its requires_grad flags come back
    routers, hist = flux.train(model, data, 1.0, 3, 64, sparse=fl.Streaming(**SPARSE), pool=16)
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(torch.equal(r.head[4].bias, torch.tensor([0.0, 4.5])) for r in routers)


@pytest.mark.parametrize("target", [1.0, 0.5, 0.0])
def test_the_lagrangian_pushes_the_sparse_fraction_to_the_target(target):
    """From s = 0 (every layer FA at init) to the target in 40 steps. The learning rates are 10x
    (routers) and 100x (lambdas) the official ones, with a constant schedule: at the official rates
    lambda1 grows by ~1e-3 a step and s does not move in 40 steps on this tiny model."""
    model = tiny_llama(layers=4)
    data = torch.randint(0, 61, (5000,), generator=torch.Generator().manual_seed(1))
    sparse = fl.Streaming(**SPARSE)
    routers, hist = flux.train(model, data, target, 40, 64, sparse=sparse, pool=16, batch=2, router_lr=5e-3,
                               lambda_lr=1e-1, schedule="constant")
    assert hist[0]["s"] <= 0.25                                                     # starts (nearly) all FA
    if target > 0:
        assert hist[0]["lambda1"] > 0                                               # ascent on |s - t|
    routing = flux.FluxRouting(model, routers, sparse, pool=16)
    with routing:
        fl.prefill(model, data[:64].view(1, -1))
    assert routing.sparse_fraction == pytest.approx(target, abs=0.25)
    late = sum(h["s"] for h in hist[-5:]) / 5
    assert late == pytest.approx(target, abs=0.3)


def test_save_load_roundtrip_gives_the_same_routing(tmp_path):
    model = tiny_llama()
    routers = flux.make_routers(model)
    for r in routers:
        torch.nn.init.normal_(r.head[4].weight)
    sparse = fl.Streaming(**SPARSE)
    st, js = flux.save_routers(routers, tmp_path / "r", sparse=sparse, pool=20, extra={"note": "x"})
    assert st.name == "r.safetensors" and js.name == "r.json"
    meta = json.loads(js.read_text())
    assert meta["layers"] == 3 and meta["head_dim"] == 8 and meta["sparse"] == sparse.to_json()
    loaded, meta = flux.load_routers(tmp_path / "r.safetensors")
    assert isinstance(meta["sparse_rule"], fl.Streaming) and meta["sparse_rule"].window == 16
    for a, b in zip(routers, loaded):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    ids = tokens(60)
    outs = []
    for rs in (routers, loaded):
        routing = flux.FluxRouting(model, rs, sparse, pool=20)
        with routing:
            outs.append((fl.prefill(model, ids)[0], routing.describe()))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    js.write_text(json.dumps({**meta, "sparse_rule": None, "format": "pickle"}))
    with pytest.raises(ValueError, match="is not a attnlab.probes.flux/routers"):
        flux.load_routers(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="save_routers writes"):
        flux.load_routers(tmp_path / "missing")


def test_evaluate_rows_and_the_train_eval_split():
    model = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(3)
    ids, cont = torch.randint(0, 61, (1, 80), generator=g), torch.randint(0, 61, (1, 6), generator=g)
    rows = flux.evaluate(model, ids, cont, flux.make_routers(model), sparse=fl.Streaming(**SPARSE), pool=16,
                         greedy_tokens=5)
    assert [r["routing"] for r in rows] == ["all-full", "all-sparse", "flux"]
    full, sparse, routed = rows
    assert full["agreement"] == 1.0 and full["layers"] == "FF" and sparse["layers"] == "SS"
    assert routed["sparse_fraction"] == 0.0 and routed["nll"] == full["nll"] and routed["agreement"] == 1.0
    assert sparse["nll"] != full["nll"]

    class CharTok:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) for c in text]])}
    text = "a" * 90 + "b" * 10
    assert set(flux.text_ids(CharTok(), "train", text=text).tolist()) == {ord("a")}
    ids, cont = flux.heldout(CharTok(), 6, 3, bos=1, text=text)
    assert ids.tolist() == [[1] + [ord("b")] * 5] and cont.tolist() == [[ord("b")] * 3]
    with pytest.raises(ValueError, match="fewer than 9 \\+ 3"):
        flux.heldout(CharTok(), 10, 3, bos=1, text=text)


def test_bad_inputs_are_refused_with_what_was_expected():
    model = tiny_llama()
    routers = flux.make_routers(model)
    with pytest.raises(ValueError, match="one LayerRouter per attention layer \\(3\\), got 2"):
        flux.FluxRouting(model, routers[:2])
    with pytest.raises(ValueError, match="LayerRouter\\(head_dim=8\\), got LayerRouter\\(head_dim=4\\)"):
        flux.FluxRouting(model, torch.nn.ModuleList([flux.LayerRouter(4) for _ in range(3)]))
    with pytest.raises(ValueError, match="sparse must be a fastlm sparse Rule"):
        flux.FluxRouting(model, routers, fl.Full())
    with pytest.raises(ValueError, match="one prompt at a time"):
        with flux.FluxRouting(model, routers, pool=4):
            fl.prefill(model, torch.randint(0, 61, (2, 20)))
    data = torch.randint(0, 61, (100,))
    with pytest.raises(ValueError, match="target must be a fraction of layers in \\[0, 1\\], got 1.5"):
        flux.train(model, data, 1.5, 2, 16)
    with pytest.raises(ValueError, match="100 training tokens, fewer than one window of 200"):
        flux.train(model, data, 0.5, 2, 200)
    with pytest.raises(ValueError, match="1-D integer token ids"):
        flux.train(model, data.float(), 0.5, 2, 16)
    with pytest.raises(ValueError, match="expected pooled queries \\(B, 8\\), got \\(2, 5\\)"):
        routers[0](torch.randn(2, 5))
    with pytest.raises(ValueError, match="expected queries \\(B, N, Hq, D\\)"):
        flux.pool_queries(torch.randn(3, 4, 5))
    assert model.config._attn_implementation == "sdpa"


def test_run_trains_saves_and_reloads_the_routers(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_tiny.letters())
    model = tiny_llama(layers=2)
    kw = dict(tokenizer=_tiny.CharTokenizer(), target=0.5, steps=3, seq_len=64, tokens=80, continuation=5,
              sink=4, window=16, text_path=text)
    doc = flux.run(model, out=tmp_path / "a", **kw)
    assert [r["routing"] for r in doc["rows"]] == ["all-full", "all-sparse", "flux"]
    names = {p.split("/")[-1] for p in doc["files"]}
    assert names == {"flux.md", "flux.json", "flux-routers.safetensors", "flux-routers.json"}
    assert doc["train"]["steps"] == 3 and "routers trained 3 steps" in (tmp_path / "a" / "flux.md").read_text()
    again = flux.run(model, out=tmp_path / "b", routers_path=tmp_path / "a" / "flux-routers", **kw)
    assert again["rows"][2]["layers"] == doc["rows"][2]["layers"]
    assert again["rows"][2]["nll"] == doc["rows"][2]["nll"]
    assert "loaded from" in (tmp_path / "b" / "flux.md").read_text()
