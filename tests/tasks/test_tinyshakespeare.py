import math
from pathlib import Path

import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks import tinyshakespeare as ts

CORPUS = ts.REPO_ROOT / ts.DEFAULT_RELATIVE


@pytest.fixture
def toy_corpus(tmp_path):
    """1000 characters: the first 900 (train) drawn from 'ab', the last 100 (val) from 'xy\\n'."""
    g = torch.Generator().manual_seed(0)
    train = "".join("ab"[i] for i in torch.randint(0, 2, (900,), generator=g).tolist())
    val = "".join("xy\n"[i] for i in torch.randint(0, 3, (100,), generator=g).tolist())
    path = tmp_path / "input.txt"
    path.write_text(train + val, encoding="utf-8")
    return path


def test_registered_and_listed():
    cls = get_task("tinyshakespeare")
    assert cls.kind == "lm" and cls.causal and cls.quality == "loss" and not cls.higher_is_better
    assert "tinyshakespeare" in [t.name for t in list_tasks()]


def test_split_boundaries_and_shift(toy_corpus):
    task = create_task("tinyshakespeare", path=str(toy_corpus), context=16)
    assert task.chars == "\nabxy" and task.vocab_size == 5
    assert len(task.splits["train"]) == 900 and len(task.splits["val"]) == 100
    train_ids, val_ids = set(task.encode("ab").tolist()), set(task.encode("xy\n").tolist())
    for split, allowed in (("train", train_ids), ("val", val_ids)):
        for i in range(5):
            b = task.batch(split, i, 32)
            x, y = b["inputs"], b["targets"]
            assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == torch.int64
            assert set(x.unique().tolist()) <= allowed and set(y.unique().tolist()) <= allowed
            assert torch.equal(x[:, 1:], y[:, :-1])                    # targets = inputs shifted by one
    # windows reach both ends of the val split (100 chars, 84 possible starts)
    starts = {task.decode(row) for i in range(20) for row in task.batch("val", i, 32)["inputs"]}
    text = toy_corpus.read_text()
    assert text[900:916] in starts and text[-17:-1] in starts


def test_batches_are_deterministic_and_distinct(toy_corpus):
    task = create_task("tinyshakespeare", path=str(toy_corpus), context=16, seed=3)
    a, b = task.batch("train", 5, 8), task.batch("train", 5, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch("train", 6, 8)["inputs"])
    other = create_task("tinyshakespeare", path=str(toy_corpus), context=16, seed=4)
    assert not torch.equal(a["inputs"], other.batch("train", 5, 8)["inputs"])
    again = create_task("tinyshakespeare", **task.options())
    assert torch.equal(a["inputs"], again.batch("train", 5, 8)["inputs"])


def test_encode_decode(toy_corpus):
    task = create_task("tinyshakespeare", path=str(toy_corpus), context=4)
    assert task.decode(task.encode("ab\nyx")) == "ab\nyx"
    with pytest.raises(ValueError, match="vocabulary"):
        task.encode("abc")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        task.decode([7])


def test_missing_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="path="):
        create_task("tinyshakespeare", path=str(tmp_path / "nope.txt"))
    monkeypatch.setenv(ts.ENV_VAR, str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=ts.ENV_VAR):
        create_task("tinyshakespeare")
    monkeypatch.delenv(ts.ENV_VAR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("attnlab._data.REPO_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match=f"set {ts.ENV_VAR}=") as info:
        create_task("tinyshakespeare")
    assert "shared/data/tinyshakespeare/input.txt" in str(info.value)


def test_bad_options_raise(toy_corpus):
    with pytest.raises(ValueError, match="context"):
        create_task("tinyshakespeare", path=str(toy_corpus), context=0)
    with pytest.raises(ValueError, match="fewer than context"):
        create_task("tinyshakespeare", path=str(toy_corpus), context=100)    # val split has 100 chars
    with pytest.raises(ValueError, match="split"):
        create_task("tinyshakespeare", path=str(toy_corpus), context=4).batch("test", 0, 2)


def test_env_var_is_used(toy_corpus, monkeypatch):
    monkeypatch.setenv(ts.ENV_VAR, str(toy_corpus))
    task = create_task("tinyshakespeare", context=8)
    assert task.path == toy_corpus and task.options()["path"] is None


@pytest.mark.skipif(not CORPUS.is_file(), reason=f"tiny-shakespeare not at {CORPUS}")
def test_real_corpus_and_loss(monkeypatch):
    monkeypatch.delenv(ts.ENV_VAR, raising=False)
    task = create_task("tinyshakespeare", context=32)          # found through the repo-root default
    assert task.vocab_size == 65 and task.chars[0] == "\n" and task.chars[1] == " "
    n = len(task.splits["train"]) + len(task.splits["val"])
    assert n == 1_115_394 and len(task.splits["train"]) == int(0.9 * n)
    assert task.decode(task.splits["train"][:14]) == "First Citizen:"
    torch.manual_seed(0)
    model = task.build_model(dim=32, num_heads=4, layers=1)
    loss, metrics = task.loss(model, task.batch("val", 0, 4))
    assert abs(metrics["loss"] - math.log(65)) < 0.5              # untrained: near uniform
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2))
    assert loss.requires_grad


@pytest.mark.skipif(not CORPUS.is_file(), reason=f"tiny-shakespeare not at {CORPUS}")
def test_mhsa_beats_the_unigram_baseline(monkeypatch):
    monkeypatch.delenv(ts.ENV_VAR, raising=False)
    task = create_task("tinyshakespeare", context=32)
    counts = torch.bincount(task.splits["train"], minlength=task.vocab_size).double() + 1
    unigram = -(counts / counts.sum()).log()[task.splits["val"]].mean().item()   # nats/char on val
    torch.manual_seed(0)
    model = task.build_model(dim=64, num_heads=4, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(100):
        loss, _ = task.loss(model, task.batch("train", i, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = task.evaluate(model, batches=2, batch_size=32)["loss"]
    assert val < unigram - 0.3, (val, unigram)


def test_repo_root_is_the_checkout():
    # The corpus is looked for beside the checkout; a moved module must move this anchor too.
    assert (ts.REPO_ROOT / "pyproject.toml").is_file() and (ts.REPO_ROOT / "src" / "attnlab").is_dir()
