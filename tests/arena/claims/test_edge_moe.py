"""`attnlab reproduce edge_moe --quick`: every model row, the FLOPs relations the comparison rests on,
the usage table, the numerics table, the verdict rule, the page and figures."""
import argparse
import math

import pytest

from attnlab.arena.claims import claim_args, render
from attnlab.arena.claims.edge_moe import DENSE_FLOPS, DENSE_PARAMS, MOE, equal_params_ratio, judge
from attnlab.tasks import create_task


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    try:
        create_task("fashion_dense", train_size=200)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    claim, args = claim_args("edge_moe", quick=True, out=tmp_path_factory.mktemp("edge_moe"))
    return claim, args, claim.run(args)


def test_quick_report_rows_and_page(quick):
    claim, args, report = quick
    labels = [row[0] for row in report.tables[0].rows]
    assert labels == [MOE, DENSE_FLOPS, DENSE_PARAMS, "reference: all background / train-mean depth"]
    for label in (MOE, DENSE_FLOPS, DENSE_PARAMS):
        for r in report.data["runs"][label]:
            assert 0 <= r["test"]["miou"] <= 1 and math.isfinite(r["test"]["rmse"]) and r["curve_miou"][0][0] == 0
    assert "numerics" in report.data["runs"][MOE][0] and "numerics" not in report.data["runs"][DENSE_PARAMS][0]
    assert "usage" in report.data["runs"][MOE][0]
    page = render(claim, report, "attnlab reproduce edge_moe --quick", 1.0)
    assert f"Verdict: {report.verdict}" in page and "-88%" in page
    for fig in report.figures:
        assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_and_parameter_relations(quick):
    _, args, report = quick
    stats = report.data["stats"]
    moe, flops, params = (stats[k] for k in (MOE, DENSE_FLOPS, DENSE_PARAMS))
    for t in ("seg", "depth"):
        # equal active FLOPs up to the gates; the equal-parameter model runs more
        assert moe["flops"][t]["total"] - flops["flops"][t]["total"] == moe["flops"][t]["gates"]
        assert params["flops"][t]["total"] > moe["flops"][t]["total"]
    assert abs(params["params"] / moe["params"] - 1) < 0.01
    assert flops["params"] < moe["params"]
    assert report.data["single_task_flop_reduction_vs_equal_params"] > 0


def test_equal_params_ratio_matches_the_moe():
    try:
        task = create_task("fashion_dense", train_size=200)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    args = argparse.Namespace(dim=96, num_heads=3, layers=6, experts=16, top_k=2, expert_ratio=2.0)
    ratio, hidden = equal_params_ratio(task, args)
    from attnlab.models.edge_moe import count_params
    moe = count_params(task.build_model(96, 3, 6, model="moe", num_experts=16))
    dense = task.build_model(96, 3, 6, model="dense", mlp_ratio=ratio)
    assert dense.mlp_hidden == hidden and abs(count_params(dense) - moe) <= 6 * 193


def test_verdict_rule(quick):
    _, _, report = quick
    checks = report.data["checks"]
    assert len(checks) == 6
    passes = [c["pass"] for c in checks.values()]
    expected = "holds" if all(passes[:2]) and all(passes[4:]) else "partly" if any(passes) else "does not hold"
    assert report.verdict == expected


def _stats(moe, flops, params, std=0.002):
    """Made-up test stats: (mIoU, RMSE) per model, every std `std`."""
    return {label: {"miou": m, "miou_std": std, "rmse": r, "rmse_std": std}
            for label, (m, r) in ((MOE, moe), (DENSE_FLOPS, flops), (DENSE_PARAMS, params))}


RULE = argparse.Namespace(margin_miou=0.01, margin_rmse=0.003, numerics_miou=0.005, numerics_rmse=0.01)
HARMLESS = ([1e-5, -2e-5], [1e-4, -1e-4])


@pytest.mark.parametrize("moe, flops, params, numerics, verdict, passes", [
    # the MoE ahead of both dense ViTs on both tasks, numerics harmless
    ((0.70, 0.10), (0.68, 0.11), (0.68, 0.11), HARMLESS, "holds", [True] * 6),
    # ahead of the equal-FLOPs ViT only: still holds (the equal-parameter comparison is a bonus)
    ((0.70, 0.10), (0.68, 0.11), (0.71, 0.10), HARMLESS, "holds", [True, True, False, False, True, True]),
    # ahead by less than the 0.01 mIoU margin on seg: partly
    ((0.70, 0.10), (0.695, 0.11), (0.68, 0.11), HARMLESS, "partly", [False, True, True, True, True, True]),
    # worse RMSE (higher): the depth check fails
    ((0.70, 0.12), (0.68, 0.11), (0.68, 0.11), HARMLESS, "partly", [True, False, True, False, True, True]),
    # ahead on both tasks but Edge-MoE's numerics move mIoU by 0.02 on one seed: partly
    ((0.70, 0.10), (0.68, 0.11), (0.68, 0.11), ([0.0, 0.02], [0.0, 0.0]), "partly", [True] * 4 + [False, True]),
    # behind everywhere and numerics broken: does not hold
    ((0.60, 0.13), (0.68, 0.11), (0.68, 0.11), ([0.1], [0.5]), "does not hold", [False] * 6),
])
def test_judge_on_made_up_runs(moe, flops, params, numerics, verdict, passes):
    checks, got = judge(_stats(moe, flops, params), numerics, RULE)
    assert [ok for *_, ok in checks] == passes
    assert got == verdict


def test_judge_uses_the_seed_spread():
    """A 0.02 mIoU lead passes with std 0.002 but not when the seeds spread by 0.02 each."""
    calm, _ = judge(_stats((0.70, 0.10), (0.68, 0.11), (0.68, 0.11)), HARMLESS, RULE)
    noisy, verdict = judge(_stats((0.70, 0.10), (0.68, 0.11), (0.68, 0.11), std=0.02), HARMLESS, RULE)
    assert calm[0][3] and not noisy[0][3] and not noisy[1][3]
    assert verdict == "partly"
