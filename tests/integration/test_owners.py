"""Experiment owners against a real scheduler on the real Valkey server: a
cancel or a push needs the experiment's owner secret (operators use the
``admin`` stream), a refusal changes nothing, and the secret is never kept
in Redis in clear. Rollout, reward and trainer are the stand-in actors of
``test_scheduler.py``."""

from __future__ import annotations

import asyncio
import os
import stat

import msgpack
import pytest

from services.scheduler.state import Keys
from shared.bus import Entry
from shared.client import CloraClient, NotOwner
from shared.messages import ExperimentCancel, ExperimentSubmit, Prompt, RewardSpec, TaskPush, TaskSource
from shared.owner_secrets import OwnerSecrets
from tests.integration.test_scheduler import (  # noqa: F401 - fixtures
    bus,
    config,
    events_of,
    make_spec,
    record_of,
    scheduler,
    standins,
    wait_for,
    wait_status,
)
from tests.integration.test_scheduler_hostile import wait_event

SECRET_A = "tenant-a-owner-secret-0123456789abcdef"
SECRET_B = "tenant-b-owner-secret-0123456789abcdef"


def prompts(*ids: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"q{i}", text=f"{i}+1=", answer=str(i + 1)) for i in ids]


def streamed_spec(experiment_id: str, **overrides):
    return make_spec(experiment_id, task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"),
                     eval_size=0, **overrides)


def everything_stored(sync_redis, pattern: str = "*") -> list[bytes]:
    """Every key name, field, member and value under ``pattern``, streams included."""
    found: list[bytes] = []
    for key in sync_redis.scan_iter(match=pattern, count=1000):
        found.append(key)
        kind = sync_redis.type(key)
        if kind == b"string":
            found.append(sync_redis.get(key))
        elif kind == b"hash":
            for name, value in sync_redis.hgetall(key).items():
                found += [name, value]
        elif kind == b"list":
            found += sync_redis.lrange(key, 0, -1)
        elif kind == b"set":
            found += list(sync_redis.smembers(key))
        elif kind == b"zset":
            found += sync_redis.zrange(key, 0, -1)
        elif kind == b"stream":
            for _entry_id, fields in sync_redis.xrange(key):
                for name, value in fields.items():
                    found += [name, value]
        else:
            raise AssertionError(f"{key!r}: a {kind!r} this scan does not read")
    return found


def assert_nowhere_in_clear(sync_redis, *secrets: str) -> int:
    stored = everything_stored(sync_redis)
    for secret in secrets:
        assert not [value for value in stored if secret.encode() in value], f"{secret!r} is stored in clear"
    return len(stored)


# ---------------------------------------------------------------- raw protocol


async def test_a_cancel_or_push_with_another_tenants_secret_is_refused_and_the_target_finishes_untouched(
        scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    standins.train_gate.clear()  # hold training: the target stays running while it is attacked
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=streamed_spec("target", steps=2, prompts_per_step=2),
                                       owner_secret=SECRET_A))
    await bus.publish(TaskPush(experiment_id="target", prompts=prompts(0, 1, 2, 3), owner_secret=SECRET_A))
    await wait_status(sync_redis, stream_prefix, "target", ("running",))

    await bus.publish(ExperimentCancel(experiment_id="target", owner_secret=SECRET_B))
    await bus.publish(ExperimentCancel(experiment_id="target"))
    await bus.publish(TaskPush(experiment_id="target", prompts=prompts(7, 8), owner_secret=SECRET_B))
    await bus.publish(TaskPush(experiment_id="target", prompts=prompts(9)))
    refusals = await wait_event(bus, "target", "not_owner", count=4)
    assert {e.level for e in refusals} == {"error"} and len({e.message for e in refusals if "cancel" in e.message}) == 1
    assert all(SECRET_A not in e.message and SECRET_B not in e.message for e in refusals)
    assert record_of(sync_redis, stream_prefix, "target").status == "running"

    standins.train_gate.set()
    record = await wait_status(sync_redis, stream_prefix, "target")
    assert record.status == "finished" and record.step == 2 and record.errors == 0
    used = sorted(p.prompt_id for r in standins.requests if r.experiment_id == "target" for p in r.prompts)
    assert used == ["q0", "q1", "q2", "q3"]  # none of the refused pushes
    assert sync_redis.llen(Keys(stream_prefix).tasks("target")) == 4
    codes = [e.code for e in await events_of(bus, "target")]
    assert "cancelled" not in codes and codes[-1] == "finished"


