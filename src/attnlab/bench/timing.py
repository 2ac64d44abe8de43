"""The one timing loop of `attnlab bench`, shared by its modes (mechanisms, --numerics, --neighborhood).

A subject is a name and its calls, keyed (the mechanism mode's are "fwd_ms" and "fwd_bwd_ms").
A round times, key after key, that call of every subject, in an order that rotates each round,
so that drift on a noisy machine hits every subject alike and the calls compared with each
other run close together. One timed call: the subject's `prepare()` (clearing gradients, say),
sync, clock, call, sync, clock; a sample is the mean over `loops` timed calls, in milliseconds.

1. Trial (unless trial=False): every call of every subject once; a subject whose call raises is
   skipped, the others go on.
2. Warm-up: `warmup` untimed rounds; for None, one, or none where the trial calls took longer
   than `budget_s`. From the last warm-up round, each call's `loops` becomes
   ceil(min_seconds / its time), at least 1, so that one sample of a short call covers as much
   of the machine's drift as one of a long call.
3. Timed rounds: `repeats`; for None, as many as fit in `budget_s`, from `min_repeats` to
   `max_repeats`, then more (up to twice the budget) while the standard error of some median
   paired ratio to `baseline` is over RATIO_TOLERANCE.

The garbage collector is off during 2 and 3: no collector pauses inside timed calls.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from attnlab._io import describe_error

RATIO_TOLERANCE = 0.01  # wanted standard error of a median ratio to the baseline, relative


def _nothing() -> None:
    pass


@dataclass
class Subject:
    """One thing timed: `calls` {key: a call}, each preceded by `prepare()` outside the clock."""
    name: str
    calls: dict[str, Callable[[], object]]
    prepare: Callable[[], None] = _nothing


@dataclass
class Rounds:
    """What `run_rounds` measured."""
    samples: dict[str, dict[str, list[float]]]   # subject -> key -> ms per timed round (subjects that lasted)
    skipped: dict[str, str] = field(default_factory=dict)   # subject -> why it stopped
    warmup: int = 0                                          # the warm-up rounds run
    loops: dict[str, dict[str, int]] = field(default_factory=dict)   # timed calls per sample


def ratio_uncertainty(samples: dict[str, dict[str, list[float]]], baseline: str | None,
                      alive: list[str]) -> float:
    """The largest relative standard error of a median paired ratio to the baseline.

    Standard error of a median ~ 1.2533 * sigma / sqrt(n), with sigma estimated as IQR / 1.349.
    """
    if baseline not in alive:
        return 0.0
    worst = 0.0
    for name in alive:
        if name == baseline:
            continue
        for key, mine in samples[name].items():
            ratios = [a / b for a, b in zip(mine, samples[baseline].get(key, []))]
            if len(ratios) < 4:
                continue
            q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            worst = max(worst, 1.2533 * (q3 - q1) / 1.349 / math.sqrt(len(ratios)) / med)
    return worst


def run_rounds(subjects: list[Subject], *, warmup: int | None = None, repeats: int | None = None,
               budget_s: float = 3.0, min_repeats: int = 3, max_repeats: int = 30,
               baseline: str | None = None, trial: bool = True, min_seconds: float = 0.0,
               sync: Callable[[], None] = _nothing, skip_errors: bool = True) -> Rounds:
    """Trial, warm up and time `subjects` as the module docstring says.

    An exception in a call skips that subject (its reason in `Rounds.skipped`); with
    skip_errors=False it propagates instead.
    """
    by_name = {s.name: s for s in subjects}
    alive = list(by_name)
    skipped: dict[str, str] = {}
    loops = {s.name: {key: 1 for key in s.calls} for s in subjects}
    last: dict[str, float] = {}  # each subject's latest round, ms of all its timed calls: sizes the run

    def timed(s: Subject, key: str) -> float:
        count, total = loops[s.name][key], 0.0
        for _ in range(count):
            s.prepare()
            sync()
            t0 = time.perf_counter()
            s.calls[key]()
            sync()
            total += time.perf_counter() - t0
        return total * 1e3 / count

    def drop(name: str, e: Exception) -> None:
        if not skip_errors:
            raise e
        skipped[name] = describe_error(e)
        alive.remove(name)
        gc.collect()  # whatever the failed call left is freed before the next is timed

    for s in subjects if trial else []:
        try:
            last[s.name] = sum(timed(s, key) for key in s.calls)
        except Exception as e:
            drop(s.name, e)

    samples = {name: {key: [] for key in by_name[name].calls} for name in alive}

    def one_round(r: int, record: bool) -> dict[str, dict[str, float]]:
        k = r % len(alive) if alive else 0
        order = alive[k:] + alive[:k]
        times: dict[str, dict[str, float]] = {name: {} for name in order}
        for key in dict.fromkeys(key for name in order for key in by_name[name].calls):
            for name in order:
                if name not in alive or key not in by_name[name].calls:
                    continue
                try:
                    times[name][key] = timed(by_name[name], key)
                except Exception as e:
                    drop(name, e)
        for name in alive:
            last[name] = sum(ms * loops[name][key] for key, ms in times[name].items())
            if record:
                for key, ms in times[name].items():
                    samples[name][key].append(ms)
        return times

    gc.collect()
    gc.disable()
    try:
        if warmup is None:  # a round, unless the trial calls took so long that they warmed up enough
            warmup = 0 if sum(last.values()) / 1e3 > budget_s else 1
        warm: dict[str, dict[str, float]] = {}
        for r in range(warmup):
            warm = one_round(r, record=False)
        for name, by_key in warm.items():
            for key, ms in by_key.items():
                loops[name][key] = max(1, math.ceil(min_seconds / max(ms / 1e3, 1e-9)))
        if repeats is not None:
            for r in range(repeats):
                one_round(r, record=True)
        else:
            round_s = sum(last.get(name, 0.0) for name in alive) / 1e3
            planned = math.ceil(budget_s / round_s) if round_s > 0 else max_repeats
            planned = max(min_repeats, min(max_repeats, planned))
            t0, r = time.perf_counter(), 0
            while r < planned or (r < max_repeats and time.perf_counter() - t0 < 2 * budget_s
                                  and ratio_uncertainty(samples, baseline, alive) > RATIO_TOLERANCE):
                one_round(r, record=True)
                r += 1
    finally:
        gc.enable()
    return Rounds(samples={name: samples[name] for name in alive}, skipped=skipped, warmup=warmup, loops=loops)
