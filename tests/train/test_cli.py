"""`attnlab train` flags and the command's errors."""
from __future__ import annotations

from attnlab import cli
from attnlab.train import TrainConfig, config_from_args, parse_layers, parse_value


def test_cli_flags_map_onto_the_config(tiny, tiny_args):
    args = cli.build_parser().parse_args(["train", *tiny_args, "--block-option", "act=relu", "--out", "x"])
    assert config_from_args(args) == TrainConfig(**{**tiny, "block_options": {"drop": 0.1, "act": "relu"}})
    assert parse_value("8") == 8 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("True") is True and parse_value("None") is None and parse_value("abc") == "abc"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_layers("mhsa, moh,deconstructed:fixed") == ["mhsa", "moh", "deconstructed:fixed"]
    assert parse_layers('[{"name": "moh", "top_k": 2}, "mhsa"]') == [{"name": "moh", "top_k": 2}, "mhsa"]


def test_names_and_options_get_the_registries_errors(capsys, tmp_path, tiny_args):
    def run(*args: str) -> str:
        assert cli.main(["train", *tiny_args, "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
        return capsys.readouterr().err

    assert "did you mean 'mhsa'" in run("--layers", "mhsa,mhsaa")
    assert "unknown task 'assoc_recal'" in run("--task", "assoc_recal")
    err = run("--task-option", "num_pears=3")
    assert "num_pears" in err and "options:" in err and "num_pairs" in err
    assert "no causal mode" in run("--layers", "infsa")
    assert "steps must be a positive int" in run("--steps", "0")
    assert "lr must be" in run("--lr", "-1")
    assert not (tmp_path / "x").exists()                                 # nothing written on bad input