async def test_the_owners_secret_cancels_and_a_redelivered_cancel_changes_nothing(scheduler, standins, bus,
                                                                                  sync_redis, stream_prefix):
    standins.start()
    standins.train_gate.clear()
    service = await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("mine", steps=3, eval_size=0), owner_secret=SECRET_A))
    await wait_status(sync_redis, stream_prefix, "mine", ("running",))
    cancel = ExperimentCancel(experiment_id="mine", owner_secret=SECRET_A)
    entry_id = await bus.publish(cancel)
    await wait_status(sync_redis, stream_prefix, "mine", ("cancelled",))
    # the entry that carried the secret is gone, and nothing is left pending
    assert await bus.redis.xrange(bus.key("experiments"), min=entry_id, max=entry_id) == []
    await wait_for(lambda: sync_redis.xpending(bus.key("experiments"), "scheduler")["pending"] == 0,
                   what="the cancel acked")
    summary = sync_redis.hgetall(Keys(stream_prefix).exp("mine"))

    # delivered again (a consumer died before its ack), and sent again by a retrying client
    await service.on_experiment_message(cancel, Entry(stream="experiments", entry_id=entry_id, deliveries=2))
    await bus.publish(cancel)
    await wait_event(bus, "mine", "cancel_ignored", count=2)
    codes = [e.code for e in await events_of(bus, "mine")]
    assert codes.count("cancelled") == 1 and codes[-2:] == ["cancel_ignored", "cancel_ignored"]
    assert sync_redis.hgetall(Keys(stream_prefix).exp("mine")) == summary


async def test_operators_cancel_anything_on_the_admin_stream_and_an_ownerless_experiment_is_theirs_alone(
        scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    standins.train_gate.clear()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("owned", steps=3, eval_size=0), owner_secret=SECRET_A))
    await bus.publish(ExperimentSubmit(spec=streamed_spec("ownerless", steps=1, prompts_per_step=2)))
    await wait_status(sync_redis, stream_prefix, "ownerless", ("running",))
    queued = [e for e in await events_of(bus, "ownerless") if e.code == "queued"]
    assert "only an operator can cancel it or push to it" in queued[0].message

    await bus.publish(ExperimentCancel(experiment_id="ownerless"))
    await bus.publish(ExperimentCancel(experiment_id="ownerless", owner_secret=SECRET_B))
    await bus.publish(TaskPush(experiment_id="ownerless", prompts=prompts(0, 1)))
    await wait_event(bus, "ownerless", "not_owner", count=3)
    assert record_of(sync_redis, stream_prefix, "ownerless").status == "running"

    await bus.publish(TaskPush(experiment_id="ownerless", prompts=prompts(0, 1)), "admin")
    await wait_for(lambda: sum(len(r.prompts) for r in standins.requests if r.experiment_id == "ownerless") == 2,
                   what="the operator's prompts used")
    for experiment_id in ("owned", "ownerless"):
        await bus.publish(ExperimentCancel(experiment_id=experiment_id), "admin")
        record = await wait_status(sync_redis, stream_prefix, experiment_id, ("cancelled",))
        assert record.status == "cancelled"
    cancelled = [e for e in await events_of(bus, "owned") if e.code == "cancelled"]
    assert "by an operator" in cancelled[0].message


