"""The htr_lines task: rendered lines in handwriting fonts (train fonts vs held-out fonts), digit strings,
pure-function batches, the CTC loss and metrics, distillation from a teacher checkpoint, `attnlab train`.

The font tests skip when the Debian font packages are not installed (scripts/setup.sh installs them).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.tasks import create_task, get_task, list_tasks
from attnlab.tasks import htr_lines
from attnlab.tasks.htr_lines import FONT_PACKAGES, HELD_OUT_FONTS, TRAIN_FONTS, find_fonts


def fonts_or_skip():
    try:
        return find_fonts()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def text_task():
    fonts_or_skip()
    try:
        return create_task("htr_lines")
    except FileNotFoundError as e:          # no tiny-shakespeare
        pytest.skip(str(e))


def test_registered_and_listed():
    cls = get_task("htr_lines")
    assert cls.quality == "cer" and not cls.higher_is_better and not cls.causal
    assert "htr_lines" in [t.name for t in list_tasks()]
    assert set(TRAIN_FONTS).isdisjoint(HELD_OUT_FONTS) and set(TRAIN_FONTS) | set(HELD_OUT_FONTS) == set(FONT_PACKAGES)


def test_missing_fonts_name_the_debian_packages(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-dkg-handwriting") as e:
        create_task("htr_lines", font_dir=str(tmp_path))
    assert "fonts-bwht" in str(e.value) and "source=digits" in str(e.value)


def test_text_batches_shapes_fonts_and_texts(text_task):
    t = text_task
    assert t.font_names("val") == [f for f in HELD_OUT_FONTS if f in t.font_names("val")] and t.font_names("val")
    assert set(t.font_names("train")).isdisjoint(t.font_names("val"))
    b = t.batch("train", 0, 8)
    assert b["inputs"].shape == (8, 1, 32, 128) and b["inputs"].dtype == torch.float32
    assert b["targets"].shape == (8, 10) and b["targets"].dtype == torch.int64
    assert 0.0 <= b["inputs"].min() and b["inputs"].max() <= 1.0 and b["inputs"].mean() < 0.5   # ink 1 on paper 0
    texts = t.texts_of(b)
    assert all(1 <= len(s) <= 10 and set(s) <= set(t.charset) for s in texts)
    assert b["target_lengths"].tolist() == [len(s) for s in texts]
    assert (b["targets"][torch.arange(10)[None] >= b["target_lengths"][:, None]] == 0).all()   # 0-padded
    assert t.charset == htr_lines.PUNCTUATION + htr_lines.LOWER and t.num_classes == 36
    # val lines come from the last 10% of the text, train lines from the first 90%
    for s in t.texts_of(t.batch("val", 0, 16)):
        assert s in t.texts["val"]
    for s in texts:
        assert s in t.texts["train"]


def test_batches_are_a_pure_function_of_seed_split_index(text_task):
    a = text_task.batch("train", 3, 4)
    htr_lines._BATCHES.clear()                              # rendered again, not read from the cache
    b = text_task.batch("train", 3, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inputs"], text_task.batch("train", 4, 4)["inputs"])
    assert not torch.equal(a["inputs"], text_task.batch("val", 3, 4)["inputs"])
    other = create_task("htr_lines", seed=1)
    assert not torch.equal(a["inputs"], other.batch("train", 3, 4)["inputs"])
    assert create_task("htr_lines", **text_task.options()).options() == text_task.options()


def test_render_crops_to_the_ink(text_task):
    path = text_task.fonts["train"][0]
    image = np.asarray(htr_lines.render_text("abc", path, 64))
    assert image.max() == 255 and (image[:, :2] == 0).all() and (image[:, -2:] == 0).all()
    wide = np.asarray(htr_lines.render_text("abc abc", path, 64))
    assert wide.shape[0] == image.shape[0] and wide.shape[1] > 1.5 * image.shape[1]   # same band, wider
    line = htr_lines.place(np.ones((32, 500), np.float32), 192, np.random.default_rng(0), False)
    assert line.shape == (32, 192) and line[:, 2:].min() == 1.0                         # squeezed to fit


def test_digit_strings():
    pytest.importorskip("sklearn")
    t = create_task("htr_lines", source="digits")
    assert t.charset == "0123456789" and t.height == 16 and t.max_width == 128 and t.fonts == {}
    b = t.batch("val", 0, 6)
    assert b["inputs"].shape == (6, 1, 16, 128) and b["targets"].shape == (6, 6)
    assert all(3 <= len(s) <= 6 and s.isdigit() for s in t.texts_of(b))


def test_loss_metrics_and_a_perfect_prediction():
    pytest.importorskip("sklearn")
    t = create_task("htr_lines", source="digits")
    b = t.batch("train", 0, 4)
    model = t.build_model(16, 2, ["mhsa"], width=0.25)
    loss, metrics = t.loss(model, b)
    assert loss.requires_grad and set(metrics) == {"loss", "ctc", "cer", "wer"} and np.isfinite(metrics["loss"])

    class Oracle(torch.nn.Module):        # logits spelling each target with blanks between
        def forward(self, images):
            logits = torch.full((4, 32, 11), -10.0)
            for i, (row, n) in enumerate(zip(b["targets"], b["target_lengths"])):
                logits[i, :, 0] = 10.0
                for j in range(int(n)):
                    logits[i, 2 * j, 0], logits[i, 2 * j, row[j]] = -10.0, 10.0
            return logits
    _, perfect = t.loss(Oracle(), b)
    assert perfect["cer"] == 0.0 and perfect["wer"] == 0.0 and perfect["ctc"] < 1e-3
    none = t.build_model(16, 2, ["mhsa", "mhsa"], attention=False, width=0.25)
    assert none.layer_names == [None, None]
    with pytest.raises(TypeError, match="attention must be a bool"):
        t.build_model(16, 2, ["mhsa"], attention="no")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="source must be one of"):
        create_task("htr_lines", source="iam")
    with pytest.raises(ValueError, match="min_chars \\(5\\) exceeds max_chars \\(3\\)"):
        create_task("htr_lines", source="digits", min_chars=5, max_chars=3)
    with pytest.raises(ValueError, match="fewer than 2 \\* max_chars"):
        create_task("htr_lines", source="digits", max_width=32)
    with pytest.raises(ValueError, match="tau must be a positive number"):
        create_task("htr_lines", source="digits", tau=0)
    t = create_task("htr_lines", source="digits")
    with pytest.raises(ValueError, match="split must be one of"):
        t.batch("test", 0, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        t.batch("train", 0, 0)


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    """A teacher run of 2 steps, then a student task reading it: the loss gains tau^2 KL, which is 0 for a
    student equal to the teacher; a teacher of other frames or another task is refused."""
    pytest.importorskip("sklearn")
    from attnlab.train import TrainConfig, train
    cfg = TrainConfig(task="htr_lines", task_options={"source": "digits"}, layers=["combined"], dim=16,
                      num_heads=2, mlp_ratio=2.0, block_options={"width": 0.25}, steps=2, batch_size=4,
                      eval_every=2, eval_batches=1, eval_batch_size=4, checkpoint_every=0, seed=0)
    train(cfg, tmp_path / "teacher", progress=False)
    t = create_task("htr_lines", source="digits", teacher=str(tmp_path / "teacher"), tau=3.0)
    assert t.teacher is not None and not t.teacher.training
    assert all(not p.requires_grad for p in t.teacher.parameters())
    assert t.options()["teacher"] == str(tmp_path / "teacher")
    b = t.batch("val", 0, 4)
    student = t.build_model(16, 2, ["combined"], width=0.25).eval()
    student.load_state_dict(t.teacher.state_dict())
    loss, metrics = t.loss(student, b)
    assert metrics["kd"] == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(metrics["ctc"], abs=1e-5)
    other = t.build_model(16, 2, ["mhsa"], width=0.25)
    loss, metrics = t.loss(other, b)
    assert metrics["kd"] > 0 and loss.item() == pytest.approx(metrics["ctc"] + 9.0 * metrics["kd"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in t.teacher.parameters())
    with pytest.raises(ValueError, match="max_width=128, this task has max_width=160"):
        create_task("htr_lines", source="digits", max_width=160, teacher=str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="cannot resume|no checkpoint"):
        create_task("htr_lines", source="digits", teacher=str(tmp_path / "nothing"))


def test_attnlab_train_command(tmp_path):
    pytest.importorskip("sklearn")
    from attnlab import cli
    out = tmp_path / "run"
    code = cli.main(["train", "--task", "htr_lines", "--task-option", "source=digits", "--layers", "combined",
                     "--dim", "16", "--num-heads", "2", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
                     "--eval-batches", "1", "--eval-batch-size", "4", "--block-option", "width=0.25",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and "val_cer" in evals[-1] and "val_wer" in evals[-1]


def test_seen_font_batch_renders_val_text_in_train_fonts(text_task):
    a, b = text_task.seen_font_batch(0, 6), text_task.seen_font_batch(0, 6)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["inputs"].shape == (6, 1, 32, 128)
    assert all(s in text_task.texts["val"] for s in text_task.texts_of(a))
    assert not torch.equal(a["inputs"], text_task.batch("val", 0, 6)["inputs"])
    # a line drawn with fonts="train" uses a train font: the same rng gives the same text as the val line
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    (_, t1), (_, t2) = text_task.line("val", rng1, fonts="train"), text_task.line("val", rng2)
    assert t1 == t2
    with pytest.raises(ValueError, match="needs source='shakespeare'"):
        create_task("htr_lines", source="digits").seen_font_batch(0, 2)
