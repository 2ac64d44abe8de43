"""`attnlab reproduce fast_inference --quick`: every variant at every length, finite numbers, paired
ratios equal to 1 for the reference itself, the frontier figure; the full-rules variant computes
what the unmodified model computes (same NLL and greedy tokens)."""
import math

import pytest

pytest.importorskip("transformers")

from attnlab.arena.claims import claim_args, render  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim, args = claim_args("fast_inference", quick=True, out=tmp_path_factory.mktemp("fast_inference"))
    return claim, args, claim.run(args)


def test_quick_report_has_every_variant_and_finite_numbers(quick):
    claim, args, report = quick
    res = report.data["results"]
    assert sorted(res) == sorted(f"{v}@{n}" for v in ("dense", "full-rules", "hylra", "hylra-sparse", "streaming",
                                                                   "adsc[2]r2", "adsc[1,3]r2", "flux")
                                 for n in (96, 160))
    for key, r in res.items():
        assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and math.isfinite(r["nll"]), key
        assert 0 <= r["agreement"] <= 1 and r["kv_mb"] > 0
    assert res["dense@160"]["prefill_speedup"] == 1.0 and res["dense@160"]["dnll"][0] == 0.0
    # the dense computation through fastlm is the model's: same NLL, same greedy tokens
    assert res["full-rules@160"]["dnll"][0] == pytest.approx(0.0, abs=1e-6)
    assert res["full-rules@160"]["agreement"] == 1.0
    assert 0 < res["full-rules@160"]["attention_share"] < 1
    assert res["streaming@160"]["prefill_key_fraction"] < 1
    assert res["adsc[1,3]r2@160"]["kv_mb"] < res["adsc[2]r2@160"]["kv_mb"] < res["dense@160"]["kv_mb"]
    assert report.data["flux"]["steps"] == 4 and 0 <= report.data["flux"]["final_s"] <= 1
    assert report.verdict in ("holds", "partly", "does not hold")
    page = render(claim, report, "attnlab reproduce fast_inference --quick", 1.0)
    assert "hylra-sparse" in page and report.figures[0].is_file()
