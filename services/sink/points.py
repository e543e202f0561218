"""What the metrics sink writes: each message's curve points, and the ledger
that keeps a point from being written twice. Pure functions, no I/O.

Curves (TensorBoard tag = MLflow metric key = W&B key):

- from ``StepMetrics`` (x = the step): ``reward/mean``, ``accuracy/train``,
  ``time/rollout_s``, ``time/train_s``, ``adapter/version`` (the version the
  step produced), ``groups/failed``; ``accuracy/held_out`` at x = the adapter
  version it measures (0 for ``start_eval_accuracy``, the produced version
  for ``eval_accuracy``), so it reads as accuracy over versions.
- from ``AdapterPublished`` (x = the step it trained): ``train/loss``,
  ``train/kl``, ``train/clip_fraction``, ``train/grad_norm``,
  ``train/num_tokens``.

A value that is None (not measured) or not finite gives no point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.messages import AdapterPublished, StepMetrics, is_experiment_id


@dataclass(frozen=True)
class Point:
    experiment_id: str
    tag: str
    step: int
    value: float


def _point(experiment_id: str, tag: str, step: int, value: float | int | None) -> list[Point]:
    if value is None or isinstance(value, bool) or not math.isfinite(float(value)) or step < 0:
        return []
    return [Point(experiment_id, tag, int(step), float(value))]


def step_metrics_points(metrics: StepMetrics) -> list[Point]:
    experiment_id, step = metrics.experiment_id, metrics.step
    produced = metrics.produced_version if metrics.produced_version is not None else step + 1
    return [
        *_point(experiment_id, "reward/mean", step, metrics.reward_mean),
        *_point(experiment_id, "accuracy/train", step, metrics.accuracy),
        *_point(experiment_id, "time/rollout_s", step, metrics.rollout_s),
        *_point(experiment_id, "time/train_s", step, metrics.train_s),
        *_point(experiment_id, "adapter/version", step, produced),
        *_point(experiment_id, "groups/failed", step, metrics.failed_groups),
        *_point(experiment_id, "accuracy/held_out", 0, metrics.start_eval_accuracy),
        *_point(experiment_id, "accuracy/held_out", produced, metrics.eval_accuracy),
    ]


def adapter_points(published: AdapterPublished) -> list[Point]:
    experiment_id, step, stats = published.experiment_id, published.step, published.stats
    return [
        *_point(experiment_id, "train/loss", step, stats.loss),
        *_point(experiment_id, "train/kl", step, stats.kl),
        *_point(experiment_id, "train/clip_fraction", step, stats.clip_fraction),
        *_point(experiment_id, "train/grad_norm", step, stats.grad_norm),
        *_point(experiment_id, "train/num_tokens", step, stats.num_tokens),
    ]


def points_of(message: object) -> list[Point]:
    """The curve points of one message (none from other kinds or a bad id)."""
    if isinstance(message, StepMetrics):
        points = step_metrics_points(message)
    elif isinstance(message, AdapterPublished):
        points = adapter_points(message)
    else:
        return []
    return points if is_experiment_id(points[0].experiment_id if points else "") else []


@dataclass
class Ledger:
    """The points already written: per experiment and tag, the steps seen.
    A step of a tag is written once (a redelivered or re-announced message,
    or a stream re-read after a restart, adds nothing)."""

    steps: dict[str, dict[str, set[int]]] = field(default_factory=dict)

    def new_points(self, points: list[Point]) -> list[Point]:
        fresh = []
        for point in points:
            seen = self.steps.setdefault(point.experiment_id, {}).setdefault(point.tag, set())
            if point.step not in seen:
                seen.add(point.step)
                fresh.append(point)
        return fresh

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {exp: {tag: sorted(steps) for tag, steps in tags.items()} for exp, tags in self.steps.items()}

    @classmethod
    def from_json(cls, raw: object) -> "Ledger":
        ledger = cls()
        if not isinstance(raw, dict):
            return ledger
        for experiment_id, tags in raw.items():
            if not is_experiment_id(experiment_id) or not isinstance(tags, dict):
                continue
            ledger.steps[experiment_id] = {str(tag): {int(s) for s in steps if isinstance(s, int)}
                                           for tag, steps in tags.items() if isinstance(steps, list)}
        return ledger
