"""The ETT task against the Time-Series-Library protocol: its split borders, scaler, windows and time
features recomputed here from the CSV, a known number (DLinear's ETTh1-96 test MSE in the MSGNet
and DLinear papers, 0.386), and MSGNet learning below DLinear's starting point."""
import csv
import math
from datetime import datetime

import numpy as np
import pytest
import torch

from attnlab.tasks import create_task
from attnlab.tasks.ett import borders, find_csv, read_csv, time_features
from attnlab.train import TrainConfig, train

try:
    CSV = find_csv()
except FileNotFoundError:
    CSV = None
needs_data = pytest.mark.skipif(CSV is None, reason="ETTh1.csv not found (../shared/data/ett or $ATTNLAB_ETT)")


def test_borders_are_the_ett_hour_and_custom_ones():
    assert borders(17420, 96, "ett_hour") == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    assert borders(70000, 96, "ett_minute")["test"] == (46080 - 96, 57600)
    assert borders(1000, 10, "ratio") == {"train": (0, 700), "val": (690, 800), "test": (790, 1000)}
    with pytest.raises(ValueError, match="needs 14400 rows"):
        borders(10000, 96, "ett_hour")


def test_time_features_are_the_timef_encoding():
    d = datetime(2016, 7, 1, 5, 30)                       # a Friday, day 183 of a leap year
    f = time_features([d], "h")[0]
    np.testing.assert_allclose(f, [5 / 23 - 0.5, 4 / 6 - 0.5, 0 / 30 - 0.5, 182 / 365 - 0.5])
    assert time_features([d], "t")[0, 0] == pytest.approx(30 / 59 - 0.5)


@needs_data
def test_windows_and_scaler_follow_the_protocol():
    task = create_task("ett", horizon=24)
    dates, values, names = read_csv(CSV)
    assert names == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"] and values.shape == (17420, 7)
    mean, std = values[:8640].mean(0), values[:8640].std(0)
    scaled = (values - mean) / std
    assert task.num_windows("train") == 8640 - 96 - 24 + 1
    assert task.num_windows("test") == 14400 - 11424 - 96 - 24 + 1
    b = task.windows("test", torch.tensor([0, 5]))
    np.testing.assert_allclose(b["x"][1].numpy(), scaled[11424 + 5: 11424 + 5 + 96], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["y"][1].numpy(), scaled[11424 + 101: 11424 + 125], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["x_mark"][0, 0].numpy(), time_features([dates[11424]])[0], atol=1e-6)
    # train batches: a per-epoch permutation, the same on every call, no repeats inside an epoch
    steps = task.epoch_steps(64)
    first = torch.cat([task.train_starts(i, 64) for i in range(steps)])
    assert len(torch.unique(first)) == len(first) == steps * 64 and int(first.max()) < task.num_windows("train")
    torch.testing.assert_close(task.batch("train", 7, 64)["x"], task.windows("train", task.train_starts(7, 64))["x"])
    torch.testing.assert_close(task.batch("train", 3, 64)["x"], task.batch("train", 3, 64)["x"])
    assert not torch.equal(task.batch("train", 0, 64)["x"], task.batch("train", steps, 64)["x"])


def test_missing_and_malformed_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no CSV at"):
        create_task("ett", path=str(tmp_path / "none.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("time,a\n2020-01-01 00:00:00,1\n")
    with pytest.raises(ValueError, match="header 'date"):
        create_task("ett", path=str(bad))
    small = tmp_path / "ETTh9.csv"
    with open(small, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "a", "b"])
        for i in range(300):
            w.writerow([f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00", math.sin(i / 4), i % 7])
    with pytest.raises(ValueError, match="needs 14400 rows"):
        create_task("ett", path=str(small))
    task = create_task("ett", path=str(small), split="ratio", lookback=24, horizon=12)
    assert task.channels == 2 and task.num_windows("train") == 210 - 24 - 12 + 1
    with pytest.raises(ValueError, match="DLinear has no attention layer"):
        create_task("ett", path=str(small), split="ratio", lookback=24, horizon=12, model="dlinear").build_model(
            8, 2, ["mhsa"])


@needs_data
def test_dlinear_reaches_the_published_etth1_96_test_mse(tmp_path):
    """Paper numbers (MSGNet Table 1 / Time-Series-Library): DLinear ETTh1-96 MSE 0.386, MAE 0.400."""
    task = create_task("ett", horizon=96, model="dlinear")
    steps = int(1.5 * task.epoch_steps(32))
    cfg = TrainConfig(task="ett", task_options={"horizon": 96, "model": "dlinear"}, layers=[], steps=steps,
                      batch_size=32, lr=0.005, warmup=0, weight_decay=0.0, grad_clip=0.0, eval_every=steps,
                      eval_batches=2, checkpoint_every=0, threads=1)
    train(cfg, tmp_path / "run", progress=False)
    from attnlab.train import find_checkpoint
    from safetensors.torch import load_model
    model = task.build_model(64, 4, [])
    load_model(model, str(find_checkpoint(tmp_path / "run")[0] / "model.safetensors"))
    got = task.evaluate_split(model, "test")
    assert got["windows"] == (2785 // 32) * 32 == 2784          # drop_last, as the official test loader
    assert 0.36 < got["mse"] < 0.40 and 0.38 < got["mae"] < 0.42


@needs_data
def test_msgnet_learns_within_a_few_steps():
    task = create_task("ett", horizon=24)
    torch.manual_seed(0)
    model = task.build_model(16, 4, ["mhsa"], mlp_ratio=2.0, conv_channel=8, skip_channel=8)
    val = task.windows("val", torch.arange(0, 2000, 8))                            # 250 fixed windows

    def mse():
        model.eval()
        with torch.no_grad():
            out = float(((model(val["x"], val["x_mark"]) - val["y"]) ** 2).mean())
        model.train()
        return out

    before = mse()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(30):
        loss, _ = task.loss(model, task.batch("train", i, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    persistence = float(((val["x"][:, -1:] - val["y"]) ** 2).mean())           # repeat the last value
    assert mse() < 0.8 * before and mse() < persistence
