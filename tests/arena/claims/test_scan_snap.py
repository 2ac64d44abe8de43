import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.scan_snap import YZTransformer
from attnlab.tasks import create_task


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan_snap")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["scan_snap", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    return out, (out / "scan_snap.md").read_text(), json.loads((out / "scan_snap.json").read_text())


def test_quick_run_writes_tables_figure_and_finite_numbers(quick_run):
    out, page, record = quick_run
    assert "Per eta_Y/eta_Z" in page and "Checks" in page and "![scan_snap](scan_snap.png)" in page
    assert (out / "scan_snap.png").stat().st_size > 1000
    assert (out / "scan_snap_curves.png").stat().st_size > 1000
    assert "![scan_snap_curves](scan_snap_curves.png)" in page and "**Budget.**" in page
    refs = record["data"]["references"]
    assert 0 <= refs["bayes_loss"] < refs["query_only_loss"] < refs["uniform_loss"]
    loss = record["data"]["1.0"]["loss_curve"]
    assert loss[-1] < loss[0] and loss[-1] < refs["query_only_loss"]     # it learned past the context-blind loss
    assert record["verdict"] in claims.VERDICTS
    for ratio in ("1.0", "10.0"):
        (seed,) = record["data"][ratio]["per_seed"]
        for key in ("distinct_final", "common_final", "late_change", "entropy", "final_loss"):
            assert math.isfinite(seed[key]), key


def test_distinct_attention_overtakes_common_after_training(quick_run):
    data = quick_run[2]["data"]["1.0"]
    start_distinct, start_common = data["distinct_curve"][0], data["common_curve"][0]
    assert start_distinct < start_common                        # uniform attention: common tokens dominate
    (seed,) = data["per_seed"]
    assert seed["distinct_final"] > seed["common_final"], seed   # the scan moved the mass to distinct tokens


def test_fast_forward_equals_attention_reference():
    torch.manual_seed(0)
    task = create_task("scan_snap", num_common=3, num_distinct=4, length=20)
    model = YZTransformer(task.vocab_size)
    with torch.no_grad():
        model.Z.normal_()
        model.Y.normal_()
    inputs = task.batch("train", 0, 16)["inputs"]
    assert torch.allclose(model(inputs), model.forward_reference(inputs), atol=1e-5)


def test_model_rejects_bad_tokens():
    model = YZTransformer(10)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[1, 2, 10]]))
    with pytest.raises(ValueError, match="expected token ids"):
        model(torch.tensor([1, 2, 3]))
