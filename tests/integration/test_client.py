"""``CloraClient`` / ``AsyncCloraClient`` against a real scheduler.

The scheduler runs in-process on the real Valkey server; rollout, reward and
trainer are the stand-in actors of ``test_scheduler.py`` on the real streams.
The sync client blocks on Redis, so its calls run in a thread (the scheduler
shares this test's event loop)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import pytest

from shared.adapters import AdapterStore
from shared.bus import StreamBus
from shared.client import AsyncCloraClient, CloraClient, NoDeploymentWarning, SpecRefused, UnknownExperiment
from shared.config import SchedulerConfig
from shared.deployment import deployment_from_config, read_deployment, write_deployment
from shared.messages import Prompt, StepMetrics, TaskSource
from tests.integration.test_scheduler import SchedulerRunner, StandIns, make_spec

WAIT_S = 30.0


@pytest.fixture
def config(redis_url, stream_prefix, tmp_path) -> SchedulerConfig:
    return SchedulerConfig(redis_url=redis_url, stream_prefix=stream_prefix, consumer_name="scheduler-client-test",
                           drain_timeout_s=2.0, reclaim_idle_s=1.0, heartbeat_ttl_s=3.0, lora_rank=8,
                           lease_ttl_s=3.0, data_dir=str(tmp_path / "data"))


@pytest.fixture
async def bus(async_redis, stream_prefix) -> StreamBus:
    return StreamBus(async_redis, prefix=stream_prefix)


@pytest.fixture
async def cluster(config, bus, sync_redis, stream_prefix):
    """A running scheduler (with stand-ins) that has described its deployment."""
    standins = StandIns(bus, AdapterStore(Path(config.adapter_dir).resolve()))  # the scheduler's store
    standins.start()
    runner = SchedulerRunner(config)
    await runner.start()
    if read_deployment(sync_redis, stream_prefix) is None:  # until the scheduler publishes it itself
        write_deployment(sync_redis, stream_prefix, deployment_from_config(config))
    yield standins
    await runner.stop()
    await standins.close()


@pytest.fixture
def client(sync_redis, stream_prefix):
    return CloraClient(sync_redis, stream_prefix)


async def test_submit_follow_and_wait_for_the_final_record(cluster, client):
    experiment_id = client.submit(make_spec("followed", steps=3))
    record = await asyncio.to_thread(client.wait, experiment_id, WAIT_S)
    assert record.status == "finished" and record.step == 3 and record.version == 3

    metrics = await asyncio.to_thread(lambda: list(client.follow_metrics(experiment_id, from_start=True,
                                                                         until_end=True, timeout_s=WAIT_S)))
    assert [m.step for m in metrics] == [0, 1, 2]
    assert all(isinstance(m, StepMetrics) and m.experiment_id == experiment_id for m in metrics)
    assert [m.step for m in client.metrics(experiment_id)] == [0, 1, 2]

    events = await asyncio.to_thread(lambda: list(client.follow_events(experiment_id, from_start=True,
                                                                       until_end=True, timeout_s=WAIT_S)))
    assert events[-1].code == "finished" and all(e.experiment_id == experiment_id for e in events)
    assert [r.experiment_id for r in client.experiments()] == [experiment_id]

    # Following from now an experiment that already ended returns (no timeout given: it would hang forever).
    assert await asyncio.to_thread(lambda: list(client.follow_events(experiment_id, until_end=True))) == []
    assert await asyncio.to_thread(lambda: list(client.follow_metrics(experiment_id, until_end=True))) == []


async def test_following_from_now_sees_only_new_entries(cluster, client):
    client.submit(make_spec("old-run", steps=1, eval_size=0))
    await asyncio.to_thread(client.wait, "old-run", WAIT_S)

    events = client.follow_events(timeout_s=WAIT_S, until_end=True)  # from now: old-run's events are past
    task = asyncio.create_task(asyncio.to_thread(list, events))
    await asyncio.sleep(0.5)  # the follower has taken its position (its first XREAD)
    client.submit(make_spec("new-run", steps=1, eval_size=0))
    received = await asyncio.wait_for(task, WAIT_S)
    assert {e.experiment_id for e in received} == {"new-run"}
    assert received[-1].code == "finished"


async def test_cancel_and_unknown_ids(cluster, client):
    cluster.train_gate.clear()  # hold training: the experiment stays running
    client.submit(make_spec("to-cancel", steps=5, eval_size=0))
    with pytest.raises(UnknownExperiment):
        client.cancel("nosuch")
    with pytest.raises(UnknownExperiment):
        await asyncio.to_thread(client.wait, "nosuch", WAIT_S)
    for _ in range(200):
        if client.experiment("to-cancel") is not None:
            break
        await asyncio.sleep(0.02)
    client.cancel("to-cancel")
    record = await asyncio.to_thread(client.wait, "to-cancel", WAIT_S)
    assert record.status == "cancelled"
    client.submit(make_spec("held", steps=2, eval_size=0))
    with pytest.raises(TimeoutError, match="held still"):
        await asyncio.to_thread(client.wait, "held", 0.5)


async def test_pushed_prompts_feed_a_streamed_experiment(cluster, client):
    client.submit(make_spec("streamed", steps=2, eval_size=0, prompts_per_step=2, task=TaskSource(stream=True)))
    client.push_prompts("streamed", [Prompt(prompt_id=f"p{i}", text=f"{i}+1=", answer=str(i + 1)) for i in range(2)])
    client.push_prompts("streamed", [{"prompt_id": "p2", "text": "2+1=", "answer": "3"},
                                     {"prompt_id": "p3", "text": "3+1=", "answer": "4"}])
    record = await asyncio.to_thread(client.wait, "streamed", WAIT_S)
    assert record.status == "finished" and record.step == 2
    used = sorted(p.prompt_id for r in cluster.requests if r.experiment_id == "streamed" for p in r.prompts)
    assert used == ["p0", "p1", "p2", "p3"]  # each step took the next two prompts pushed


async def test_version_path_comes_from_the_deployments_adapter_store(cluster, client, config):
    assert client.version_path("exp-a", 3) == AdapterStore(config.adapter_dir).path("exp-a", 3)
    assert client.version_path("exp-a", 3).is_absolute()


async def test_async_client_does_the_same(cluster, async_redis, stream_prefix):
    client = AsyncCloraClient(async_redis, stream_prefix)
    with pytest.raises(SpecRefused) as refused:
        await client.submit(make_spec("bad/id"))
    assert "experiment_id" in refused.value.reasons[0]
    experiment_id = await client.submit(make_spec("async-run", steps=2))
    metrics = [m async for m in client.follow_metrics(experiment_id, from_start=True, until_end=True,
                                                      timeout_s=WAIT_S)]
    assert [m.step for m in metrics] == [0, 1]
    record = await client.wait(experiment_id, WAIT_S)
    assert record.status == "finished" and record.version == 2
    events = [e async for e in client.follow_events(experiment_id, from_start=True, until_end=True, timeout_s=WAIT_S)]
    assert events[-1].code == "finished"
    assert [m.step for m in await client.metrics(experiment_id)] == [0, 1]
    assert [r.experiment_id for r in await client.experiments()] == [experiment_id]
    with pytest.raises(SpecRefused, match="already exists"):
        await client.submit(make_spec("async-run", steps=2))
    with pytest.raises(UnknownExperiment):
        await client.wait("nosuch", WAIT_S)  # no record after the grace period


def test_without_a_deployment_description_the_defaults_are_used_with_a_warning(sync_redis, stream_prefix):
    client = CloraClient(sync_redis, stream_prefix)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoDeploymentWarning)
        reasons = client.validate(make_spec("x", lora_rank=16))
    assert any(issubclass(w.category, NoDeploymentWarning) for w in caught)
    assert any("deployment's rank 8" in r for r in reasons)
    assert sync_redis.xlen(f"{stream_prefix}experiments") == 0
