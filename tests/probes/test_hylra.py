"""attnlab.probes.hylra against what we did not write: the DP against brute force over every path,
the ratio against a direct reading of the code's formula, the profile against a per-step loop
written from the code's description, and policies whose budget covers everything against the
unmodified transformers model."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from attnlab.probes import fastlm, hylra

transformers = pytest.importorskip("transformers")
import _tiny  # noqa: E402  (tests/probes/_tiny.py)


def brute_force(A: np.ndarray, C: int):
    L = A.shape[0]
    best = (-math.inf, -math.inf)
    for fresh in itertools.product([False, True], repeat=L - 1):
        if sum(fresh) > C:
            continue
        head, vals = 0, [A[0, 0]]
        for j, f in enumerate(fresh, start=1):
            if f:
                head = j
            vals.append(A[head, j])
        best = max(best, (min(vals), sum(vals)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_dp_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    L = 7
    A = np.triu(rng.uniform(0.2, 1.0, (L, L)), 1)
    np.fill_diagonal(A, 1.0)
    if seed % 2:
        A[3, :] = A[:, 3] = 0                                   # a sensitive layer, as make_policy zeroes it
        A[3, 3] = 1
    for C in (0, 1, 2, 4):
        config, score = hylra.best_path([A], C)
        assert score == pytest.approx(brute_force(A, C))
        # the config is a path of segments: each reuse is of its segment's head, the last fresh layer
        head, vals = 0, [A[0, 0]]
        for j in range(1, L):
            if config[j] == -1:
                head = j
            else:
                assert config[j] == head
            vals.append(A[head, j])
        assert (min(vals), sum(vals)) == pytest.approx(score)
        assert sum(c == -1 for c in config[1:]) <= C


def test_ratio90_is_the_codes_count_of_blocks_under_the_threshold():
    p = torch.tensor([[0.5, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.1]])      # blocks of 2: .6 .15 .1 .15
    # sorted .6 .15 .15 .1 -> cumsum .6 .75 .9 1.0 -> searchsorted(0.9, right) = 3 (.9 <= .9) -> 3/4
    assert float(hylra.block_ratio90(p, 2)) == pytest.approx(0.75)
    assert float(hylra.block_ratio90(torch.full((1, 8), 1 / 8), 2)) == pytest.approx(0.75)
    # one block holds everything: its cumsum 1.0 is already past 0.9, so the code counts 0 blocks (its
    # count is one fewer than "the blocks needed to reach 90%")
    assert float(hylra.block_ratio90(torch.tensor([[1.0, 0, 0, 0]]), 2)) == 0.0
    x = np.array([[1.0], [1.1], [0.9], [1.0], [50.0]])
    assert hylra.iqr_clip(x)[-1, 0] == pytest.approx(1.1 + 1.5 * 0.1)    # clipped to Q3 + 1.5 IQR, not dropped


def test_profile_matches_a_per_step_loop_from_the_description():
    g = torch.Generator().manual_seed(0)
    L, N, Hq, Hkv, D, bs = 3, 40, 4, 2, 8, 4
    qs = [torch.randn(N, Hq, D, generator=g) * 2 for _ in range(L)]
    ks = [torch.randn(N, Hkv, D, generator=g) * 2 for _ in range(L)]
    prof = hylra.profile_from_qk(qs, ks, steps=5, block=bs, budget=12, sink=4, recent=4)
    ratios = np.zeros((Hkv, 5, L))
    over = np.zeros((Hkv, L, L))
    for t in range(5):
        p = N - 5 + t
        sets = {}
        for l in range(L):
            for h in range(Hkv):
                rows = [torch.softmax(ks[l][: p + 1, h].double() @ qs[l][p, h * 2 + j].double() / math.sqrt(D), 0)
                        for j in range(2)]
                nb = math.ceil((p + 1) / bs)
                def blocks(a):
                    return np.array([float(a[b * bs:(b + 1) * bs].sum()) for b in range(nb)])
                summed = blocks(rows[0] + rows[1])
                share = np.sort(summed)[::-1] / summed.sum()
                ratios[h, t, l] = np.searchsorted(np.cumsum(share), 0.9, side="right") / nb
                score = blocks((rows[0] + rows[1]) / 2)
                score[0] = score[-1] = np.inf                       # sink 4 tokens = 1 block, recent 1 block
                sets[l, h] = set(np.argsort(-score, kind="stable")[:3].tolist())
        for h in range(Hkv):
            for i in range(L):
                for j in range(i + 1, L):
                    over[h, i, j] += len(sets[i, h] & sets[j, h]) / len(sets[j, h]) / 5
    clipped = np.stack([hylra.iqr_clip(ratios[h]) for h in range(Hkv)])
    np.testing.assert_allclose(prof.ratio, clipped.mean(1).mean(0), atol=1e-12)
    expect = over.min(0)
    np.fill_diagonal(expect, 1.0)
    np.testing.assert_allclose(prof.overlap, expect, atol=1e-12)


def tiny_llama(layers=4):
    return _tiny.tiny_llama(layers)


def test_profile_policy_plan_and_file_on_a_tiny_llama(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 160), generator=torch.Generator().manual_seed(3))
    prof = hylra.profile(model, ids, steps=8, block=16, budget=64, sink=16, recent=32)
    assert prof.ratio.shape == (4,) and prof.overlap.shape == (4, 4) and np.all(prof.ratio > 0)
    assert model.config._attn_implementation == "sdpa"
    pol = hylra.make_policy(prof, sparsity=0.75)                  # R = 1 sensitive layer
    assert len(pol.sensitive) == 1 and pol.sensitive[0] == int(np.argmax(prof.ratio))
    plan = pol.plan()
    kinds = [plan.rule(l).kind for l in range(4)]
    assert kinds[pol.sensitive[0]] == "full" and kinds[0] in ("topk", "full")
    path = pol.save(tmp_path / "policy.json")
    again = hylra.Policy.load(path)
    assert again.source == pol.source and again.sensitive == pol.sensitive
    raw = json.loads(path.read_text())
    for k in ("vllm_hash_attention_topk", "vllm_hash_attention_rollback_layers", "vllm_hash_attention_skip_layers"):
        raw.pop("source", None)
        assert k in raw
    # the released code's file alone (no sources): a skip layer reuses the last fresh one
    code_only = {k: raw[k] for k in ("vllm_hash_attention_topk", "vllm_hash_attention_rollback_layers",
                                     "vllm_hash_attention_skip_layers", "chunk_size")}
    assert hylra.Policy.from_json(code_only).plan().describe(4) == plan.describe(4)
    with fastlm.fast_attention(model, plan):
        out, _ = fastlm.prefill(model, ids)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("which", ["all-sensitive", "budget-covers"])
def test_the_exactness_limits_give_the_unmodified_model(which):
    model = tiny_llama()
    ids = torch.randint(0, 61, (1, 96), generator=torch.Generator().manual_seed(4))
    ref, ref_cache = fastlm.prefill(model, ids, keep_logits=96)
    ref_steps = [fastlm.decode_step(model, ids[:, t:t + 1], ref_cache, 96 + t) for t in range(4)]
    if which == "all-sensitive":
        pol = hylra.Policy(4, [0, 1, 2, 3], [-1, -1, -1, -1])
    else:                                                         # 7 blocks of 16 >= 96 + 4 tokens
        pol = hylra.Policy(4, [2], [-1, 0, -1, -1], budget=112, block=16)
    with fastlm.fast_attention(model, pol.plan()):
        out, cache = fastlm.prefill(model, ids, keep_logits=96)
        steps = [fastlm.decode_step(model, ids[:, t:t + 1], cache, 96 + t) for t in range(4)]
    assert torch.equal(out, ref)
    for a, b in zip(steps, ref_steps):
        assert torch.equal(a, b)


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="reuses layer 2; a layer can only reuse an earlier one"):
        hylra.Policy(3, [], [-1, 2, -1])
    with pytest.raises(ValueError, match="sparsity must be"):
        hylra.sensitive_layers([0.1, 0.2], 0)
    with pytest.raises(ValueError, match="missing"):
        hylra.Policy.from_json({"vllm_hash_attention_topk": 512})
    with pytest.raises(ValueError, match="covers the whole prefix"):
        hylra.profile_from_qk([torch.randn(20, 2, 4)], [torch.randn(20, 1, 4)], steps=4, block=4, budget=64)


def test_run_writes_its_report_on_a_tiny_llama(tmp_path):
    class CharTokenizer:
        bos_token_id = 0

        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[0] + [1 + ord(c) % 60 for c in text]])}

    model = tiny_llama()
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(97 + (i * 7919) % 26) for i in range(20000)))
    doc = hylra.run(model, tokenizer=CharTokenizer(), out=tmp_path / "out", tokens=192, continuation=6, greedy=4,
                    block=16, sink=16, recent=32, steps=8, text_path=text)
    for f in doc["files"]:
        assert (tmp_path / "out" / f.split("/")[-1]).is_file()
    assert set(doc["results"]) == {"dense", "hylra", "hylra-sparse"}
    assert doc["results"]["dense"]["agreement"] == [1.0, 4]
    assert "sensitive layers" in (tmp_path / "out" / "hylra.md").read_text()
    assert hylra.Policy.load(tmp_path / "out" / "hylra-policy.json").num_layers == 4
