"""Where the sink's points go: TensorBoard event files (one run directory per
experiment), an MLflow tracking store (one run per experiment), Weights &
Biases (one run per experiment, offline unless ``WANDB_MODE`` says else).

Each backend is an optional dependency imported when its writer is made,
with a clear error when it is missing (``SinkDependencyError``). Every
writer has ``write(points)``, ``note(experiment_id, step, text)`` (an
event), ``end(experiment_id, status)`` and ``flush()`` / ``close()``.
Experiment ids reach a path or a run name only after
``is_experiment_id``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.sink.points import Point
from shared.messages import is_experiment_id

MLFLOW_EXPERIMENT_TAG = "clora.experiment_id"
MLFLOW_BATCH = 500  # metrics per log_batch call (MLflow's own limit is 1000)
END_STATUS_MLFLOW = {"finished": "FINISHED", "cancelled": "KILLED", "failed": "FAILED", "invalid": "FAILED",
                     "invalid_spec": "FAILED"}


class SinkConfigError(RuntimeError):
    """A configured backend cannot be used (printed without a traceback)."""


class SinkDependencyError(SinkConfigError):
    """An optional package the configured backend needs is not installed."""


def _checked_id(experiment_id: str) -> str:
    if not is_experiment_id(experiment_id):
        raise ValueError(f"not an experiment id: {experiment_id!r}")
    return experiment_id


class TensorBoardWriter:
    """One ``SummaryWriter`` per experiment under ``root/<experiment_id>``."""

    def __init__(self, root: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise SinkDependencyError("the TensorBoard sink needs the `tensorboard` package "
                                      f"(pip install tensorboard): {exc}") from None
        self._summary_writer = SummaryWriter
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}

    def _writer(self, experiment_id: str):
        if experiment_id not in self._writers:
            log_dir = self.root / _checked_id(experiment_id)
            self._writers[experiment_id] = self._summary_writer(log_dir=str(log_dir), flush_secs=3600)
        return self._writers[experiment_id]

    def write(self, points: Sequence[Point]) -> None:
        for point in points:
            self._writer(point.experiment_id).add_scalar(point.tag, point.value, point.step)

    def note(self, experiment_id: str, step: int, text: str) -> None:
        self._writer(experiment_id).add_text("events", text, step)

    def end(self, experiment_id: str, status: str) -> None:
        writer = self._writers.pop(experiment_id, None)
        if writer is not None:
            writer.close()

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for experiment_id in list(self._writers):
            self.end(experiment_id, "")


class MlflowWriter:
    """One MLflow run per experiment (tag ``clora.experiment_id``) in the
    MLflow experiment ``experiment_name`` of ``tracking_uri``; a restarted
    sink finds its runs again by that tag."""

    def __init__(self, tracking_uri: str, experiment_name: str = "clora") -> None:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise SinkDependencyError("the MLflow sink needs `mlflow` or `mlflow-skinny` "
                                      f"(pip install mlflow-skinny): {exc}") from None
        from mlflow.exceptions import MlflowException

        self._metric = Metric
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment_name)
            self.mlflow_experiment_id = (found.experiment_id if found is not None
                                         else self.client.create_experiment(experiment_name))
        except MlflowException as exc:  # e.g. a file: store without MLFLOW_ALLOW_FILE_STORE=true
            raise SinkConfigError(f"MLflow tracking URI {tracking_uri}: {exc.message}") from None
        self._runs: dict[str, str] = {}

    def run_id(self, experiment_id: str) -> str:
        if experiment_id in self._runs:
            return self._runs[experiment_id]
        _checked_id(experiment_id)
        found = self.client.search_runs([self.mlflow_experiment_id],
                                        filter_string=f"tags.`{MLFLOW_EXPERIMENT_TAG}` = '{experiment_id}'",
                                        max_results=1)
        run = found[0] if found else self.client.create_run(
            self.mlflow_experiment_id, run_name=experiment_id, tags={MLFLOW_EXPERIMENT_TAG: experiment_id})
        self._runs[experiment_id] = run.info.run_id
        return run.info.run_id

    def write(self, points: Sequence[Point]) -> None:
        now_ms = int(time.time() * 1000)
        by_run: dict[str, list] = {}
        for point in points:
            metric = self._metric(point.tag, point.value, now_ms, point.step)
            by_run.setdefault(self.run_id(point.experiment_id), []).append(metric)
        for run_id, metrics in by_run.items():
            for start in range(0, len(metrics), MLFLOW_BATCH):
                self.client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])

    def note(self, experiment_id: str, step: int, text: str) -> None:
        self.client.set_tag(self.run_id(experiment_id), "clora.last_event", text[:5000])

    def end(self, experiment_id: str, status: str) -> None:
        self.client.set_terminated(self.run_id(experiment_id), END_STATUS_MLFLOW.get(status, "FINISHED"))

    def flush(self) -> None:
        return None  # every call above is already durable

    def close(self) -> None:
        return None


class WandbWriter:
    """One W&B run per experiment (run id = the experiment id, resumed after
    a restart) in ``project``; offline unless ``WANDB_MODE`` is set."""

    def __init__(self, project: str, directory: str | Path) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise SinkDependencyError(f"the W&B sink needs `wandb` (pip install wandb): {exc}") from None
        self._wandb = wandb
        self.project = project
        self.directory = Path(directory)
        self._runs: dict[str, Any] = {}

    def _run(self, experiment_id: str):
        if experiment_id not in self._runs:
            import os

            self._runs[experiment_id] = self._wandb.init(
                project=self.project, name=experiment_id, id=_checked_id(experiment_id), resume="allow",
                dir=str(self.directory), mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        return self._runs[experiment_id]

    def write(self, points: Sequence[Point]) -> None:
        for point in points:
            self._run(point.experiment_id).log({point.tag: point.value, "step": point.step})

    def note(self, experiment_id: str, step: int, text: str) -> None:
        self._run(experiment_id).summary["last_event"] = text

    def end(self, experiment_id: str, status: str) -> None:
        run = self._runs.pop(experiment_id, None)
        if run is not None:
            run.finish(exit_code=0 if status == "finished" else 1)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        for experiment_id in list(self._runs):
            self.end(experiment_id, "finished")
