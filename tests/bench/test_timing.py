"""The shared timing loop: round order, skipped subjects, warm-up and passes per sample."""
from __future__ import annotations

import pytest

from attnlab.bench.timing import Subject, ratio_uncertainty, run_rounds


def _recorder(log, name):
    return {"a": lambda: log.append((name, "a")), "b": lambda: log.append((name, "b"))}


def test_rounds_time_key_after_key_in_a_rotating_order():
    log = []
    subjects = [Subject(n, _recorder(log, n)) for n in ("x", "y", "z")]
    rounds = run_rounds(subjects, warmup=0, repeats=3, trial=False)
    assert log == [("x", "a"), ("y", "a"), ("z", "a"), ("x", "b"), ("y", "b"), ("z", "b"),
                   ("y", "a"), ("z", "a"), ("x", "a"), ("y", "b"), ("z", "b"), ("x", "b"),
                   ("z", "a"), ("x", "a"), ("y", "a"), ("z", "b"), ("x", "b"), ("y", "b")]
    assert {n: {k: len(v) for k, v in keys.items()} for n, keys in rounds.samples.items()} == \
        {n: {"a": 3, "b": 3} for n in ("x", "y", "z")}
    assert rounds.skipped == {} and rounds.warmup == 0


def test_a_subject_that_raises_is_skipped_and_the_others_go_on():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 2:  # the trial and the warm-up pass, then it breaks
            raise RuntimeError("broke")

    prepared = []
    subjects = [Subject("ok", {"a": lambda: None}, prepare=lambda: prepared.append(1)),
                Subject("bad", {"a": lambda: 1 / 0}), Subject("late", {"a": flaky})]
    rounds = run_rounds(subjects, warmup=1, repeats=2)
    assert list(rounds.samples) == ["ok"] and len(rounds.samples["ok"]["a"]) == 2
    assert rounds.skipped == {"bad": "ZeroDivisionError: division by zero", "late": "RuntimeError: broke"}
    assert len(prepared) == 1 + 1 + 2  # trial, warm-up, two rounds: before every timed call
    with pytest.raises(ZeroDivisionError):
        run_rounds([Subject("bad", {"a": lambda: 1 / 0})], warmup=0, repeats=1, skip_errors=False)


def test_short_calls_are_repeated_to_fill_min_seconds_and_the_budget_sets_the_rounds():
    count = {"n": 0}
    rounds = run_rounds([Subject("x", {"a": lambda: count.__setitem__("n", count["n"] + 1)})],
                        warmup=1, repeats=2, trial=False, min_seconds=0.01)
    assert rounds.loops["x"]["a"] > 1 and count["n"] == 1 + 2 * rounds.loops["x"]["a"]
    free = run_rounds([Subject("x", {"a": lambda: None})], budget_s=0.01, min_repeats=3, max_repeats=5)
    assert free.warmup == 1 and 3 <= len(free.samples["x"]["a"]) <= 5


def test_ratio_uncertainty_is_zero_without_a_baseline_and_grows_with_spread():
    steady = {"base": {"a": [1.0] * 8}, "x": {"a": [2.0] * 8}}
    noisy = {"base": {"a": [1.0] * 8}, "x": {"a": [1.0, 3.0] * 4}}
    assert ratio_uncertainty(steady, None, ["base", "x"]) == 0.0
    assert ratio_uncertainty(steady, "base", ["base", "x"]) == 0.0
    assert ratio_uncertainty(noisy, "base", ["base", "x"]) > 0.1
