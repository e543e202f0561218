"""The scheduler against hostile and unlucky input (issue 12), over the real
Redis protocol: colliding ids, forged adapter announcements, NaN rewards,
experiments that never update, repeated task pushes, ended-state expiry,
work refused for good downstream, junk dead letters, a corrupt record.

The stand-in rollout/reward/trainer actors of ``test_scheduler`` play the
other services (the trainer writes real tiny versions into the store).
"""

from __future__ import annotations

import asyncio
import math

import msgspec
import pytest

from services.scheduler.spec import MAX_PROMPT_CHARS
from services.scheduler.state import Keys, read_metrics
from shared.bus import PermanentError
from shared.messages import (
    AdapterPublished,
    ExperimentCancel,
    ExperimentSubmit,
    Prompt,
    RewardSpec,
    TaskPush,
    TaskSource,
    TrainJob,
)
from tests.integration.test_scheduler import (  # noqa: F401 - fixtures
    OWNER,
    SchedulerRunner,
    StandIns,
    bus,
    config,
    events_of,
    make_spec,
    record_of,
    scheduler,
    standins,
    wait_for,
    wait_status,
    write_version,
)

HOSTILE_IDS = ["victim:s0", "victim:metrics", "victim:tasks", "ok\n", "../x", "Victim", ""]


async def wait_event(bus, experiment_id: str, code: str, count: int = 1):
    async def found():
        events = [e for e in await events_of(bus, experiment_id) if e.code == code]
        return events if len(events) >= count else None

    return await wait_for(found, what=f"{count} {code!r} event(s) of {experiment_id!r}")


def own_keys(sync_redis, stream_prefix: str) -> set[str]:
    return {k.decode(errors="replace") for k in sync_redis.keys(f"{stream_prefix}*")}


# ---------------------------------------------------------------- ids


async def test_colliding_ids_are_refused_without_a_key_and_the_victim_recovers(config, standins, bus, sync_redis,
                                                                               stream_prefix):
    keys = Keys(stream_prefix)
    standins.start()
    standins.train_gate.clear()  # the victim waits at step 0 with its step-0 groups stored
    first = SchedulerRunner(config)
    await first.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("victim", steps=3, eval_size=0)))
    await wait_for(lambda: sync_redis.hlen(keys.step_groups("victim", 0)) == 2, what="victim's step-0 groups")
    keys_before = own_keys(sync_redis, stream_prefix)
    victim_groups = sync_redis.hgetall(keys.step_groups("victim", 0))

    for hostile in HOSTILE_IDS:
        await bus.publish(ExperimentSubmit(spec=make_spec(hostile)))
        await bus.publish(ExperimentCancel(experiment_id=hostile))
        await bus.publish(TaskPush(experiment_id=hostile, prompts=[Prompt(prompt_id="p", text="1+1=")]))
    for hostile in HOSTILE_IDS:
        refused = await wait_event(bus, hostile, "invalid_spec")
        assert refused[0].level == "error" and "experiment_id:" in refused[0].message
        await wait_event(bus, hostile, "cancel_ignored")
        await wait_event(bus, hostile, "tasks_ignored")

    new_keys = own_keys(sync_redis, stream_prefix) - keys_before
    assert new_keys <= {keys.stream("experiments"), keys.stream("tasks"), keys.stream("events")}, new_keys
    assert sync_redis.type(keys.step_groups("victim", 0)) == b"hash"
    assert sync_redis.hgetall(keys.step_groups("victim", 0)) == victim_groups
    assert record_of(sync_redis, stream_prefix, "victim").status == "running"

    await first.stop()  # recovery reads the victim's state back: nothing in it was corrupted
    second = SchedulerRunner(config)
    await second.start()
    try:
        standins.train_gate.set()
        await wait_status(sync_redis, stream_prefix, "victim")
    finally:
        await second.stop()
    metrics = read_metrics(sync_redis, keys, "victim")
    assert [m.produced_version for m in metrics] == [1, 2, 3]


