import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks, slice_batch


def test_registered_and_listed():
    assert get_task("assoc_recall").kind == "lm"
    assert "assoc_recall" in [t.name for t in list_tasks()]


def test_batches_are_deterministic_and_distinct():
    task = create_task("assoc_recall", seed=3, num_pairs=8, num_queries=4, num_keys=16, num_values=16)
    a, b = task.batch("train", 5, 32), task.batch("train", 5, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 32)["inputs"])
    assert not torch.equal(a["inputs"], task.batch("val", 5, 32)["inputs"])
    assert not torch.equal(a["inputs"], create_task("assoc_recall", seed=4, num_pairs=8, num_queries=4,
                                                    num_keys=16, num_values=16).batch("train", 5, 32)["inputs"])


def test_targets_are_the_stored_values():
    task = create_task("assoc_recall", num_pairs=6, num_queries=3, num_keys=10, num_values=5)
    b = task.batch("train", 0, 16)
    x, y = b["inputs"], b["targets"]
    assert x.shape == y.shape == (16, task.seq_len)
    assert int(x.max()) < task.vocab_size and int(x.min()) >= 1
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        store = dict(zip(row_x[0:12:2], row_x[1:12:2]))
        assert len(store) == 6                                         # distinct keys
        marked = [(i, t) for i, t in enumerate(row_y) if t != -100]
        assert len(marked) == 3
        for i, t in marked:
            assert store[row_x[i]] == t and row_x[i + 1] == t          # answer follows the query


def test_bad_options_raise():
    with pytest.raises(ValueError, match="num_pairs"):
        create_task("assoc_recall", num_pairs=20, num_keys=10)
    with pytest.raises(ValueError, match="num_queries"):
        create_task("assoc_recall", num_pairs=4, num_queries=5)
    with pytest.raises(TypeError, match="options"):
        create_task("assoc_recall", pairs=3)
    with pytest.raises(ValueError, match="did you mean"):
        get_task("assoc_recal")
    with pytest.raises(ValueError, match="split"):
        create_task("assoc_recall").batch("test", 0, 2)


def test_slice_batch_partitions_rows():
    task = create_task("assoc_recall")
    b = task.batch("train", 0, 8)
    parts = [slice_batch(b, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["inputs"] for p in parts]), b["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        slice_batch(task.batch("train", 0, 7), 0, 2)


def test_mhsa_learns_it():
    torch.manual_seed(0)
    task = create_task("assoc_recall", num_pairs=4, num_queries=4, num_keys=8, num_values=8)
    model = task.build_model(dim=64, num_heads=4, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = task.evaluate(model, batches=2, batch_size=64)["accuracy"]
    for i in range(300):
        loss, _ = task.loss(model, task.batch("train", i, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, batches=2, batch_size=64)["accuracy"]
    assert start < 0.3 and end > 0.5, (start, end)   # chance is 1/8


# --- mqar_sweep ---------------------------------------------------------------------------------

def test_sweep_rows_store_pairs_then_a_gap_then_every_query_with_its_value():
    task = create_task("mqar_sweep", seed=3, seq_len=40, pairs=[2, 5, 10], num_keys=12, num_values=7)
    for split in ("train", "val"):
        b = task.batch(split, 4, 30)
        assert b["inputs"].shape == b["targets"].shape == b["distance"].shape == (30, 40)
        if split == "val":                                   # every pair count in every val batch
            assert b["pairs"].tolist() == [[2, 5, 10][i % 3] for i in range(30)]
        for row, P in zip(range(30), b["pairs"].tolist()):
            x, t, d = b["inputs"][row], b["targets"][row], b["distance"][row]
            keys, values = x[0:2 * P:2].tolist(), x[1:2 * P:2].tolist()
            assert len(set(keys)) == P and all(1 <= k <= 12 for k in keys) and all(13 <= v <= 19 for v in values)
            store = dict(zip(keys, values))
            asked = (t != -100).nonzero().flatten().tolist()
            assert len(asked) == P and asked == list(range(asked[0], asked[0] + 2 * P, 2)) and asked[0] >= 2 * P
            assert (x[2 * P:asked[0]] == 0).all() and (x[asked[-1] + 2:] == 0).all()   # gap and tail: filler
            assert sorted(x[asked].tolist()) == sorted(keys)                              # every key asked once
            for q in asked:
                k = int(x[q])
                assert int(t[q]) == int(x[q + 1]) == store[k]
                assert int(d[q]) == q - 2 * keys.index(k)                                 # back to its key
            assert (d[t == -100] == -1).all()


def test_sweep_breaks_accuracy_down_by_pairs_and_distance():
    task = create_task("mqar_sweep", seed=0, seq_len=32, pairs=[2, 8], num_keys=8, num_values=8)
    b = task.batch("val", 0, 8)

    class Oracle(torch.nn.Module):        # predicts the stored value at the pair-2 rows only
        def forward(self, inputs):
            logits = torch.zeros(*inputs.shape, task.vocab_size)
            logits[..., 0] = 1.0
            right = (b["targets"] != -100) & (b["pairs"] == 2)[:, None]
            logits[right, b["targets"][right]] = 2.0
            return logits
    oracle = Oracle()
    assert set(task.loss(oracle, b)[1]) == {"loss", "accuracy"}      # training: no breakdown
    _, metrics = task.loss(oracle.eval(), b)
    assert metrics["accuracy_p2"] == 1.0 and metrics["accuracy_p8"] == 0.0
    assert metrics["accuracy"] == pytest.approx(4 * 2 / (4 * 2 + 4 * 8))          # 4 rows of each P
    buckets = [k for k in metrics if k.startswith("accuracy_d")]
    assert buckets and all(0.0 <= metrics[k] <= 1.0 for k in buckets)


@pytest.mark.parametrize("options, message", [
    (dict(pairs=[]), "non-empty list"), (dict(pairs=[0, 2]), "non-empty list"),
    (dict(pairs=[20], num_keys=16), "need at least that many keys"), (dict(pairs=[8], seq_len=30), "more than seq_len"),
])
def test_sweep_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        create_task("mqar_sweep", **options)
