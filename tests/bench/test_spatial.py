"""`attnlab bench --spatial`: the 2-D suites, each entry and its plain baseline measured in one run."""
from __future__ import annotations

import json

import pytest
import torch

from attnlab.bench import spatial
from attnlab.bench.adapters import DepthwiseConvBaseline, build_module
from attnlab.cli import main


def test_dwconv_baseline_is_one_depthwise_convolution():
    """Against a per-pixel loop over the k x k window (zero padding), not against F.conv2d."""
    torch.manual_seed(0)
    m = build_module("dwconv", 3, 1, {"kernel_size": 3}).double()
    assert isinstance(m, DepthwiseConvBaseline)
    x = torch.randn(2, 16, 3, dtype=torch.float64)                    # a 4 x 4 image, 3 channels
    img = x.reshape(2, 4, 4, 3)
    w, b = m.conv.weight[:, 0], m.conv.bias                            # (C, 3, 3), (C,)
    ref = torch.zeros_like(img)
    for y in range(4):
        for xx in range(4):
            acc = b.clone().expand(2, 3).clone()
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if 0 <= y + dy < 4 and 0 <= xx + dx < 4:
                        acc = acc + img[:, y + dy, xx + dx] * w[:, dy + 1, dx + 1]
            ref[:, y, xx] = acc
    torch.testing.assert_close(m(x), ref.reshape(2, 16, 3))
    assert m.useful_flops(2, 16, 3, 1, False) == (2 * 2 * 16 * 3 * 9, 4 * 2 * 16 * 3 * 9)
    with pytest.raises(ValueError, match="perfect square, got N=15"):
        m(torch.randn(1, 15, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConvBaseline(3, kernel_size=4)


def _row(n, ratio):
    return {"mechanism": "fast", "seq_len": n, "fwd_bwd_ratio": ratio}


@pytest.mark.parametrize("ratios, faster_from", [
    ([2.0, 1.2, 0.8, 0.5], 4), ([0.9, 1.1, 0.8, 0.5], 4), ([0.9, 0.8, 0.7, 0.5], 1), ([2.0, 1.5, 1.2, 1.1], None)])
def test_crossover_is_where_it_stays_faster(ratios, faster_from):
    rows = [_row(n, r) for n, r in zip((1, 2, 4, 8), ratios)]
    c = spatial.crossover(rows, "fast")
    assert c["faster_from"] == faster_from and c["largest_n"] == 8
    assert c["speedup_at_largest"] == pytest.approx(1 / ratios[-1])


def test_spatial_mode_measures_entries_under_labels(monkeypatch, capsys, tmp_path):
    """One mechanism twice under two labels, a plain baseline, ratios in the same run; a small
    suite stands in for the real ones (which take minutes)."""
    suite = spatial.Suite("tiny", (64, 144), heads=2, head_dim=8, baseline="dwconv3",
                          entries=(spatial.Entry("dwconv", {"kernel_size": 3}, "dwconv3"),
                                   spatial.Entry("neighborhood2d", {"kernel_size": 3}, "na3"),
                                   spatial.Entry("neighborhood2d", {"kernel_size": 5}, "na5"),
                                   spatial.Entry("sdpa")), crossover=True)
    monkeypatch.setattr(spatial, "SUITES", {"tiny": suite})
    assert main(["bench", "--spatial", "tiny", "--repeats", "2", "--json", "--out", str(tmp_path)]) == 0
    res = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0])
    rows = res["rows"]
    assert [(r["mechanism"], r["seq_len"]) for r in rows] == [
        (k, n) for n in (64, 144) for k in ("dwconv3", "na3", "na5", "sdpa")]
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] is not None for r in rows)
    base = [r for r in rows if r["mechanism"] == "dwconv3"]
    assert all(r["fwd_bwd_ratio"] == 1.0 for r in base)
    na3, na5 = ([r for r in rows if r["mechanism"] == k and r["seq_len"] == 144][0] for k in ("na3", "na5"))
    assert na3["options"] == {"kernel_size": 3} and na5["options"] == {"kernel_size": 5}
    assert na5["flops_fwd"] > na3["flops_fwd"]           # the two labels really ran two configurations
    assert {c["mechanism"] for c in res["crossover"]} == {"na3", "na5", "sdpa"}
    doc = json.loads((tmp_path / "spatial.json").read_text())
    assert doc["suites"][0]["suite"] == "tiny"
    md = (tmp_path / "spatial.md").read_text()
    assert "| na5 | 144 | 12x12 |" in md and "baseline dwconv3" in md


def test_unknown_suite_is_refused():
    with pytest.raises(SystemExit):
        spatial.main(["--suites", "nope"])


@pytest.mark.parametrize("name", list(spatial.SUITES))
def test_every_suite_entry_builds(name):
    """The real suites name registered mechanisms (or plain baselines) with options they accept,
    and each builds at the suite's smallest shape and runs one forward."""
    suite = spatial.SUITES[name]
    keys = [e.key for e in suite.entries]
    assert suite.baseline in keys and len(set(keys)) == len(keys)
    n = min(suite.seq_lens)
    x = torch.randn(1, n, suite.heads * suite.head_dim)
    for e in suite.entries:
        m = build_module(e.name, suite.heads * suite.head_dim, suite.heads, dict(e.options))
        with torch.no_grad():
            kwargs = {"is_causal": True} if suite.causal else {}
            assert m(x, **kwargs).shape == x.shape, e.key


@pytest.mark.parametrize("flag", [["--device", "cuda"], ["--dtype", "bfloat16"], ["--causal"], ["--batch", "2"],
                                  ["--options", '{"lka": {}}'], ["--seq-lens", "64"]])
def test_spatial_mode_refuses_flags_it_would_ignore(flag, capsys):
    assert main(["bench", "--spatial", "lka", *flag]) == 2
    assert flag[0] in capsys.readouterr().err
