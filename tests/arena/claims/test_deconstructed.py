import argparse
import json
import math

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.deconstructed import count_model_losses, layer_spec, parse_hybrid, text_states
from attnlab.arena.tasks import create_task

UNIFORM = ["standard", "mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk",
           "fixed"]
HYBRIDS = ["mlp @ quarter", "mlp @ even", "rnd_emb_qk @ quarter", "rnd_emb_qk @ even"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("deconstructed")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["deconstructed", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    return (out / "deconstructed.md").read_text(), json.loads((out / "deconstructed.json").read_text())


def test_quick_run_has_every_variant_and_hybrid_with_finite_losses(quick_run):
    page, record = quick_run
    assert record["verdict"] in claims.VERDICTS
    models = record["data"]["models"]
    assert sorted(models) == sorted(UNIFORM + HYBRIDS + ["standard (seed+1)"])
    for label, m in models.items():
        assert math.isfinite(m["val_loss"]) and m["tokens_per_s"] > 0, label
        assert f"| {label} |" in page
    assert models["mlp @ even"]["layers"] == ["mlp", "standard", "mlp", "standard"]
    assert models["rnd_emb_qk @ quarter"]["standard_layers"] == [4]
    assert "Checks" in page and "bigram counts" in page


def test_every_model_learns_and_parameter_counts_match(quick_run):
    models = quick_run[1]["data"]["models"]
    for label, m in models.items():
        assert m["val_loss"] < m["initial_val_loss"] - 0.3, (label, m["curve"])   # trained away from uniform
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
