"""One forward signature for the spatial layouts (2d, 3d): channels-last x plus the sequence
keywords, each refused with NotImplementedError naming the mechanism and the feature."""
from __future__ import annotations

import inspect

import pytest
import torch

import attnlab

SHAPE = {"2d": (1, 4, 4, 32), "3d": (1, 4, 4, 4, 32)}
SPATIAL = [s for s in attnlab.list_specs() if s.layout in SHAPE]


@pytest.mark.parametrize("spec", SPATIAL, ids=lambda s: s.name)
def test_spatial_forward_signature(spec):
    params = inspect.signature(spec.cls.forward).parameters
    assert list(params)[:2] == ["self", "x"]
    for name, default in (("attn_mask", None), ("is_causal", False), ("cache", None)):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is default


@pytest.mark.parametrize("feature,kwargs", [
    ("causal", dict(is_causal=True)),
    ("attn_mask", dict(attn_mask=torch.ones(1, 16, dtype=torch.bool))),
    ("kv_cache", dict(cache=attnlab.KVCache())),
])
@pytest.mark.parametrize("spec", SPATIAL, ids=lambda s: s.name)
def test_unsupported_spatial_features_raise(spec, feature, kwargs):
    if spec.supports(feature):
        pytest.skip(f"{spec.name} supports {feature}")
    m = attnlab.create(spec.name, 32, 4, **spec.test_kwargs).eval()
    with pytest.raises(NotImplementedError, match=rf"{spec.name}.*{feature}"):
        m(torch.randn(*SHAPE[spec.layout]), **kwargs)


@pytest.mark.parametrize("spec", SPATIAL, ids=lambda s: s.name)
def test_causal_axes_flag_matches_the_constructor(spec):
    """spec.causal_axes says the constructor takes causal= (forward's flag is spec.causal)."""
    assert spec.causal_axes == ("causal" in spec.options())
    if spec.causal_axes:
        m = attnlab.create(spec.name, 32, 4, causal=True, **spec.test_kwargs).eval()
        x = torch.randn(*SHAPE[spec.layout])
        with torch.no_grad():
            y = m(x)
            x2 = x.clone()
            x2[:, -1] = 0.0                   # the last row/frame changes...
            y2 = m(x2)
        torch.testing.assert_close(y[:, :-1], y2[:, :-1])   # ...and nothing before it sees it
