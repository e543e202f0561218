"""The whole system as separate processes on one embedded Redis, with the
shipped tiny model: what issue 6 (points 2 and 3) and issue 8 (point 2) ask.

Each test starts its own ``LocalCluster`` (scheduler, reward, rollout
worker(s), trainer shard(s) as subprocesses) and stops only that cluster.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import msgspec
import pytest
import torch

from services.cli.experiments import ProgressDisplay, watch_until_done
from services.cli.local import LocalCluster
from shared.adapters import AdapterStore
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import (
    AdapterPublished,
    Completion,
    ExperimentSpec,
    RewardSpec,
    TaskSource,
    decode,
)
from shared.runtime import heartbeat_key

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))  # what the services will load
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3"}
RUN_TIMEOUT_S = 240.0


class _Quiet(ProgressDisplay):
    def show(self, records) -> None:  # tests print nothing per poll
        return None


def spec(experiment_id: str, family: str, steps: int, reward: RewardSpec | None = None, **fields) -> ExperimentSpec:
    fields = {"prompts_per_step": 8, "group_size": 8, "max_tokens": 8, "eval_size": 32,
              "learning_rate": 3e-3, **fields}
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(family=family),
                          reward=reward or RewardSpec(type="family", family=family), steps=steps, **fields)


def submit(client: CloraClient, specs: list[ExperimentSpec]) -> None:
    for one in specs:
        client.submit(one)


def wait_finished(cluster: LocalCluster, client: CloraClient, ids: list[str],
                  statuses: dict[str, str] | None = None):
    """Wait until every experiment of ``ids`` ended; each must end ``finished``
    unless ``statuses`` names another status for it."""
    statuses = statuses or {}

    def should_stop() -> bool:
        cluster.check_alive()  # a dead service fails the test with its log tail
        return False

    records = watch_until_done(client, None, ids, timeout_s=RUN_TIMEOUT_S, display=_Quiet(), should_stop=should_stop)
    for experiment_id, record in zip(ids, records, strict=True):
        expected = statuses.get(experiment_id, "finished")
        assert record is not None and record.status == expected, (experiment_id, record)
    return records


def read_stream(client: CloraClient, stream: str, kind) -> list:
    """Every message of ``kind`` on a stream the client has no reader for
    (``adapters``, and the services' own ``completions``)."""
    entries = client.redis.xrange(client.keys.stream(stream))
    return [m for m in (decode(fields[b"msg"], stream) for _, fields in entries) if isinstance(m, kind)]


def rollout_status_after(client: CloraClient, ts: float) -> dict:
    """The rollout worker's heartbeat status, from a beat taken after ``ts``."""
    deadline = time.monotonic() + 30.0
    while True:
        raw = client.redis.get(heartbeat_key(client.prefix, "rollout", "rollout-0"))
        heartbeat = msgspec.msgpack.decode(raw)
        if heartbeat["ts"] > ts:
            return heartbeat["status"]
        assert time.monotonic() < deadline, "no fresh rollout heartbeat"
        time.sleep(0.2)


@pytest.fixture
def cluster_factory(tmp_path):
    started: list[LocalCluster] = []

    def start(**options) -> tuple[LocalCluster, CloraClient]:
        cluster = LocalCluster(tmp_path / f"cluster{len(started)}", env=CLUSTER_ENV, **options)
        started.append(cluster)
        cluster.start()
        cluster.wait_ready()
        return cluster, CloraClient.connect(cluster.url, cluster.stream_prefix)

    yield start
    for cluster in started:
        cluster.stop()


def test_opposite_rewards_learn_in_shared_batches_untrained_adapter_stays_identical(cluster_factory):
    cluster, client = cluster_factory()
    never_matches = RewardSpec(type="regex", pattern="^never-produced$")
    # 16 prompts a step at the default learning rate: steadier than 8 at 3e-3.
    learning = {"steps": 15, "prompts_per_step": 16, "learning_rate": 2e-3, "eval_size": 64}
    specs = [spec("asc", "sort", **learning), spec("desc", "sort_desc", **learning),
             spec("idle", "sort", steps=4, reward=never_matches)]
    submit(client, specs)
    ids = [s.experiment_id for s in specs]
    records = {r.experiment_id: r for r in wait_finished(cluster, client, ids, statuses={"idle": "failed"})}

    # Both tenants learn their own (opposite) target: the reward of their own
    # samples (128 a step), averaged over some three consecutive steps, beats
    # the first three steps by 20 points, and held-out greedy accuracy ends
    # higher than it started. (Not "the last steps": near convergence an Adam
    # step on the few groups left with a signal sometimes knocks sort_desc back
    # for a few steps. And not a fixed held-out gain: the base already answers
    # ~66% of sort_desc's held-out prompts, its noisy teacher having sorted the
    # wrong way round most of the time.)
    for experiment_id in ("asc", "desc"):
        record = records[experiment_id]
        rewards = [m.reward_mean for m in client.metrics(experiment_id)]
        best = max(sum(rewards[i:i + 3]) / 3 for i in range(3, len(rewards) - 2))
        assert len(rewards) == 15 and best - sum(rewards[:3]) / 3 >= 0.2, (experiment_id, rewards)
        assert record.final_accuracy > record.start_accuracy, record
    # They shared decode steps: the rollout worker saw them in one batch.
    status = rollout_status_after(client, max(r.finished_at for r in records.values()))
    assert status["shared_steps"].get("asc|desc", 0) > 0, status["shared_steps"]
    # The tenant that never got a learning signal: it does not pass for a
    # finished experiment, every version holds the same tensors, and its B
    # factors are zero, so it is the base model.
    assert "none of 4 steps updated the adapter" in records["idle"].error, records["idle"]
    store = AdapterStore(cluster.data_dir / "adapters")
    versions = [store.load_tensors(store.path("idle", v)) for v in range(1, store.latest_version("idle") + 1)]
    assert len(versions) == 4
    for tensors in versions[1:]:
        assert tensors.keys() == versions[0].keys()
        assert all(torch.equal(tensors[name], versions[0][name]) for name in tensors)
    assert all(not t.any() for name, t in versions[0].items() if "lora_B" in name)


def test_trainer_sigkill_mid_run_loses_no_step_and_applies_none_twice(cluster_factory):
    cluster, client = cluster_factory()
    steps = 8
    submit(client, [spec("crash", "sort", steps=steps, eval_size=8)])
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(client.metrics("crash")) < 2:
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.05)
    cluster.kill("trainer")
    cluster.start_service("trainer")
    wait_finished(cluster, client, ["crash"])

    metrics = client.metrics("crash")
    assert [m.step for m in metrics] == list(range(steps))
    announcements = [a for a in read_stream(client, "adapters", AdapterPublished) if a.experiment_id == "crash"]
    digests: dict[int, set[str]] = {}
    for announcement in announcements:
        digests.setdefault(announcement.version, set()).add(announcement.digest)
    assert sorted(digests) == list(range(1, steps + 1))  # contiguous versions
    assert all(len(d) == 1 for d in digests.values())  # a re-announced version is the same files
    store = AdapterStore(cluster.data_dir / "adapters")
    assert store.latest_version("crash") == steps
    assert cluster.processes["trainer-0"].starts == 2


