import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks

SMALL = dict(region_len=16, num_tokens=4, vocab=8)


def test_registered_and_listed():
    cls = get_task("selective_copy")
    assert cls.kind == "lm" and cls.causal and cls.quality == "accuracy" and cls.higher_is_better
    assert "selective_copy" in [t.name for t in list_tasks()]


def test_batches_are_deterministic_and_distinct():
    task = create_task("selective_copy", seed=3, **SMALL)
    a, b = task.batch("train", 5, 32), task.batch("train", 5, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 32)["inputs"])
    assert not torch.equal(a["inputs"], task.batch("val", 5, 32)["inputs"])
    assert not torch.equal(a["inputs"], create_task("selective_copy", seed=4, **SMALL).batch("train", 5, 32)["inputs"])


def test_targets_are_the_content_tokens_in_order():
    task = create_task("selective_copy", region_len=20, num_tokens=5, vocab=6)
    b = task.batch("train", 0, 64)
    x, y = b["inputs"], b["targets"]
    assert x.shape == y.shape == (64, 25) and x.dtype == y.dtype == torch.int64
    assert task.seq_len == 25 and task.vocab_size == 8
    assert int(x.min()) >= 0 and int(x.max()) < task.vocab_size
    gaps = set()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        region, tail = row_x[:20], row_x[20:]
        content = [(i, t) for i, t in enumerate(region) if t != task.BLANK]
        assert len(content) == 5 and all(1 <= t <= 6 for _, t in content)
        assert tail == [task.marker] * 5
        assert row_y[:20] == [-100] * 20
        assert row_y[20:] == [t for _, t in content]                    # in order of position
        gaps.add(tuple(i for i, _ in content))
    assert len(gaps) > 32                                               # positions vary per example


def test_bad_options_raise():
    with pytest.raises(ValueError, match="num_tokens"):
        create_task("selective_copy", region_len=4, num_tokens=5)
    with pytest.raises(ValueError, match="vocab"):
        create_task("selective_copy", vocab=0)
    with pytest.raises(ValueError, match="region_len"):
        create_task("selective_copy", region_len=2.5)
    with pytest.raises(TypeError, match="options"):
        create_task("selective_copy", seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        create_task("selective_copy").batch("train", 0, 0)


def test_options_round_trip():
    task = create_task("selective_copy", seed=2, **SMALL)
    again = create_task("selective_copy", **task.options())
    assert torch.equal(task.batch("val", 1, 4)["inputs"], again.batch("val", 1, 4)["inputs"])


def test_mhsa_learns_it():
    torch.manual_seed(0)
    task = create_task("selective_copy", **SMALL)
    model = task.build_model(dim=64, num_heads=4, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = task.evaluate(model, batches=2, batch_size=64)["accuracy"]
    for i in range(150):
        loss, _ = task.loss(model, task.batch("train", i, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = task.evaluate(model, batches=2, batch_size=64)["accuracy"]
    assert start < 0.3 and end > 0.5, (start, end)   # chance is 1/8
