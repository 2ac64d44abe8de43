"""Metric windows and metrics.jsonl records."""
from __future__ import annotations

import json

import pytest

from attnlab.train.metrics import MetricsLog, Window, read_records, records_until


def test_window_means_and_continues_from_its_state():
    w = Window()
    assert w.means() == {"train_loss": None}
    w.add({"loss": 2.0, "accuracy": 0.5}, 0.1)
    w.add({"loss": 1.0, "accuracy": 1.0}, 0.3)
    assert w.means() == {"train_loss": 1.5, "train_accuracy": 0.75}
    again = Window(json.loads(json.dumps(w.state())))                   # as saved in a checkpoint
    assert again.means() == w.means() and again.steps == 2 and again.train_time == pytest.approx(0.4)


def test_records_survive_a_line_cut_short_and_a_resume_keeps_steps_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_records(path) == []
    log = MetricsLog(path)
    log.start([{"type": "header"}])
    for step in (5, 10, 15):
        log.emit({"type": "log", "step": step})
    with path.open("a") as f:
        f.write('{"type": "eval", "st')                                 # killed mid-write
    assert read_records(path) == log.records
    assert [r.get("step") for r in records_until(log.records, 10)] == [None, 5, 10]
    assert MetricsLog(None).path is None                                 # other ranks keep records in memory only
