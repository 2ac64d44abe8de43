import argparse
import json
import math

import pytest
import torch

from attnlab.arena import claims
from attnlab.arena.claims.universal_approx import SingleLayerTransformer, target_map, tokenwise_best


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ua")
    parser = argparse.ArgumentParser()
    claims.add_arguments(parser)
    args = parser.parse_args(["universal_approx", "--quick", "--out", str(out)])
    assert claims.main(args, []) == 0
    for name in ("universal_approx_width.png", "universal_approx_curves.png"):
        assert (out / name).stat().st_size > 1000
    return (out / "universal_approx.md").read_text(), json.loads((out / "universal_approx.json").read_text())


def test_quick_run_writes_the_tables_with_finite_numbers(quick_run):
    page, record = quick_run
    assert "single-layer Transformer (attention + ReLU FFN)" in page and "without attention" in page
    assert record["verdict"] in claims.VERDICTS
    data = record["data"]
    assert data["widths"] == [8, 32]
    assert "![universal_approx_curves](universal_approx_curves.png)" in page and "**Budget.**" in page
    assert data["seeds"] == 2 and all(len(v) == 2 for v in data["per_seed"].values())
    for per_width in data["curves"].values():
        for curve in per_width:
            assert curve[0][0] == 0 and curve[-1][0] == 200 and curve[-1][1] < curve[0][1]
    for res in list(data["results"].values()) + [data["ffn_only"], data["tokenwise_floor"]]:
        assert all(math.isfinite(res[k]) and res[k] >= 0 for k in ("mse", "rel_mse", "p99_abs", "max_abs"))


def test_error_falls_with_width_and_beats_the_tokenwise_floor(quick_run):
    data = quick_run[1]["data"]
    small, large = data["results"]["8"], data["results"]["32"]
    assert large["mse"] < 0.5 * small["mse"] and large["p99_abs"] < small["p99_abs"]
    assert large["mse"] < data["tokenwise_floor"]["mse"]
    assert data["ffn_only"]["mse"] > 0.95 * data["tokenwise_floor"]["mse"]      # no model without attention beats it


def test_map_is_equivariant_and_tokenwise_best_is_the_conditional_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 6, generator=g) * 2 - 1
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    assert torch.allclose(target_map(x[:, perm]), target_map(x)[:, perm])
    # E[F_0 | x_0] by Monte Carlo over the other tokens
    x0 = torch.tensor([-0.8, 0.1, 0.6])
    others = torch.rand(200_000, 5, generator=g, dtype=torch.float64) * 2 - 1
    for v in x0.tolist():
        seq = torch.cat([torch.full((200_000, 1), v, dtype=torch.float64), others], 1)
        mc = target_map(seq)[:, 0].mean()
        exact = tokenwise_best(seq[:1])[0, 0]
        assert abs(float(mc - exact)) < 3e-3
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        target_map(torch.zeros(2, 3, 1))


def test_ffn_only_model_ignores_the_other_tokens():
    torch.manual_seed(0)
    x = torch.rand(3, 6) * 2 - 1
    y = x.clone()
    y[:, 1:] = torch.rand(3, 5) * 2 - 1
    ffn, full = SingleLayerTransformer(16, attention=False), SingleLayerTransformer(16)
    assert torch.allclose(ffn(x)[:, 0], ffn(y)[:, 0])
    assert not torch.allclose(full(x)[:, 0], full(y)[:, 0])