def test_two_rollout_workers_two_trainer_shards(cluster_factory):
    cluster, client = cluster_factory(num_rollout_workers=2, num_trainer_shards=2)
    ids = ["shard-a", "shard-b", "shard-c", "shard-d"]
    families = ["sort", "sort_desc", "add", "sub"]
    submit(client, [spec(i, f, steps=4, eval_size=8) for i, f in zip(ids, families, strict=True)])
    wait_finished(cluster, client, ids)

    workers = {c.worker for c in read_stream(client, "completions", Completion)}
    assert workers == {"rollout-0", "rollout-1"}
    trainers: dict[str, set[str]] = {}
    for announcement in read_stream(client, "adapters", AdapterPublished):
        trainers.setdefault(announcement.experiment_id, set()).add(announcement.trainer)
    for experiment_id in ids:
        assert trainers[experiment_id] == {f"trainer-{zlib.crc32(experiment_id.encode()) % 2}"}


def test_clora_demo_writes_table_plot_and_json(tmp_path):
    """``clora demo`` end to end (few steps: learning is checked above)."""
    import json
    import subprocess
    import sys

    results, plot = tmp_path / "demo.json", tmp_path / "rewards.png"
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--steps", "2", "--data-dir", str(tmp_path / "data"),
         "--json", str(results), "--plot", str(plot)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "START ACC" in run.stdout and plot.stat().st_size > 0
    experiments = json.loads(results.read_text())["experiments"]
    assert len(experiments) == 4 and len({e["family"] for e in experiments}) == 4
    for experiment in experiments:
        assert experiment.keys() >= {"id", "family", "start_accuracy", "final_accuracy", "steps", "wall_s"}
        assert experiment["steps"] == 2 and 0.0 <= experiment["final_accuracy"] <= 1.0
