"""`attnlab bench --capture`: every way of every model runs; the page and JSON are written; flags it
would ignore are refused."""
import json

import pytest

from attnlab.bench import capture as bench_capture
from attnlab.cli import main as cli_main


def test_capture_bench_times_every_way_and_writes_its_page(tmp_path, capsys):
    assert bench_capture.main(["--models", "causal_lm", "--budget", "0.05", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "capture.json").read_text())
    ways = data["results"]["causal_lm"]["ways"]
    assert list(ways) == list(bench_capture.WAYS)
    for way, row in ways.items():
        assert row["skipped"] is None and row["fwd_ms"] > 0 and row["rounds"] >= 3, way
    assert ways["eager"]["ratio_to_eager"] == pytest.approx(1.0)
    assert "| capture:all |" in (tmp_path / "capture.md").read_text()


@pytest.mark.parametrize("name", ["llama", "bert", "dinov2"])
def test_hf_models_build_in_the_real_shapes(name):
    pytest.importorskip("transformers")
    model, inputs, what = bench_capture.build(name)
    cfg = model.config
    want = {"llama": (576, 9, 3), "bert": (384, 12, 12), "dinov2": (384, 6, 6)}[name]
    assert (cfg.hidden_size, cfg.num_attention_heads,
            getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)) == want


def test_unknown_model_and_ignored_flags_are_refused(capsys):
    assert bench_capture.main(["--models", "gpt2"]) == 2
    assert "unknown model 'gpt2'" in capsys.readouterr().err
    assert cli_main(["bench", "--capture", "--heads", "4"]) == 2
    assert "does not take --heads" in capsys.readouterr().err