async def test_a_record_that_does_not_load_fails_alone(config, standins, bus, sync_redis, stream_prefix):
    keys = Keys(stream_prefix)
    standins.start()
    standins.train_gate.clear()
    first = SchedulerRunner(config)
    await first.start()
    for experiment_id in ("broken", "healthy"):
        await bus.publish(ExperimentSubmit(spec=make_spec(experiment_id, steps=2, eval_size=0)))
        await wait_status(sync_redis, stream_prefix, experiment_id, ("running",))
    await first.stop()
    sync_redis.hset(keys.exp("broken"), "spec", b"\xc1 not a spec")  # a record damaged while no scheduler ran
    sync_redis.sadd(keys.active, "bad:id")  # and an id that no key may be built from

    second = SchedulerRunner(config)
    await second.start()
    try:
        standins.train_gate.set()
        broken = await wait_status(sync_redis, stream_prefix, "broken", ("failed",))
        await wait_status(sync_redis, stream_prefix, "healthy")
    finally:
        await second.stop()
    assert "could not be loaded" in broken.error
    assert [(e.code, e.level) for e in await events_of(bus, "broken")][-1] == ("failed", "error")
    assert not sync_redis.sismember(keys.active, "bad:id")


# ---------------------------------------------------------------- adapters


async def test_forged_announcements_are_refused_and_the_victim_advances_on_its_own_versions(
        scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    standins.train_gate.clear()  # the victim's job for version 1 is out, not trained yet
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("victim", steps=2, eval_size=0)))
    await wait_for(lambda: sync_redis.hget(Keys(stream_prefix).exp("victim"), "train_sent") == b"1",
                   what="victim's first train job")

    other_path, other_digest = await asyncio.to_thread(write_version, standins.store, "other", 1, 7.0)
    await bus.publish(AdapterPublished(experiment_id="victim", version=1, step=0, path=str(other_path),
                                       digest=other_digest))
    traversal = f"{standins.store.root}/victim/../other/v1"
    await bus.publish(AdapterPublished(experiment_id="victim", version=1, step=0, path=traversal,
                                       digest=other_digest))
    await wait_event(bus, "victim", "adapter_rejected", count=2)
    own_path = standins.path_of("victim", 1)
    await bus.publish(AdapterPublished(experiment_id="victim", version=1, step=0, path=own_path, digest="0" * 64))
    rejections = await wait_event(bus, "victim", "adapter_rejected", count=3)
    assert all(e.level == "error" for e in rejections)
    assert "is not the adapter store's" in rejections[0].message
    assert "does not check out" in rejections[2].message  # v1 is not written yet: no DIGEST
    await asyncio.to_thread(write_version, standins.store, "victim", 1)  # now complete, but the digest is wrong
    await bus.publish(AdapterPublished(experiment_id="victim", version=1, step=0, path=own_path, digest="0" * 64))
    rejections = await wait_event(bus, "victim", "adapter_rejected", count=4)
    assert "is not its files' digest" in rejections[3].message
    assert record_of(sync_redis, stream_prefix, "victim").version == 0  # never advanced by a forgery

    standins.train_gate.set()  # the trainer's own announcements follow
    record = await wait_status(sync_redis, stream_prefix, "victim")
    assert record.final_adapter == standins.path_of("victim", 2)
    victim_requests = [r for r in standins.requests if r.experiment_id == "victim"]
    assert {r.adapter_path for r in victim_requests if r.adapter_version == 1} == {own_path}
    assert [m.produced_version for m in read_metrics(sync_redis, Keys(stream_prefix), "victim")] == [1, 2]


# ---------------------------------------------------------------- rewards and updates


class NanStandIns(StandIns):
    """Scores one chosen group with NaN / inf rewards, as a broken reward worker would."""

    nan_groups: set[str] = set()  # <request_id>:p<prompt index>

    def reward_of(self, request, prompt_index, sample_index):
        if f"{request.request_id}:p{prompt_index}" in self.nan_groups:
            return (math.nan if sample_index == 0 else math.inf), True
        return super().reward_of(request, prompt_index, sample_index)


async def test_non_finite_rewards_are_a_failed_group_never_a_reward(scheduler, bus, sync_redis, stream_prefix,
                                                                    tmp_path):
    from shared.adapters import AdapterStore

    actors = NanStandIns(bus, AdapterStore((tmp_path / "adapters").resolve()))
    actors.nan_groups = {"nan-exp:s0:p1"}
    actors.start()
    try:
        await scheduler.start()
        await bus.publish(ExperimentSubmit(spec=make_spec("nan-exp", steps=2, eval_size=0)))
        record = await wait_status(sync_redis, stream_prefix, "nan-exp")
    finally:
        await actors.close()
    failed = await wait_event(bus, "nan-exp", "reward_failed")
    assert "nan-exp:s0:p1" in failed[0].message and "not all finite" in failed[0].message
    assert [len(j.groups) for j in actors.jobs] == [1, 2]  # the NaN group never reaches the trainer
    metrics = read_metrics(sync_redis, Keys(stream_prefix), "nan-exp")
    assert [m.reward_mean for m in metrics] == [0.5, 0.5] and record.reward_mean == 0.5
    assert record.errors == 1


