"""Helpers for the tests that run the four services as processes
(``LocalCluster``) next to something hostile: a fuzzer, a Redis restart.

Each test stops only the cluster (and Redis) it started.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import redis

from services.cli.experiments import ProgressDisplay, watch_until_done
from services.cli.local import LocalCluster
from services.scheduler.state import Keys
from shared.client import CloraClient
from shared.messages import (
    AdapterPublished,
    ExperimentSpec,
    ExperimentSubmit,
    MessageDecodeError,
    RewardSpec,
    TaskSource,
    decode,
    encode,
    now,
)
from shared.runtime import heartbeat_key

SERVICES = ("scheduler", "reward", "rollout", "trainer")
CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3",
               "CLORA_HEARTBEAT_TTL_S": "3"}


class Quiet(ProgressDisplay):
    def show(self, records) -> None:  # tests print nothing per poll
        return None


def small_spec(experiment_id: str, steps: int = 3) -> ExperimentSpec:
    """A small experiment of the ``add`` family (seconds per step on a CPU)."""
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(family="add"),
                          reward=RewardSpec(type="family", family="add"), steps=steps, prompts_per_step=4,
                          group_size=4, max_tokens=8, eval_size=8)


def submit(client: redis.Redis, keys: Keys, spec: ExperimentSpec) -> None:
    client.xadd(keys.stream("experiments"), {"msg": encode(ExperimentSubmit(spec=spec, ts=now()))})


def wait_finished(cluster: LocalCluster, client: redis.Redis, keys: Keys, experiment_id: str, timeout_s: float):
    def should_stop() -> bool:
        cluster.check_alive()  # a dead service fails the test with its log tail
        return False

    [record] = watch_until_done(client, keys, [experiment_id], timeout_s=timeout_s, display=Quiet(),
                                should_stop=should_stop)
    assert record is not None and record.status == "finished", record
    return record


def trainer_versions(client: redis.Redis, keys: Keys, experiment_id: str) -> list[int]:
    """Versions of ``experiment_id`` announced by a trainer of the cluster, in
    stream order (entries that do not decode, or come from elsewhere, skipped)."""
    versions = []
    for _, fields in client.xrange(keys.stream("adapters")):
        try:
            message = decode(fields.get(b"msg"), "adapters")
        except MessageDecodeError:
            continue
        if (isinstance(message, AdapterPublished) and message.experiment_id == experiment_id
                and message.trainer.startswith("trainer-")):
            versions.append(message.version)
    return versions


def missing_heartbeats(cluster: LocalCluster, client: redis.Redis) -> list[str]:
    return [p.name for p in cluster.processes.values()
            if not client.exists(heartbeat_key(cluster.stream_prefix, p.service, p.name))]


def wait_heartbeats(cluster: LocalCluster, client: redis.Redis, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while missing := missing_heartbeats(cluster, client):
        cluster.check_alive()
        assert time.monotonic() < deadline, f"no heartbeat from {missing}"
        time.sleep(0.1)


def log_lines(cluster: LocalCluster, needle: str) -> dict[str, int]:
    """How many lines of each service's log contain ``needle``."""
    counts = {}
    for process in cluster.processes.values():
        text = Path(process.log_path).read_text(errors="replace") if Path(process.log_path).exists() else ""
        counts[process.name] = sum(1 for line in text.splitlines() if needle in line)
    return counts


def rollout_status_after(client: CloraClient, ts: float) -> dict:
    """The rollout worker's heartbeat status, from a beat taken after ``ts``."""
    deadline = time.monotonic() + 30.0
    while True:
        heartbeat = msgspec.msgpack.decode(client.redis.get(heartbeat_key(client.prefix, "rollout", "rollout-0")))
        if heartbeat["ts"] > ts:
            return heartbeat["status"]
        assert time.monotonic() < deadline, "no fresh rollout heartbeat"
        time.sleep(0.2)
