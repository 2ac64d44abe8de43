import pytest
import torch

from attnlab.arena.tasks import create_task, get_task, list_tasks, slice_batch


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