async def test_an_experiment_that_never_updated_its_adapter_ends_failed(scheduler, standins, bus, sync_redis,
                                                                        stream_prefix):
    standins.skip_updates = True  # every train step comes back "skipped: nan_loss"
    standins.start()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("stuck", steps=2, eval_size=4)))
    record = await wait_status(sync_redis, stream_prefix, "stuck", ("failed", "finished"))
    assert record.status == "failed"
    assert record.error == "none of 2 steps updated the adapter; last skip: nan_loss"
    ended = (await events_of(bus, "stuck"))[-1]
    assert (ended.code, ended.level) == ("failed", "error")
    assert not [r for r in standins.requests if r.purpose == "eval" and r.adapter_version > 0]


async def test_an_experiment_with_one_update_still_finishes(scheduler, standins, bus, sync_redis, stream_prefix):
    async def skip_after_the_first(job: TrainJob, entry) -> None:
        standins.skip_updates = job.step > 0
        await StandIns.on_job(standins, job, entry)

    standins.on_job = skip_after_the_first  # before start(): the consumer takes the handler then
    standins.start()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("one-update", steps=3, eval_size=0)))
    record = await wait_status(sync_redis, stream_prefix, "one-update", ("failed", "finished"))
    assert record.status == "finished" and record.skipped_updates == 2


# ---------------------------------------------------------------- pushes


