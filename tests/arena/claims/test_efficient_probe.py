"""`attnlab reproduce efficient_probe --quick` (a random tiny Dinov2Model as the frozen encoder) and the probes."""
import argparse
import math

import pytest
import torch

from attnlab.arena.claims import get_claim, render
from attnlab.arena.claims import efficient_probe as claim_module
from attnlab.tasks import fashion_mnist as fm

pytest.importorskip("transformers")
try:
    fm.find_root()
    REAL = True
except FileNotFoundError:
    REAL = False


def _args(*argv):
    p = argparse.ArgumentParser()
    claim_module.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not REAL:
        pytest.skip(f"Fashion-MNIST not installed in {fm.SYSTEM_ROOT}")
    claim = get_claim("efficient_probe")
    args = _args()
    args.name, args.quick, args.seed, args.out = "efficient_probe", True, 0, tmp_path_factory.mktemp("ep")
    return claim, args, claim.run(args)


def test_quick_report_has_every_probe_with_finite_numbers(quick):
    claim, args, report = quick
    assert [row[0] for row in report.tables[0].rows] == [claim_module.LABELS[k] for k in claim_module.PROBES]
    for kind, runs in report.data["runs"].items():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and r["flops"] > 0 and math.isfinite(r["train_images_per_s"])
    assert report.data["flop_ratio_map_over_ep"] > 1
    page = render(claim, report, "attnlab reproduce efficient_probe --quick", 1.0)
    assert "| EP (efficient_probe) |" in page and f"Verdict: {report.verdict}" in page


def test_probe_pools_read_the_patch_tokens_and_lp_reads_cls():
    args = _args("--map-heads", "2", "--ep-queries", "4")
    x = torch.randn(3, 1 + 9, 16)
    for kind in claim_module.PROBES:
        probe = claim_module.Probe(kind, 16, 10, args).eval()
        y = probe(x)
        assert y.shape == (3, 10)
        x2 = x.clone()
        x2[:, 0] += 1.0                                    # change only the CLS token
        moved = not torch.allclose(probe(x2), y)
        assert moved == (kind == "lp_cls"), kind


def test_probe_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    args = _args("--map-heads", "2", "--ep-queries", "4")
    x = torch.randn(1, 1 + 9, 16)
    for kind in ("map", "ep"):
        probe = claim_module.Probe(kind, 16, 10, args).eval()
        probe.pool.backend = "reference"                  # the eager path: every matmul is seen
        with FlopCounterMode(display=False) as counter:
            probe(x)
        assert probe.flops(9) == counter.get_total_flops(), kind


def test_pixels_are_resized_grey_replicated_and_normalised():
    import numpy as np
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    px = claim_module.to_pixels(images, 56, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.25, 0.5]))
    assert px.shape == (2, 3, 56, 56)
    assert torch.allclose(px[:, 0], torch.ones(())) and torch.allclose(px[:, 1], torch.full((), 2.0))


def test_bad_image_size_is_refused(tmp_path):
    claim = get_claim("efficient_probe")
    args = _args("--image-size", "100")
    args.name, args.quick, args.seed, args.out = "efficient_probe", False, 0, tmp_path
    with pytest.raises(ValueError, match="multiple of DINOv2's patch 14"):
        claim.run(args)
