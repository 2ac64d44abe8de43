import pytest
import torch

from attnlab.tasks import create_task, get_task


def small(**kw):
    opts = dict(num_last=2, next_per_last=2, num_common=3, num_distinct=4, length=16)
    opts.update(kw)
    return create_task("scan_snap", **opts)


def test_registered_and_vocabulary_layout():
    assert get_task("scan_snap").kind == "lm"
    task = small()
    assert task.num_classes == 4 and task.vocab_size == 3 + 4 * 4 + 2 + 4
    assert task.query_tokens.tolist() == [19, 19, 20, 20]                 # two classes share each query
    assert task.next_tokens.tolist() == [21, 22, 23, 24]
    assert torch.allclose(task.context_probs.sum(1), torch.ones(4))
    # common tokens in every class, distinct tokens in exactly one
    assert bool((task.context_probs[:, task.common_mask] > 0).all())
    assert task.distinct_mask.sum(0).max() == 1 and task.distinct_mask.sum(1).tolist() == [4, 4, 4, 4]
    assert not bool((task.distinct_mask & task.common_mask).any())
    ramp = task.context_probs[0, task.distinct_mask[0]]
    assert bool((ramp[1:] > ramp[:-1]).all())                             # weights 0.1 .. 1


def test_sequences_follow_their_class():
    task = small()
    b = task.batch("train", 0, 64)
    x, y, n = b["inputs"], b["targets"], b["classes"]
    assert x.shape == y.shape == (64, 16) and n.shape == (64,)
    assert torch.equal(x[:, -1], task.query_tokens[n]) and torch.equal(y[:, -1], task.next_tokens[n])
    assert bool((y[:, :-1] == -100).all())
    allowed = task.context_probs[n] > 0                                   # (B, M)
    assert bool(allowed.gather(1, x[:, :-1]).all())                       # context drawn from P(.|n)


def test_deterministic_and_bad_options():
    task = small(seed=5)
    a, b = task.batch("val", 2, 8), task.batch("val", 2, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("val", 3, 8)["inputs"])
    with pytest.raises(ValueError, match="length"):
        small(length=1)
    with pytest.raises(ValueError, match="distinct_min"):
        small(distinct_min=2.0, distinct_max=1.0)
    with pytest.raises(ValueError, match="common_weight"):
        small(common_weight=0.0)
    with pytest.raises(ValueError, match="logits of shape"):
        task.expected_attention(torch.zeros(3, 3))


def test_expected_attention_is_uniform_at_zero_and_follows_logits():
    task = small()
    M = task.vocab_size
    c0 = task.expected_attention(torch.zeros(M, M))
    assert torch.allclose(c0, task.context_probs)                          # uniform attention = P(l|n)
    Z = torch.zeros(M, M)
    Z[:, task.distinct_mask.any(0)] = 2.0                                  # favour every distinct token
    c = task.expected_attention(Z)
    assert bool(((c * task.distinct_mask).sum(1) > (c0 * task.distinct_mask).sum(1)).all())
    # matches the empirical attention over a long sampled sequence
    long = small(length=4000).batch("val", 0, 4)
    q, ctx = long["inputs"][:, -1], long["inputs"][:, :-1]
    a = torch.softmax(Z[q].gather(1, ctx), dim=1)
    empirical = torch.zeros(4, M).scatter_add(1, ctx, a)
    assert torch.allclose(empirical, c[long["classes"]], atol=0.03)


def test_library_causal_lm_runs_on_it():
    torch.manual_seed(0)
    task = small()
    model = task.build_model(dim=16, num_heads=2, layers=1)
    loss, metrics = task.loss(model, task.batch("train", 0, 8))
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
