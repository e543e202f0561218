"""The trainer's state on disk and the jobs it refuses for good (issue 12,
item 8): version retention, fsync before rename, a torn checkpoint falling
back to the previous one, token ids and token budgets checked, and every
refusal a dead letter with its reason (never an ack that leaves the
experiment hanging). Same tiny random Qwen3 and helpers as test_trainer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.service import JobOutcome, PendingVersion, TrainerCore, TrainerService, load_policy_model
from services.trainer.tenants import CHECKPOINT_STATE_FILE, CHECKPOINT_WEIGHTS_FILE
from shared.adapters import CONFIG_FILE, DIGEST_FILE, WEIGHTS_FILE, DirectoryAdapterStore
from shared.bus import StreamBus
from tests.integration.test_trainer import (  # noqa: F401 (tiny_model_dir and _few_threads are fixtures)
    PROMPTS,
    SIGNATURE,
    VOCAB,
    StreamReader,
    _few_threads,
    random_groups,
    scored_group,
    service_config,
    start,
    stop,
    tiny_model_dir,
    train_job,
    wait_for_dead_letters,
)

JOBS = "train_jobs:0"


def new_core(model_dir: Path, root: Path, **options) -> TrainerCore:
    model = load_policy_model(str(model_dir), SIGNATURE, device="cpu")
    return TrainerCore(model, DirectoryAdapterStore(root / "adapters"), root / "checkpoints", SIGNATURE,
                       str(model_dir), **options)


def checkpoint_moments(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / CHECKPOINT_WEIGHTS_FILE))


def state_moments(state) -> dict[str, torch.Tensor]:
    moments = {f"exp_avg/{n}": t for n, t in state.exp_avg.items()}
    moments.update({f"exp_avg_sq/{n}": t for n, t in state.exp_avg_sq.items()})
    return moments


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- retention


async def test_retention_keeps_the_newest_versions_and_checkpointed_ones_and_resume_works(
        tiny_model_dir, tmp_path, redis_url, stream_prefix, async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    config = service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path, adapter_retain_versions=2)
    first = TrainerService(config)
    task = await start(first)
    try:
        for step in range(7):
            job = train_job("exp", step, random_groups("exp", step, step, seed=step), checkpoint_every=3)
            await bus.publish(job, JOBS)
        assert [p.version for p in await adapters.read(7)] == list(range(1, 8))
        store = first.store
        # The newest 2, plus versions 3 and 6 that the two kept checkpoints belong to.
        assert store.versions("exp") == [3, 6, 7]
        assert sorted(entry.name for entry in (store.root / "exp").iterdir()) == ["v3", "v6", "v7"]
        assert first.core.bank.checkpoint_versions("exp") == [6, 3]
    finally:
        await stop(first, task)

    second = TrainerService(config)
    task = await start(second)
    try:
        # A very late duplicate of a job whose version is pruned: acked, nothing announced, nothing dead-lettered.
        await bus.publish(train_job("exp", 0, random_groups("exp", 0, 0, seed=0), checkpoint_every=3), JOBS)
        await bus.publish(train_job("exp", 7, random_groups("exp", 7, 7, seed=7), checkpoint_every=3), JOBS)
        (published,) = await adapters.read(1)
        assert (published.version, published.stats.skipped_update) == (8, False)
        # Resumed from version 7's weights and checkpoint 6's moments: one more Adam step.
        assert second.core.bank.optimizer_tensors("exp")[1] == 7
        assert second.store.versions("exp") == [3, 6, 7, 8]
        assert second.jobs_trained == 1 and second.jobs_republished == 0
        assert await bus.dead_letters(JOBS) == []
    finally:
        await stop(second, task)


def test_off_policy_experiments_keep_the_versions_their_rollouts_may_use(tiny_model_dir, tmp_path):
    core = new_core(tiny_model_dir, tmp_path, retain_versions=1)
    for step in range(6):
        job = train_job("exp", step, random_groups("exp", step, step, seed=step), max_off_policy_steps=2,
                        checkpoint_every=100)
        assert core.handle(job).kind == "published"
    assert core.bank.checkpoint_versions("exp") == []
    assert core.store.versions("exp") == [3, 4, 5, 6]  # max_off_policy_steps + 2 newest


# ---------------------------------------------------------------- fsync before rename


def test_versions_and_checkpoints_are_fsynced_before_the_rename_that_publishes_them(
        tiny_model_dir, tmp_path, monkeypatch):
    core = new_core(tiny_model_dir, tmp_path)
    trace: list[tuple[str, ...]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        trace.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(source, target):
        trace.append(("rename", str(source), str(target)))
        return real_rename(source, target)

    def replace(source, target):
        trace.append(("rename", str(source), str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    outcome = core.handle(train_job("exp", 0, random_groups("exp", 0, 0, seed=0)))  # checkpoint_every=1
    monkeypatch.undo()
    assert outcome.kind == "published"

    def published(final: Path, files: tuple[str, ...]) -> None:
        """Every file of ``final`` and its staging directory synced before
        the rename into ``final``; the parent synced after it."""
        (index, staging) = next((i, Path(t[1])) for i, t in enumerate(trace)
                                if t[0] == "rename" and t[2] == str(final))
        synced_before = {Path(t[1]) for t in trace[:index] if t[0] == "fsync"}
        assert {staging / name for name in files} | {staging} <= synced_before, trace
        assert ("fsync", str(final.parent)) in trace[index:], trace

    version_dir = core.store.path("exp", 1)
    published(version_dir, (WEIGHTS_FILE, CONFIG_FILE))
    published(version_dir / DIGEST_FILE, ())  # the DIGEST: synced file, renamed, directory synced
    published(tmp_path / "checkpoints" / "exp" / "v1", (CHECKPOINT_WEIGHTS_FILE, CHECKPOINT_STATE_FILE))


# ---------------------------------------------------------------- torn checkpoints


async def test_a_torn_checkpoint_falls_back_to_the_previous_one_and_training_goes_on(
        tiny_model_dir, tmp_path, redis_url, stream_prefix, async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    config = service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path)
    first = TrainerService(config)
    task = await start(first)
    try:
        for step in range(2):
            await bus.publish(train_job("exp", step, random_groups("exp", step, step, seed=step)), JOBS)
        await adapters.read(2)
    finally:
        await stop(first, task)
    checkpoints = tmp_path / "checkpoints" / "exp"
    previous = checkpoint_moments(checkpoints / "v1")
    torn = checkpoints / "v2" / CHECKPOINT_WEIGHTS_FILE
    os.truncate(torn, torn.stat().st_size // 2)  # as a crash mid-write on a filesystem that reorders

    second = TrainerService(config)
    task = await start(second)
    try:
        state = await second._in_model_thread(second.core.bank.ensure, "exp")
        assert (state.version, state.adam_step) == (2, 1)  # weights of version 2, moments of checkpoint 1
        assert_same_tensors(previous, state_moments(state))
        await bus.publish(train_job("exp", 2, random_groups("exp", 2, 2, seed=2)), JOBS)
        (published,) = await adapters.read(1)
        assert (published.version, published.stats.skipped_update) == (3, False)
        assert second.core.bank.optimizer_tensors("exp")[1] == 2
        # The torn one is set aside, no longer one of the two kept.
        assert second.core.bank.checkpoint_versions("exp") == [3, 1]
        set_aside = [p.name for p in checkpoints.iterdir() if not p.name.startswith("v")]
        assert len(set_aside) == 1 and set_aside[0].startswith(".unusable-v2-")
    finally:
        await stop(second, task)


def test_with_no_usable_checkpoint_the_moments_start_fresh(tiny_model_dir, tmp_path):
    core = new_core(tiny_model_dir, tmp_path)
    for step in range(2):
        assert core.handle(train_job("exp", step, random_groups("exp", step, step, seed=step))).kind == "published"
    checkpoints = tmp_path / "checkpoints" / "exp"
    (checkpoints / "v2" / CHECKPOINT_STATE_FILE).write_text("{not json")
    with open(checkpoints / "v1" / CHECKPOINT_WEIGHTS_FILE, "r+b") as handle:  # same size, other bytes
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")

    restarted = new_core(tiny_model_dir, tmp_path)
    state = restarted.bank.ensure("exp")
    assert (state.version, state.adam_step) == (2, 0)
    assert all(not t.any() for t in state_moments(state).values())
    outcome = restarted.handle(train_job("exp", 2, random_groups("exp", 2, 2, seed=2)))
    assert outcome.kind == "published" and outcome.version == 3 and not outcome.stats.skipped_update


# ---------------------------------------------------------------- refusals for good


async def test_jobs_that_can_never_succeed_are_dead_lettered_with_their_reason(
        tiny_model_dir, tmp_path, redis_url, stream_prefix, async_redis):
    bus = StreamBus(async_redis, prefix=stream_prefix)
    adapters = StreamReader(async_redis, stream_prefix, "adapters")
    events = StreamReader(async_redis, stream_prefix, "events")
    # random_groups: 2 groups of 4 prompt + 4 x 3 completion tokens = 16 tokens a row, 32 a job.
    config = service_config(redis_url, stream_prefix, tiny_model_dir, tmp_path, max_train_tokens=40,
                            max_packed_row_tokens=16)
    out_of_vocabulary = random_groups("oov", 0, 0, seed=1)
    out_of_vocabulary[1].result.samples[2].token_ids[1] = VOCAB
    negative = random_groups("negative", 0, 0, seed=2)
    negative[0].result.prompt_token_ids[0] = -1
    misaligned = random_groups("misaligned", 0, 0, seed=3)
    misaligned[0].result.samples[0].logprobs.pop()
    wide = [scored_group("wide", 0, 0, PROMPTS[0], [[1, 2, 3]] * 5, [[-4.0] * 3] * 5, [0, 1, 0, 1, 0], 0)]
    refused = {
        "big": train_job("big", 0, random_groups("big", 0, 0, seed=5) + random_groups("big", 0, 0, seed=6)[:1]),
        "wide": train_job("wide", 0, wide),
        "oov": train_job("oov", 0, out_of_vocabulary),
        "negative": train_job("negative", 0, negative),
        "misaligned": train_job("misaligned", 0, misaligned),
        "Bad:id\n": train_job("Bad:id\n", 0, random_groups("bad", 0, 0, seed=7)),
    }
    service = TrainerService(config)
    task = await start(service)
    try:
        for job in refused.values():
            await bus.publish(job, JOBS)
        await bus.publish(train_job("good", 0, random_groups("good", 0, 0, seed=8)), JOBS)
        (published,) = await adapters.read(1)  # the service carried on
        assert (published.experiment_id, published.version) == ("good", 1)
        letters = await wait_for_dead_letters(bus, len(refused))
        codes = {e.experiment_id: (e.level, e.code, e.message) for e in await events.read(len(refused) - 1)}
    finally:
        await stop(service, task)
    assert len(letters) == len(refused)  # each on its first delivery, none retried
    assert {experiment: code for experiment, (_, code, _) in codes.items()} == {
        "big": "train_job_over_budget", "wide": "train_job_over_budget", "oov": "train_job_invalid",
        "negative": "train_job_invalid", "misaligned": "train_job_invalid"}
    assert {level for level, _, _ in codes.values()} == {"error"}
    reasons = sorted(letter.reason for letter in letters)
    expected_fragments = [
        ("48 prompt + completion tokens", "max_train_tokens 40"),
        ("packs 19 tokens", "max_packed_row_tokens 16"),
        ("token id 64 outside the model's vocabulary [0, 64)",),
        ("prompt token id -1",),
        ("2 behaviour logprobs for 3 completion tokens",),
        ("'Bad:id\\n'", "not an experiment id"),
    ]
    for fragments in expected_fragments:
        assert any(all(f in reason for f in fragments) for reason in reasons), (fragments, reasons)
    # Nothing of a refused job reached the store.
    store = DirectoryAdapterStore(tmp_path / "adapters")
    assert all(store.latest_version(experiment) == 0 for experiment in refused if experiment != "Bad:id\n")


def test_the_next_job_of_a_tenant_waits_while_its_last_version_is_written(tiny_model_dir, tmp_path):
    """The service trains in the model thread and writes in another: until
    the write is done, the tenant's next job and a duplicate of the job are
    retried later (a gap), never trained twice or refused as stale; the other
    tenants train meanwhile."""
    core = new_core(tiny_model_dir, tmp_path)
    first = train_job("exp", 0, random_groups("exp", 0, 0, seed=0))
    pending = core.train(first)
    assert isinstance(pending, PendingVersion) and not core.store.is_complete("exp", 1)
    for job in (first, train_job("exp", 1, random_groups("exp", 1, 1, seed=1))):
        waiting = core.train(job)
        assert isinstance(waiting, JobOutcome) and waiting.kind == "gap" and "being written" in waiting.reason
    other = core.train(train_job("other", 0, random_groups("other", 0, 0, seed=2)))
    assert isinstance(other, PendingVersion)
    written = core.write(pending)
    assert written.kind == "published" and written.version == 1 and core.store.is_complete("exp", 1)
    assert core.bank.checkpoint_versions("exp") == [1]  # checkpoint_every=1: the moments copied at train time
    assert core.train(first).kind == "republished"
    assert core.write(other).kind == "published"
    assert isinstance(core.train(train_job("exp", 1, random_groups("exp", 1, 1, seed=1))), PendingVersion)


def test_a_failed_write_drops_the_tenant_so_the_retry_trains_the_step_once(tiny_model_dir, tmp_path, monkeypatch):
    job = train_job("exp", 0, random_groups("exp", 0, 0, seed=0))
    reference = new_core(tiny_model_dir, tmp_path / "reference").handle(job)
    core = new_core(tiny_model_dir, tmp_path / "failing")
    real_write = core.store.write_version

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.store, "write_version", disk_full)
    pending = core.train(job)
    assert isinstance(pending, PendingVersion)
    with pytest.raises(OSError, match="No space left"):
        core.write(pending)
    core.abandon(pending)
    assert not core.bank.has("exp") and "exp" not in core.writing
    monkeypatch.setattr(core.store, "write_version", real_write)
    retried = core.handle(job)
    assert retried.kind == "published" and retried.version == 1
    assert retried.digest == reference.digest  # the same single step, not two
