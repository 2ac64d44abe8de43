"""`attnlab reproduce dcal --quick`: the four-class split, every variant's row, branch accuracies, references."""
import argparse
import math

import pytest
import torch

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims import dcal
from attnlab.tasks import fashion_mnist as fm

try:
    fm.find_root()
    REAL = True
except FileNotFoundError:
    REAL = False

pytestmark = pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST not installed in {fm.SYSTEM_ROOT}")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    claim = get_claim("dcal")
    parser = argparse.ArgumentParser()
    claim.add_arguments(parser)
    args = parser.parse_args([])
    args.name, args.quick, args.seed, args.out = "dcal", True, 0, tmp_path_factory.mktemp("dcal")
    return claim, args, claim.run(args)


def test_split_keeps_the_four_upper_body_classes_relabelled():
    data = dcal.load_split(4)
    _, train_y, _, test_y = fm.load_fashion_mnist(fm.find_root())
    for split, labels in (("train", train_y), ("test", test_y)):
        keep = [i for i, y in enumerate(labels) if y in dcal.CLASSES]
        assert len(data[f"{split}_y"]) == len(keep) == {"train": 24000, "test": 4000}[split]
        want = torch.tensor([dcal.CLASSES.index(int(labels[i])) for i in keep])
        assert torch.equal(data[f"{split}_y"], want)
    assert data["train_x"].shape == (24000, 49, 16)
    # standardised with the subset's train statistics
    assert abs(float(data["train_x"].mean())) < 1e-3 and abs(float(data["train_x"].std()) - 1) < 1e-3


def test_quick_report_rows_and_finite_numbers(quick):
    claim, args, report = quick
    rows = report.tables[0].rows
    assert [row[0] for row in rows] == ["SA (baseline)", "SA + GLCA + PWCA", "SA + GLCA", "SA + PWCA",
                                        "reference: plain torch ViT", "reference: linear on pixels"]
    for label, runs in report.data["runs"].items():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0
            if label.startswith("sa"):
                assert 0.0 <= r["test_sa_accuracy"] <= 1.0
                assert ("test_glca_accuracy" in r) == ("glca" in label)
                assert all(math.isfinite(v) for v in r["last_parts"].values())
    # DCAL's uncertainty weights trained (moved from 0) and PWCA's loss was computed in training
    assert any(abs(w) > 0 for w in report.data["runs"]["sa+glca+pwca"][0]["loss_log_vars"])
    assert set(report.data["runs"]["sa+glca+pwca"][0]["last_parts"]) == {"sa", "glca", "pwca"}
    page = render(claim, report, "attnlab reproduce dcal --quick", 1.0)
    assert "| SA + GLCA + PWCA |" in page and f"Verdict: {report.verdict}" in page
    assert (args.out / "dcal_curves.png").is_file()


def test_sa_variant_is_a_plain_vit_in_parameters():
    p = argparse.ArgumentParser()
    dcal.add_arguments(p)
    args = p.parse_args([])
    sa, plain = dcal.build("sa", args, 16, 49), dcal.build("plain", args, 16, 49)
    n_sa, n_plain = (sum(q.numel() for q in m.parameters()) for m in (sa, plain))
    # the same ViT; attnlab's carries the 3 unused uncertainty weights of its loss
    assert n_sa - n_plain == 3
