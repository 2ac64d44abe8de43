"""FLOP counting: FlopCounterMode with useful-work SDPA formulas against the baseline's formula."""
from __future__ import annotations

import pytest

from attnlab.bench.adapters import SDPABaseline
from attnlab.bench.flops import count_flops
from attnlab.bench.worker import Shape


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_flop_counter_agrees_with_the_baselines_useful_flops(causal):
    """mhsa runs the same ops as the baseline: counted FLOPs must equal the baseline's formula."""
    job = {"device": "cpu", "dtype": "float32", "batch": 2, "seq_len": 24, "heads": 2, "head_dim": 8,
           "causal": causal}
    shape = Shape(job)
    counted = count_flops(shape.build({"name": "mhsa"}), shape.x, shape.grad_out, heads=2, causal=causal)
    assert counted == (*SDPABaseline.useful_flops(2, 24, 16, 2, causal), "flop_counter")
    sdpa = count_flops(shape.build({"name": "sdpa"}), shape.x, shape.grad_out, heads=2, causal=causal)
    assert sdpa[2] == "useful_flops"
