import argparse
import json
import math

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.deconstructed import count_model_losses, layer_spec, parse_hybrid, pooled_std, text_states
from attnlab.tasks import create_task

UNIFORM = ["standard", "mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk"]
HYBRIDS = ["mlp @ quarter", "mlp @ even", "rnd_emb_qk @ quarter", "rnd_emb_qk @ even"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("deconstructed")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["deconstructed", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    return (out / "deconstructed.md").read_text(), json.loads((out / "deconstructed.json").read_text()), out


def test_quick_run_has_every_variant_and_hybrid_with_finite_losses(quick_run):
    page, record, _ = quick_run
    assert record["verdict"] in claims.VERDICTS
    models = record["data"]["models"]
    assert sorted(models) == sorted(UNIFORM + HYBRIDS)
    for label, m in models.items():
        assert math.isfinite(m["val_loss"]) and m["tokens_per_s"] > 0, label
        assert f"| {label} |" in page
        assert len(m["val_losses"]) == len(m["seeds"]) == (2 if m["kind"] == "uniform" else 1), label
        assert m["val_loss"] == pytest.approx(sum(m["val_losses"]) / len(m["val_losses"]))
    assert models["mlp @ even"]["layers"] == ["mlp", "standard", "mlp", "standard"]
    assert models["rnd_emb_qk @ quarter"]["standard_layers"] == [4]
    assert "Checks" in page and "bigram counts" in page
    assert record["data"]["seed_noise"] > 0 and record["data"]["margin"] >= 0.03


def test_quick_run_writes_the_learning_curve_and_states_its_budget(quick_run):
    page, record, out = quick_run
    figure = out / "deconstructed.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![deconstructed](deconstructed.png)" in page
    assert "**Budget.**" in page and "bigram" in record["budget"] and "standard" in record["budget"]
    curve = record["data"]["models"]["standard"]["runs"][0]["curve"]
    assert len(curve) >= 4 and curve[0][0] == 0 and curve[-1][0] == 25


def test_every_model_learns_and_parameter_counts_match(quick_run):
    models = quick_run[1]["data"]["models"]
    for label, m in models.items():
        for r in m["runs"]:
            assert r["val_loss"] < r["initial_val_loss"] - 0.3, (label, r["curve"])   # trained away from uniform
    base = models["standard"]["params"]
    for v in ("mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk"):
        assert abs(models[v]["params"] - base) <= 0.01 * base, (v, models[v]["params"], base)


def test_count_models_order_and_bigram_is_below_unigram():
    refs = count_model_losses(create_task("tinyshakespeare", context=8))
    assert 2.0 < refs["bigram"] < refs["unigram"] < math.log(65)


def test_layer_specs_and_bad_hybrid():
    task = create_task("tinyshakespeare", context=8)
    states = text_states(task, 4, 0)
    assert states.shape == (8, 4) and torch.equal(states, text_states(task, 4, 0))
    assert layer_spec("deconstructed:fixed", context=8, seed=0, index=0, states=states)["max_seq_len"] == 8
    assert layer_spec("deconstructed:rnd_emb_qk", context=8, seed=1, index=2, states=states)["seed"] == 1002
    with pytest.raises(ValueError, match="VARIANT:CONFIG"):
        parse_hybrid("mlp:sometimes", 4)


def test_pooled_std_ignores_single_runs():
    assert pooled_std([[1.0], [2.0]]) == 0.0
    assert pooled_std([[1.0, 3.0], [5.0], [2.0, 2.0]]) == pytest.approx(math.sqrt(2.0 / 2))
