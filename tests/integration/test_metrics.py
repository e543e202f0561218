"""Prometheus metrics from every service (issue 20): a ``LocalCluster`` runs
a short experiment while the test scrapes each service's ``/metrics``
endpoint (found through the heartbeats), parses it with prometheus-client's
own parser and checks the named series, that counters grow, and that the
dead-letter counter moves when a malformed entry is written to a stream."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli.experiments import ProgressDisplay, watch_until_done
from services.cli.local import LocalCluster
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import ExperimentSpec, RewardSpec, TaskSource

MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
]

CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3"}
SERVICES = ("scheduler", "reward", "rollout-0", "trainer-0")
RUN_TIMEOUT_S = 240.0
WAIT_S = 60.0
SCRAPE_TIMEOUT_S = 5.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (series name, sorted labels) -> value

# Series each service must export once an experiment has run (beyond the generic ones).
EXPECTED = {
    "scheduler": {"clora_experiments", "clora_step_rollout_seconds_count", "clora_step_train_seconds_count",
                  "clora_steps_finished_total"},
    "reward": {"clora_scoring_seconds_count"},
    "rollout-0": {"clora_engine_rows", "clora_engine_capacity_rows", "clora_generated_tokens_total",
                  "clora_decode_steps_total", "clora_adapter_slots_in_use", "clora_adapter_slots",
                  "clora_adapter_loads_total", "clora_adapter_load_seconds_count",
                  "clora_rollout_request_seconds_count"},
    "trainer-0": {"clora_train_step_seconds_count", "clora_trainer_tenant_swaps_total", "clora_train_jobs_total"},
}
GENERIC = {"clora_messages_handled_total", "clora_message_handle_seconds_count", "clora_stream_lag",
           "clora_stream_pending"}


class _Quiet(ProgressDisplay):
    def show(self, records) -> None:
        return None


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(value for (series, series_labels), value in samples.items()
               if series == name and set(labels.items()) <= set(series_labels))


def names(samples: Samples) -> set[str]:
    return {series for series, _ in samples}


def wait_for(condition, what: str, cluster: LocalCluster, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_alive()
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def settled(scraped: dict[str, Samples]) -> bool:
    """Every named series is there, and the polled ones show the finished experiment."""
    return (all(GENERIC | EXPECTED[name] <= names(scraped[name]) for name in SERVICES)
            and total(scraped["rollout-0"], "clora_decode_steps_total") > 0
            and total(scraped["rollout-0"], "clora_stream_pending", stream="rollout_requests") == 0  # all acked
            and total(scraped["scheduler"], "clora_experiments", state="running") == 0
            and total(scraped["scheduler"], "clora_experiments", state="queued") == 0)


def short_spec(experiment_id: str) -> ExperimentSpec:
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(family="add"),
                          reward=RewardSpec(type="family", family="add"), steps=2, prompts_per_step=4,
                          group_size=4, max_tokens=6, eval_size=8, learning_rate=3e-3)


def test_every_service_exports_its_series_and_they_move(tmp_path):
    with LocalCluster(tmp_path / "cluster", env=CLUSTER_ENV) as cluster:
        cluster.wait_ready(WAIT_S)
        urls = wait_for(lambda: (found := cluster.metrics_urls()) and set(found) == set(SERVICES) and found,
                        "every service's metrics_url in its heartbeat", cluster)
        assert all(url.startswith("http://127.0.0.1:") for url in urls.values()), urls
        assert len({url for url in urls.values()}) == len(SERVICES), f"services share a port: {urls}"
        before = {name: scrape(url) for name, url in urls.items()}

        with CloraClient.connect(cluster.url, prefix=cluster.stream_prefix) as client:
            client.submit(short_spec("metrics-a"))
            records = watch_until_done(client, None, ["metrics-a"], timeout_s=RUN_TIMEOUT_S, display=_Quiet(),
                                       should_stop=lambda: bool(cluster.check_alive()))
            assert records[0] is not None and records[0].status == "finished", records

        # Gauges and followed totals are refreshed every few seconds (metrics.STREAM_POLL_INTERVAL_S).
        after = wait_for(lambda: (now := {name: scrape(url) for name, url in urls.items()}) and settled(now) and now,
                         "every named series, refreshed after the experiment", cluster, timeout_s=30.0)
        for name in SERVICES:
            grown = total(after[name], "clora_messages_handled_total")
            assert grown > total(before[name], "clora_messages_handled_total"), (name, grown)

        rollout, trainer, reward, scheduler = (after[n] for n in ("rollout-0", "trainer-0", "reward", "scheduler"))
        assert total(rollout, "clora_generated_tokens_total", experiment="metrics-a") > 0
        assert total(rollout, "clora_adapter_loads_total") >= 1  # version 1 sampled step 2
        assert 1 <= total(rollout, "clora_adapter_slots_in_use") <= total(rollout, "clora_adapter_slots")
        assert total(rollout, "clora_engine_capacity_rows") > 0
        assert total(trainer, "clora_train_step_seconds_count") == 2
        assert total(trainer, "clora_train_jobs_total", outcome="published") == 2
        assert total(trainer, "clora_trainer_tenant_swaps_total") >= 1
        assert total(reward, "clora_scoring_seconds_count", reward_type="family") > 0
        assert total(reward, "clora_scoring_failures_total") == 0
        assert total(scheduler, "clora_steps_finished_total", experiment="metrics-a") == 2
        assert total(scheduler, "clora_step_rollout_seconds_count") == 2

        # A malformed entry on the rollout's request stream: dead-lettered, and counted.
        dead_before = total(rollout, "clora_dead_letters_total", stream="rollout_requests", reason="malformed")
        redis = cluster.redis_client("admin")
        try:
            redis.xadd(f"{cluster.stream_prefix}rollout_requests", {"not-msg": b"\xff garbage"})
        finally:
            redis.close()
        wait_for(lambda: total(scrape(urls["rollout-0"]), "clora_dead_letters_total", stream="rollout_requests",
                               reason="malformed") == dead_before + 1, "the dead-letter counter to move", cluster)
