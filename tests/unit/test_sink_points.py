"""The metrics sink's points: which curves each message gives, and the
ledger that keeps a point from being written twice."""

from __future__ import annotations

import math

from services.sink.points import Ledger, points_of
from shared.messages import AdapterPublished, ExperimentEvent, StepMetrics, TrainStats


def metrics(step: int, **fields) -> StepMetrics:
    values = {"experiment_id": "exp-1", "step": step, "adapter_version": step, "reward_mean": 0.5,
              "accuracy": 0.25, "rollout_s": 1.5, "train_s": 0.5, **fields}
    return StepMetrics(**values)


def test_step_metrics_give_one_point_per_curve_and_held_out_by_version():
    points = {p.tag: p for p in points_of(metrics(2, start_eval_accuracy=0.1, eval_accuracy=0.9,
                                                  produced_version=3))}
    assert points["reward/mean"].step == 2 and points["reward/mean"].value == 0.5
    assert points["adapter/version"].value == 3.0
    held_out = sorted((p.step, p.value) for p in points_of(metrics(2, start_eval_accuracy=0.1, eval_accuracy=0.9,
                                                                   produced_version=3))
                      if p.tag == "accuracy/held_out")
    assert held_out == [(0, 0.1), (3, 0.9)]


def test_unmeasured_and_non_finite_values_give_no_point():
    tags = {p.tag for p in points_of(metrics(0, reward_mean=None, accuracy=None, rollout_s=math.nan))}
    assert not tags & {"reward/mean", "accuracy/train", "time/rollout_s", "accuracy/held_out"}
    assert "time/train_s" in tags


def test_adapter_announcement_gives_train_stats_at_its_step():
    published = AdapterPublished(experiment_id="exp-1", version=4, step=3, path="/x", digest="d",
                                 stats=TrainStats(loss=0.7, kl=0.01, clip_fraction=0.2, grad_norm=1.5))
    points = {p.tag: p for p in points_of(published)}
    assert points["train/loss"].step == 3 and points["train/kl"].value == 0.01
    assert points["train/clip_fraction"].value == 0.2


def test_other_messages_and_bad_ids_give_nothing():
    assert points_of(ExperimentEvent(experiment_id="exp-1", level="info", code="admitted", message="")) == []
    assert points_of(metrics(0, experiment_id="../etc")) == []


def test_ledger_writes_each_step_of_a_tag_once_and_survives_json():
    ledger = Ledger()
    first = ledger.new_points(points_of(metrics(0)))
    assert first and ledger.new_points(points_of(metrics(0))) == []
    restored = Ledger.from_json(ledger.to_json())
    assert restored.new_points(points_of(metrics(0))) == []
    assert len(restored.new_points(points_of(metrics(1)))) == len(first)
    assert Ledger.from_json({"../x": {"t": [1]}, "ok": "junk"}).steps == {}
