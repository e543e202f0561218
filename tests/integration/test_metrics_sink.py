"""``clora sink`` against a real short run: a LocalCluster (ACL roles on; the
sink connects as the client user) trains two experiments; the sink's
TensorBoard event files, read back with TensorBoard's own reader, and its
MLflow file store hold one point per step for each experiment, also after
the sink was killed mid-run and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.cli.experiments import ProgressDisplay, watch_until_done
from services.cli.local import LocalCluster
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import ExperimentSpec, RewardSpec, TaskSource

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="the `tensorboard` package is not installed"
).EventAccumulator
mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="`mlflow` / `mlflow-skinny` is not installed")

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]
CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json"}
STEPS = 6
RUN_TIMEOUT_S = 300.0
CATCH_UP_TIMEOUT_S = 60.0
MLFLOW_FILE_STORE = {"MLFLOW_ALLOW_FILE_STORE": "true"}  # recent MLflow (3.17 here) refuses file: stores without it
STEP_TAGS = ("reward/mean", "time/rollout_s", "time/train_s", "adapter/version", "train/loss", "train/kl",
             "train/clip_fraction")


class _Quiet(ProgressDisplay):
    def show(self, records) -> None:
        return None


def spec(experiment_id: str, family: str) -> ExperimentSpec:
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(family=family),
                          reward=RewardSpec(type="family", family=family), steps=STEPS, prompts_per_step=4,
                          group_size=4, max_tokens=8, eval_size=8, learning_rate=3e-3)


def start_sink(cluster: LocalCluster, tensorboard: Path, mlflow_uri: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.cli", "sink", "--tensorboard", str(tensorboard),
               "--mlflow-uri", mlflow_uri, "--data-dir", str(cluster.data_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLORA_LOG_FORMAT": "json", **MLFLOW_FILE_STORE}
    env.pop("REDIS_URL", None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    """Every point of ``tag`` in the run's event files (duplicates kept: no purge)."""
    if not run_dir.is_dir():
        return []
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return sorted(event.step for event in accumulator.Scalars(tag))


def started(log: Path) -> int:
    return log.read_text().count('"event": "sink_started"') if log.exists() else 0


def wait_for(condition, what: str, sink: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while not condition():
        assert sink.poll() is None, f"the sink exited ({sink.returncode}): {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _alive(cluster: LocalCluster) -> bool:
    cluster.check_alive()  # a dead service fails the test with its log tail
    return False


def test_sink_writes_one_point_per_step_to_tensorboard_and_mlflow_across_a_restart(tmp_path, monkeypatch):
    for name, value in MLFLOW_FILE_STORE.items():
        monkeypatch.setenv(name, value)
    cluster = LocalCluster(tmp_path / "cluster", env=CLUSTER_ENV, acl=True)
    tensorboard, mlruns, log = tmp_path / "tb", tmp_path / "mlruns", tmp_path / "sink.log"
    mlflow_uri = f"file:{mlruns}"
    ids = ["sink-sort", "sink-add"]
    sink: subprocess.Popen | None = None
    try:
        cluster.start()
        cluster.wait_ready()
        client = CloraClient.connect(cluster.url, cluster.stream_prefix, data_dir=cluster.data_dir)
        sink = start_sink(cluster, tensorboard, mlflow_uri, log)
        wait_for(lambda: started(log) == 1, "the sink did not start", sink, log)
        for experiment_id, family in zip(ids, ("sort", "add"), strict=True):
            client.submit(spec(experiment_id, family))
        # Killed (no clean stop) once it wrote a step, then started again.
        wait_for(lambda: scalar_steps(tensorboard / ids[0], "reward/mean"), "no first point", sink, log)
        sink.kill()
        sink.wait()
        sink = start_sink(cluster, tensorboard, mlflow_uri, log)
        records = watch_until_done(client, None, ids, timeout_s=RUN_TIMEOUT_S, display=_Quiet(),
                                   should_stop=lambda: _alive(cluster))
        assert [r.status for r in records] == ["finished", "finished"], records
        every_step = list(range(STEPS))
        assert all([m.step for m in client.metrics(i)] == every_step for i in ids)
        wait_for(lambda: all(scalar_steps(tensorboard / i, "train/loss") == every_step for i in ids),
                 "the sink did not catch up", sink, log)
        wait_for(lambda: started(log) == 2, "the sink did not start again", sink, log)
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait()
        cluster.stop()

    for experiment_id in ids:
        run_dir = tensorboard / experiment_id
        for tag in STEP_TAGS:
            assert scalar_steps(run_dir, tag) == every_step, (experiment_id, tag)
        assert scalar_steps(run_dir, "accuracy/held_out") == [0, STEPS], experiment_id
    mlflow = mlflow_tracking.MlflowClient(tracking_uri=mlflow_uri)
    experiment = mlflow.get_experiment_by_name("clora")
    runs = {r.data.tags["clora.experiment_id"]: r for r in mlflow.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(ids)
    for experiment_id, run in runs.items():
        assert run.info.status == "FINISHED", run.info
        for tag in STEP_TAGS:
            steps = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, tag))
            assert steps == every_step, (experiment_id, tag, steps)
