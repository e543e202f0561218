"""Issue 12: Redis restarts mid-run; the four services ride it out with no
manual step, and the experiment finishes with contiguous adapter versions.

Redis is this test's own embedded server (append-only file fsynced on every
write, so the restart loses nothing acknowledged); it is SIGKILLed while an
experiment trains and started again on the same port a few seconds later.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from services.cli.local import LocalCluster
from services.scheduler.state import Keys
from shared.config import DEFAULT_MODEL_DIR
from shared.redis_server import EmbeddedRedis
from tests.integration.cluster_procs import (
    CLUSTER_ENV,
    log_lines,
    small_spec,
    submit,
    trainer_versions,
    wait_finished,
    wait_heartbeats,
)

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

EXPERIMENT = "survivor"
STEPS = 6
OUTAGE_S = 4.0
RUN_TIMEOUT_S = 240.0
POLL_S = 0.05


def wait_version(client: redis.Redis, keys: Keys, cluster: LocalCluster, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_alive()
        versions = trainer_versions(client, keys, EXPERIMENT)
        if versions and max(versions) >= at_least:
            return max(versions)
        assert time.monotonic() < deadline, f"no version {at_least} (have {versions})"
        time.sleep(POLL_S)


def test_services_ride_out_a_redis_restart_and_the_experiment_finishes(tmp_path, capsys):
    server = EmbeddedRedis(tmp_path / "redis", persist=True, fsync_always=True)
    url = server.start()
    cluster = LocalCluster(tmp_path / "cluster", redis_url=url, env=CLUSTER_ENV)
    try:
        cluster.start()
        cluster.wait_ready()
        client = redis.Redis.from_url(url)
        keys = Keys(cluster.stream_prefix)
        submit(client, keys, small_spec(EXPERIMENT, steps=STEPS))
        version_before = wait_version(client, keys, cluster, 2, RUN_TIMEOUT_S)
        assert version_before < STEPS, "the experiment ended before the outage: nothing was tested"

        server.kill()  # SIGKILL: a crash, every connection reset
        time.sleep(OUTAGE_S)
        assert not cluster.dead(), [p.name for p in cluster.dead()]  # nobody gave up while Redis was away
        server.start()  # same port, same data directory
        back_at = time.monotonic()
        next_version = wait_version(client, keys, cluster, version_before + 1, RUN_TIMEOUT_S)
        recovery_s = time.monotonic() - back_at
        wait_heartbeats(cluster, client, timeout_s=30.0)
        heartbeats_s = time.monotonic() - back_at
        record = wait_finished(cluster, client, keys, EXPERIMENT, RUN_TIMEOUT_S)

        with capsys.disabled():
            print(f"\nredis restart: killed after version {version_before}, down {OUTAGE_S:.0f}s; "
                  f"version {next_version} {recovery_s:.1f}s after Redis was back; "
                  f"all heartbeats back within {heartbeats_s:.1f}s; "
                  f"redis_unavailable_retrying lines: {log_lines(cluster, 'redis_unavailable_retrying')}")
        assert record.status == "finished"
        assert all(p.alive() and p.starts == 1 for p in cluster.processes.values())  # no manual restart
        versions = trainer_versions(client, keys, EXPERIMENT)
        assert sorted(set(versions)) == list(range(1, STEPS + 1))
        client.close()
    finally:
        cluster.stop()
        server.stop()