async def test_prompts_pushed_before_the_submission_count_only_for_the_secret_they_came_with(
        scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    await scheduler.start()
    await bus.publish(TaskPush(experiment_id="early", prompts=prompts(90, 91), owner_secret=SECRET_B))  # squatter
    await bus.publish(TaskPush(experiment_id="early", prompts=prompts(0), owner_secret=SECRET_A))
    await wait_event(bus, "early", "not_owner")
    await bus.publish(ExperimentSubmit(spec=streamed_spec("early", steps=1, prompts_per_step=2),
                                       owner_secret=SECRET_A))
    dropped = await wait_event(bus, "early", "tasks_ignored")
    assert "under another owner_secret were dropped" in dropped[0].message
    await bus.publish(TaskPush(experiment_id="early", prompts=prompts(0, 1), owner_secret=SECRET_A))
    await wait_status(sync_redis, stream_prefix, "early")
    used = sorted(p.prompt_id for r in standins.requests if r.experiment_id == "early" for p in r.prompts)
    assert used == ["q0", "q1"]
    assert not sync_redis.exists(Keys(stream_prefix).tasks_owner("early"))


async def test_the_secret_is_nowhere_in_redis_in_clear(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    await scheduler.start()
    await bus.publish(TaskPush(experiment_id="hidden", prompts=prompts(0), owner_secret=SECRET_A))  # early
    await bus.publish(ExperimentSubmit(spec=streamed_spec("hidden", steps=1, prompts_per_step=2),
                                       owner_secret=SECRET_A))
    await bus.publish(TaskPush(experiment_id="hidden", prompts=prompts(1), owner_secret=SECRET_A))
    await bus.publish(ExperimentCancel(experiment_id="hidden", owner_secret=SECRET_B))  # refused
    await bus.publish(ExperimentSubmit(spec=make_spec("refused", steps=0), owner_secret=SECRET_B))  # invalid spec
    await bus.publish(ExperimentSubmit(spec=make_spec("gone", steps=1, eval_size=0), owner_secret=SECRET_B))
    # undecodable, secret included: dead-lettered with the secret masked
    broken = {"kind": "task_push", "schema": 1, "experiment_id": "hidden", "prompts": "not a list",
              "owner_secret": SECRET_A}
    await bus.redis.xadd(bus.key("tasks"), {"msg": msgpack.packb(broken)})
    await wait_status(sync_redis, stream_prefix, "hidden")
    await wait_status(sync_redis, stream_prefix, "gone")
    await wait_status(sync_redis, stream_prefix, "refused", ("invalid",))
    await wait_event(bus, "hidden", "not_owner")
    letters = await wait_for(lambda: sync_redis.xrange(bus.key("dead_letters")), what="the dead letter")
    assert msgpack.unpackb(letters[0][1][b"payload"])["owner_secret"] == "<redacted>"
    await wait_for(lambda: all(sync_redis.xlen(bus.key(s)) == 0 for s in ("experiments", "tasks")),
                   what="every entry that carried a secret deleted")

    scanned = assert_nowhere_in_clear(sync_redis, SECRET_A, SECRET_B)
    assert scanned > 20  # the scan read the prefix's keys
    owner_hash = sync_redis.hget(Keys(stream_prefix).exp("hidden"), "owner")
    assert owner_hash.startswith(b"scrypt$")


# ---------------------------------------------------------------- CloraClient


@pytest.fixture
def owners_file(tmp_path, monkeypatch):
    path = tmp_path / "config" / "clora" / "owners.json"
    monkeypatch.setenv("CLORA_OWNERS_FILE", str(path))
    return path


async def test_the_client_keeps_the_secret_and_presents_it_and_another_user_cannot(
        scheduler, standins, bus, sync_redis, stream_prefix, owners_file, tmp_path):
    standins.start()
    standins.train_gate.clear()
    await scheduler.start()
    owner = CloraClient(sync_redis, stream_prefix)  # the default file: CLORA_OWNERS_FILE
    stranger = CloraClient(sync_redis, stream_prefix, owners=OwnerSecrets(tmp_path / "stranger.json"))
    owner.submit(make_spec("client-run", steps=3, eval_size=0))
    owner.submit(streamed_spec("client-stream", steps=1, prompts_per_step=2))
    assert stat.S_IMODE(os.stat(owners_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(owners_file.parent).st_mode) == 0o700
    secret = owner.owners.get(stream_prefix, "client-run")
    assert secret and len(secret) >= 32 and secret != owner.owners.get(stream_prefix, "client-stream")
    await wait_status(sync_redis, stream_prefix, "client-stream", ("running",))

    with pytest.raises(NotOwner, match="only the user who submitted it"):
        stranger.cancel("client-run")  # no secret kept: refused before anything is sent
    with pytest.raises(NotOwner):
        stranger.push_prompts("client-stream", prompts(0, 1))
    stranger.cancel("client-run", owner_secret=SECRET_B)  # a guess is sent, and refused by the scheduler
    await wait_event(bus, "client-run", "not_owner")
    assert record_of(sync_redis, stream_prefix, "client-run").status == "running"

    owner.push_prompts("client-stream", prompts(0, 1))
    await wait_for(lambda: sum(len(r.prompts) for r in standins.requests if r.experiment_id == "client-stream") == 2,
                   what="the owner's prompts used")
    owner.cancel("client-run")
    record = await asyncio.to_thread(owner.wait, "client-run", 30.0)
    assert record.status == "cancelled"
    assert_nowhere_in_clear(sync_redis, secret, SECRET_B)


async def test_clora_cancel_and_push_use_the_kept_secret(scheduler, standins, bus, sync_redis, stream_prefix,
                                                          redis_url, owners_file, tmp_path, monkeypatch, capsys):
    import json

    from services.cli import experiments as cli

    standins.start()
    standins.train_gate.clear()
    await scheduler.start()
    connection = ["--redis-url", redis_url, "--stream-prefix", stream_prefix]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"experiment_id": "cli-stream", "task": {"stream": True},
                                     "reward": {"type": "exact_match"}, "steps": 2, "prompts_per_step": 2,
                                     "group_size": 2, "eval_size": 0}))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"prompt_id": f"q{i}", "text": f"{i}+1=", "answer": str(i + 1)})
                                      for i in range(2)))
    assert await asyncio.to_thread(cli.submit, [str(spec_file), *connection]) == 0
    assert await asyncio.to_thread(cli.push, ["cli-stream", str(prompts_file), *connection]) == 0
    await wait_for(lambda: sum(len(r.prompts) for r in standins.requests if r.experiment_id == "cli-stream") == 2,
                   what="the pushed prompts used")

    monkeypatch.setenv("CLORA_OWNERS_FILE", str(tmp_path / "someone-else.json"))
    capsys.readouterr()
    assert await asyncio.to_thread(cli.cancel, ["cli-stream", *connection]) == 1
    assert await asyncio.to_thread(cli.push, ["cli-stream", str(prompts_file), *connection]) == 1
    assert "only the user who submitted it" in capsys.readouterr().err
    assert record_of(sync_redis, stream_prefix, "cli-stream").status == "running"

    monkeypatch.setenv("CLORA_OWNERS_FILE", str(owners_file))
    assert await asyncio.to_thread(cli.cancel, ["cli-stream", *connection]) == 0
    await wait_status(sync_redis, stream_prefix, "cli-stream", ("cancelled",))
    assert_nowhere_in_clear(sync_redis, OwnerSecrets(owners_file).get(stream_prefix, "cli-stream"))
