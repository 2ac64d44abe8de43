"""The shared validators: one message per check, naming the mechanism, the argument and the value."""
import math

import pytest

from attnlab import create, list_specs
from attnlab._checks import check_dropout, check_positive


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, True, "0.1", None])
def test_check_dropout_rejects(bad):
    with pytest.raises(ValueError, match=r"m: proj_drop must be a number in \[0, 1\), got "):
        check_dropout("m", attn_drop=0.0, proj_drop=bad)


def test_check_dropout_accepts():
    check_dropout("m", attn_drop=0, proj_drop=0.5)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "1"])
def test_check_positive_rejects(bad):
    with pytest.raises(ValueError, match=r"m: scale must be a finite number > 0, got "):
        check_positive("m", "scale", bad)


def test_check_positive_returns_float():
    assert check_positive("m", "eps", 2) == 2.0 and isinstance(check_positive("m", "eps", 2), float)


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_every_mechanism_names_the_bad_dropout(spec):
    with pytest.raises(ValueError, match=rf"{spec.name}: proj_drop must be a number in \[0, 1\), got 1.5"):
        create(spec.name, 32, 4, proj_drop=1.5, **spec.test_kwargs)
