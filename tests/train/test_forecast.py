"""`attnlab forecast` end to end on a small ETT-format CSV: it trains through attnlab.train, reloads
the checkpoint, and its test MSE is the one recomputed here from the saved weights."""
import csv
import json
import math

import pytest

from attnlab.cli import main
from attnlab.tasks import create_task
from attnlab.train import find_checkpoint
from attnlab.train.forecast import config_for


def small_csv(path, rows=600):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "load", "OT"])
        for i in range(rows):
            day, hour = divmod(i, 24)
            w.writerow([f"2021-{1 + day // 28:02d}-{1 + day % 28:02d} {hour:02d}:00:00",
                        math.sin(2 * math.pi * i / 24) + 0.1 * math.cos(i / 7), math.cos(2 * math.pi * i / 12)])
    return path


@pytest.mark.parametrize("model,extra", [("dlinear", ["--epochs", "10"]),
                                         ("msgnet", ["--dim", "8", "--heads", "2", "--epochs", "1"])])
def test_forecast_trains_tests_and_plots(tmp_path, model, extra):
    data = small_csv(tmp_path / "small.csv")
    out = tmp_path / model
    rc = main(["forecast", "--csv", str(data), "--model", model, "--horizon", "12", "--lookback", "24",
               "--out", str(out), "--plot-windows", "2"] + extra)
    assert rc == 0
    doc = json.loads((out / "forecast.json").read_text())
    assert doc["split"] == "ratio" and (out / "forecast.png").is_file() and "| test |" in (out / "forecast.md").read_text()
    task = create_task("ett", path=str(data), horizon=12, lookback=24, model=model)
    cfg = doc["config"]
    net = task.build_model(cfg["dim"], cfg["num_heads"], cfg["layers"], mlp_ratio=cfg["mlp_ratio"], **cfg["block_options"])
    from safetensors.torch import load_model
    load_model(net, str(find_checkpoint(out / "run")[0] / "model.safetensors"))
    assert task.evaluate_split(net, "test")["mse"] == pytest.approx(doc["test"]["mse"], rel=1e-6)
    if model == "dlinear":                       # a clean periodic series: far below predicting the mean
        assert doc["test"]["mse"] < 0.3


def test_forecast_defaults_are_the_official_etth1_sizes_and_bad_files_exit_2(tmp_path, capsys):
    pytest.importorskip("safetensors")
    try:
        cfg = config_for(horizon=336)
    except FileNotFoundError:
        pytest.skip("ETTh1.csv not found")
    assert (cfg.dim, cfg.mlp_ratio, cfg.layers, cfg.lr, cfg.batch_size) == (32, 2.0, ["mhsa", "mhsa"], 1e-4, 32)
    assert config_for(horizon=720).dim == 16
    assert main(["forecast", "--csv", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no CSV at" in capsys.readouterr().err