async def test_repeated_task_pushes_add_each_prompt_once(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    await scheduler.start()
    spec = make_spec("pushed", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"),
                     steps=2, eval_size=0)
    prompts = [Prompt(prompt_id=f"q{i}", text=f"{i}+1=", answer=str(i + 1)) for i in range(4)]
    await bus.publish(ExperimentSubmit(spec=spec, owner_secret=OWNER))
    await wait_status(sync_redis, stream_prefix, "pushed", ("running",))
    await bus.publish(TaskPush(experiment_id="pushed", prompts=prompts[:2], owner_secret=OWNER))
    # a redelivery, or a client retry
    await bus.publish(TaskPush(experiment_id="pushed", prompts=prompts[:2], owner_secret=OWNER))
    await wait_event(bus, "pushed", "tasks_ignored")
    too_long = Prompt(prompt_id="huge", text="9" * (MAX_PROMPT_CHARS + 1), answer="1")
    await bus.publish(TaskPush(experiment_id="pushed", prompts=[prompts[2], prompts[2], too_long, prompts[3]],
                               owner_secret=OWNER))
    await wait_status(sync_redis, stream_prefix, "pushed")
    ignored = [e.message for e in await events_of(bus, "pushed") if e.code == "tasks_ignored"]
    assert ignored[0] == "2 pushed prompts ignored: their prompt_id was already given ('q0', 'q1')"
    assert "1 pushed prompts ignored: their prompt_id was already given ('q2')" in ignored
    assert any("'huge'" in line and f"over the limit of {MAX_PROMPT_CHARS}" in line for line in ignored)
    assert sorted(p.prompt_id for r in standins.requests for p in r.prompts) == ["q0", "q1", "q2", "q3"]
    assert sync_redis.llen(Keys(stream_prefix).tasks("pushed")) == 4


# ---------------------------------------------------------------- expiry


async def test_an_ended_experiments_data_expires_and_its_summary_stays(config, standins, bus, sync_redis,
                                                                       stream_prefix):
    config.ended_ttl_s = 50.0
    keys = Keys(stream_prefix)
    standins.start()
    runner = SchedulerRunner(config)
    await runner.start()
    try:
        await bus.publish(ExperimentSubmit(spec=make_spec("done", steps=2, eval_size=2)))
        await wait_status(sync_redis, stream_prefix, "done")
        standins.train_gate.clear()
        await bus.publish(ExperimentSubmit(spec=make_spec("dropped", steps=2, eval_size=0), owner_secret=OWNER))
        await wait_for(lambda: sync_redis.hlen(keys.step_groups("dropped", 0)) == 2, what="dropped's step 0")
        await bus.publish(ExperimentCancel(experiment_id="dropped", owner_secret=OWNER))
        await wait_status(sync_redis, stream_prefix, "dropped", ("cancelled",))
    finally:
        standins.train_gate.set()
        await runner.stop()
    expiring = [keys.metrics("done"), keys.eval_results("done", 0), keys.eval_results("done", 2),
                keys.step_groups("dropped", 0)]
    for key in expiring:
        assert sync_redis.exists(key), key
        assert 0 < sync_redis.ttl(key) <= 50, (key, sync_redis.ttl(key))
    for experiment_id in ("done", "dropped"):
        assert sync_redis.ttl(keys.exp(experiment_id)) == -1  # the summary has no expiry
    assert sync_redis.hget(keys.exp("done"), "spec") is not None  # kept: a resubmission is still recognised
    assert record_of(sync_redis, stream_prefix, "done").final_accuracy == 1.0


# ---------------------------------------------------------------- refused work and dead letters


async def test_a_train_job_refused_for_good_fails_its_experiment_and_junk_dead_letters_are_survived(
        config, standins, bus, sync_redis, stream_prefix):
    keys = Keys(stream_prefix)
    dead_letters = keys.stream("dead_letters")
    deep = b"\x81\xa1a" * 100_000 + b"\xc0"  # 100,000 nested maps
    junk = [
        {"unrelated": "fields"},
        {"stream": "experiments", "reason": "r", "payload": deep},
        {"stream": "experiments", "reason": "r", "payload": b"\x93\x01\x02\x03"},  # an array, not a map
        {"stream": "experiments", "reason": "r", "payload": msgspec.msgpack.encode(
            {"kind": "experiment_submit", "spec": {"experiment_id": "victim:s0", "steps": "x"}})},
        {"stream": "train_jobs:0", "reason": "r", "payload": deep},
        {"stream": b"\xff\xfe", "reason": b"\xff", "payload": b"\xff"},
        {"stream": "completions", "reason": "r", "payload": msgspec.msgpack.encode({"kind": "completion"})},
    ]
    for fields in junk:
        sync_redis.xadd(dead_letters, fields)

    async def refuse(job: TrainJob, entry) -> None:
        raise PermanentError(f"rank_mismatch: job rank {job.lora_rank} is not the trainer's rank 4")

    trainer_stop = asyncio.Event()
    trainer = bus.consumer("train_jobs:0", "trainer", refuse, consumer_name="refusing-trainer")
    trainer_task = asyncio.create_task(trainer.run(trainer_stop, drain_timeout_s=1.0), name="refusing-trainer")
    standins.start(num_shards=0)  # rollout + reward only
    runner = SchedulerRunner(config)
    await runner.start()
    try:
        await bus.publish(ExperimentSubmit(spec=make_spec("refused", steps=3, eval_size=0)))
        record = await wait_status(sync_redis, stream_prefix, "refused", ("failed",))
        invalid = await wait_event(bus, "victim:s0", "invalid_spec")
        assert runner.task is not None and not runner.task.done()  # the scheduler is still up
    finally:
        await runner.stop()
        trainer_stop.set()
        await asyncio.wait_for(trainer_task, 30)
    assert "rank_mismatch: job rank 8 is not the trainer's rank 4" in record.error
    assert record.error.startswith("the train job of step 0 was refused for good")
    ended = (await events_of(bus, "refused"))[-1]
    assert (ended.code, ended.level) == ("failed", "error") and "rank_mismatch" in ended.message
    assert invalid[0].message.startswith("experiment_id: 'victim:s0' is not a valid id; ")
    assert not sync_redis.exists(f"{stream_prefix}exp:victim:s0")
    assert sync_redis.xpending(dead_letters, "scheduler-dead-letters")["pending"] == 0  # every letter acked


async def test_a_lora_rank_over_the_deployments_is_refused_at_submission(scheduler, bus, sync_redis,
                                                                         stream_prefix):
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("big-rank", lora_rank=16)))
    record = await wait_status(sync_redis, stream_prefix, "big-rank", ("invalid",))
    assert "lora_rank: 16 is over the deployment's rank 8" in record.error


@pytest.mark.parametrize("reward, expected", [
    (RewardSpec(type="family", family="add", timeout_s=600.0), "reward.timeout_s: 600.0 is over"),
    (RewardSpec(type="regex", pattern=r"(\w+)\1"), "reward.pattern: not supported by the linear-time matcher"),
])
async def test_costly_rewards_are_refused_at_submission(reward, expected, scheduler, bus, sync_redis, stream_prefix):
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("costly", reward=reward)))
    record = await wait_status(sync_redis, stream_prefix, "costly", ("invalid",))
    assert expected in record.error
    assert [e.code for e in await events_of(bus, "costly")] == ["invalid_spec"]

