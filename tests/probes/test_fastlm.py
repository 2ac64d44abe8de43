"""attnlab.probes.fastlm against what we did not write: transformers' own SDPA model (a plan of Full
rules, or sparse rules whose budget covers everything, must give its logits), and a naive masked
float64 softmax for every sparse kernel (the keys a rule chooses, attended exactly)."""
import math

import pytest
import torch

from attnlab.probes import fastlm as fl

transformers = pytest.importorskip("transformers")
import _tiny  # noqa: E402  (tests/probes/_tiny.py)


def tiny_llama(layers: int = 3, seed: int = 0):
    return _tiny.tiny_llama(layers, seed)


def naive(q, k, v, allowed, scaling):
    """softmax(q k^T * scaling, masked to `allowed` (nq, nk)) v, float64, KV heads repeated."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)


def qkv(B=2, Hq=6, Hkv=2, N=150, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def test_block_sparse_prefill_equals_the_masked_softmax_over_the_chosen_blocks():
    q, k, v = qkv(N=150)                                             # 150 = 4 blocks of 40 with a ragged last
    bs, N = 40, 150
    blocks = torch.tensor([[0, -1, -1], [1, 0, 0], [2, 0, 3], [3, 1, 2]])   # repeats and a future block ignored
    out = fl.block_sparse_prefill(q, k, v, blocks, bs, 0.3)
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        qb = i // bs
        for b in {int(x) for x in blocks[qb] if 0 <= x <= qb}:
            allowed[i, b * bs:(b + 1) * bs] = True
    allowed &= torch.ones(N, N, dtype=torch.bool).tril()
    torch.testing.assert_close(out, naive(q, k, v, allowed, 0.3), atol=1e-5, rtol=1e-5)


def test_streaming_is_sinks_plus_the_window_at_decode_and_block_granular_at_prefill():
    q, k, v = qkv(N=300)
    rule = fl.Streaming(sink=16, window=64, block=32)
    plan = fl.Plan({0: rule})
    # decode: the last query sees tokens [0, 16) and the last 64 exactly
    out = rule(q[:, :, -1:], k, v, 0.25, plan, 0)
    allowed = torch.zeros(1, 300, dtype=torch.bool)
    allowed[0, :16] = True
    allowed[0, 300 - 64:] = True
    torch.testing.assert_close(out, naive(q[:, :, -1:], k, v, allowed, 0.25), atol=1e-5, rtol=1e-5)
    # prefill: whole blocks, the sink block and the 2 blocks ending at the query's
    out = rule(q, k, v, 0.25, plan, 0)
    i, j = torch.arange(300).view(-1, 1), torch.arange(300).view(1, -1)
    allowed = (j <= i) & ((j < 32) | (j // 32 > i // 32 - 2))
    torch.testing.assert_close(out, naive(q, k, v, allowed, 0.25), atol=1e-5, rtol=1e-5)
    assert 0 < rule.key_fraction(300, 300) < 1


def test_block_topk_keeps_sink_recent_and_the_best_blocks_and_reuse_attends_to_the_same():
    q, k, v = qkv(N=320)
    rule = fl.BlockTopK(k_blocks=4, block=32, sink_blocks=1, recent_blocks=1)
    plan = fl.Plan({0: rule, 1: fl.Reuse()})
    out = rule(q[:, :, -1:], k, v, 0.25, plan, 0)
    phase, n, chosen = plan.state["blocks"]
    assert phase == "decode" and n == 320 and chosen.tolist() == sorted(chosen.tolist()) and len(chosen) == 4
    assert 0 in chosen.tolist() and 9 in chosen.tolist()
    # the other two are the best-scoring blocks by the group-mean query's best token over KV heads
    qbar = q[:, :, -1].view(2, 2, 3, 8).mean(2)
    score = torch.einsum("bhd,bhnd->bhn", qbar, k).view(2, 2, 10, 32).amax(-1).amax(1).amax(0)
    assert set(chosen.tolist()[1:3]) == set(score[1:9].topk(2).indices.add(1).tolist())
    allowed = torch.zeros(1, 320, dtype=torch.bool)
    for b in chosen.tolist():
        allowed[0, b * 32:(b + 1) * 32] = True
    torch.testing.assert_close(out, naive(q[:, :, -1:], k, v, allowed, 0.25), atol=1e-5, rtol=1e-5)
    again = fl.Reuse()(q[:, :, -1:], k, v, 0.25, plan, 1)
    torch.testing.assert_close(again, out)
    # prefill: every query block keeps its diagonal and the sink, never a future block
    blocks = rule.select_prefill(q, k)
    for i, row in enumerate(blocks.tolist()):
        kept = [b for b in row if b >= 0]
        assert i in kept and 0 in kept and all(b <= i for b in kept) and len(kept) == min(4, i + 1)


@pytest.mark.parametrize("make", [
    lambda L: fl.Plan({}),
    lambda L: fl.Plan({l: fl.Full() for l in range(L)}),
    lambda L: fl.Plan({l: fl.Streaming(sink=4, window=400, block=16) for l in range(L)}),
    lambda L: fl.Plan({0: fl.Full(), 1: fl.BlockTopK(k_blocks=8, block=16, recent_blocks=2), 2: fl.Reuse()}),
], ids=["empty", "full", "streaming-covering", "topk-covering"])
def test_a_plan_whose_budget_covers_everything_gives_the_sdpa_model_exactly(make):
    """ratio 1 / an all-full policy == the original model: prefill logits and 5 decode steps."""
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 100), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_cache = fl.prefill(model, ids, keep_logits=100)
    ref_steps = [fl.decode_step(model, ids[:, t:t + 1], ref_cache, 100 + t) for t in range(5)]
    plan = make(3)
    with fl.fast_attention(model, plan):
        logits, cache = fl.prefill(model, ids, keep_logits=100)
        steps = [fl.decode_step(model, ids[:, t:t + 1], cache, 100 + t) for t in range(5)]
    assert model.config._attn_implementation == "sdpa"                # restored
    assert torch.equal(logits, ref_logits)
    for a, b in zip(steps, ref_steps):
        assert torch.equal(a, b)


def test_sparse_plans_change_the_output_and_time_every_layer():
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 200), generator=torch.Generator().manual_seed(1))
    ref, _ = fl.prefill(model, ids, keep_logits=200)
    plan = fl.Plan({1: fl.Streaming(sink=16, window=32, block=16), 2: fl.BlockTopK(k_blocks=3, block=16,
                                                                                  recent_blocks=1)})
    with fl.fast_attention(model, plan):
        out, cache = fl.prefill(model, ids, keep_logits=200)
    assert set(plan.timings) == {0, 1, 2} and plan.calls == 3
    torch.testing.assert_close(out[:, :48], ref[:, :48], atol=1e-5, rtol=1e-5)   # these tokens see every key anyway
    assert not torch.allclose(out[:, -1], ref[:, -1])
    assert fl.kv_bytes(cache) == 3 * 2 * 2 * 200 * 8 * 4              # layers x (k, v) x KV heads x N x D x fp32


def test_run_once_and_agreement_on_the_plain_and_the_covering_plan():
    model = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(2)
    ids, cont = torch.randint(0, 61, (1, 64), generator=g), torch.randint(0, 61, (1, 8), generator=g)
    plain = fl.run_once(model, ids, cont, greedy_tokens=6)
    covered = fl.run_once(model, ids, cont, greedy_tokens=6, plan=fl.Plan({0: fl.Streaming(sink=4, window=100)}))
    assert plain.nll == covered.nll and plain.greedy == covered.greedy
    assert fl.agreement(covered.greedy, plain.greedy) == (1.0, 6)
    assert fl.agreement([1, 2, 3, 9], [1, 2, 4, 9]) == (0.75, 2)
    assert math.isnan(plain.attention_prefill_s) and covered.attention_prefill_s > 0
    # the NLL is that of the teacher-forced continuation under the full model
    with torch.no_grad():
        full = model(torch.cat([ids, cont], 1)).logits[0, 63:71].log_softmax(-1)
    expect = -full.gather(1, cont[0].view(-1, 1)).mean()
    assert plain.nll == pytest.approx(float(expect), rel=1e-5)


def test_bad_plans_and_inputs_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        with fl.fast_attention(model, fl.Plan({7: fl.Full()})):
            pass
    with pytest.raises(ValueError, match="reuses blocks but no BlockTopK"):
        with fl.fast_attention(model, fl.Plan({1: fl.Reuse()})):
            pass
    with pytest.raises(ValueError, match="k_blocks"):
        fl.BlockTopK(k_blocks=2, sink_blocks=1, recent_blocks=4)
    with pytest.raises(ValueError, match="padded batches"):
        with fl.fast_attention(model, fl.Plan({0: fl.Streaming(sink=2, window=4)})):
            model(torch.randint(0, 61, (2, 10)), attention_mask=torch.tensor([[1] * 10, [0] * 3 + [1] * 7]))
    assert model.config._attn_implementation == "sdpa"
    plan = fl.Plan.from_json(fl.Plan({0: fl.BlockTopK(), 1: fl.Reuse(), 2: fl.Streaming(8, 32)}).to_json())
    assert [type(plan.rule(l)).__name__ for l in range(3)] == ["BlockTopK", "Reuse", "Streaming"]
    with pytest.raises(ValueError, match="unknown rule kind"):
        fl.rule_from_json({"kind": "magic"})


def test_breakdown_parts_add_up_to_the_total_and_leave_no_hooks_behind():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 61, (1, 96), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    parts = fl.breakdown(model, ids, decode_tokens=4, repeats=2)
    assert set(parts) == {"prefill", "decode"}
    for phase in parts.values():
        assert set(phase) == set(fl.PARTS) | {"total"}
        assert sum(phase[p] for p in fl.PARTS) == pytest.approx(phase["total"], rel=1e-9)
        assert phase["attention kernel"] > 0 and phase["MLP"] > 0 and phase["LM head"] > 0
        assert phase["attention kernel"] < phase["total"]
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids).logits, ref)
    with pytest.raises(ValueError, match="model.lm_head"):
        fl.breakdown(model.model, ids)


def test_run_breakdown_writes_one_row_per_length_and_phase(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(_tiny.letters())
    doc = fl.run_breakdown(tiny_llama(layers=2), tokenizer=_tiny.CharTokenizer(), out=tmp_path, tokens=(32, 64),
                           decode_tokens=2, repeats=1, text_path=text)
    assert set(doc["results"]) == {"32", "64"}
    rows = [l for l in (tmp_path / "timing.md").read_text().splitlines() if l.startswith("| 32 |") or
            l.startswith("| 64 |")]
    assert len(rows) == 4 and all(l.count("%") == len(fl.PARTS) for l in rows)
