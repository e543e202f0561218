"""The scheduler's state machine over the real Redis protocol.

The scheduler runs in-process against the session's real Valkey server. The
rollout, reward and trainer services are stood in for by small actors in this
file that speak the real protocol on the real streams (they consume
``rollout_requests`` / ``train_jobs:<k>`` through the bus and publish
``ScoredCompletion`` / ``AdapterPublished``), so each test controls rewards,
timing and failures exactly. The stand-in trainer writes real (tiny) adapter
versions into the adapter store, since the scheduler accepts an announcement
only when the store's files check out. The end-to-end tests with the real services live
elsewhere (they use ``services.cli.local.LocalCluster``).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import msgspec
import pytest

from services.cli import experiments as cli
from services.scheduler.service import SchedulerService
from services.scheduler.state import Keys, list_experiments, read_experiment, read_metrics
from shared.adapters import AdapterStore
from shared.bus import Entry, StreamBus
from shared.config import SchedulerConfig
from shared.engine import LoraSignature
from shared.messages import (
    SCHEMA_VERSION,
    AdapterPublished,
    Completion,
    ExperimentCancel,
    ExperimentEvent,
    ExperimentSpec,
    ExperimentSubmit,
    Prompt,
    PromptResult,
    PromptScore,
    RewardSpec,
    RolloutRequest,
    Sample,
    ScoredCompletion,
    TaskPush,
    TaskSource,
    TrainJob,
    TrainStats,
    decode,
)

WAIT_S = 30.0
STANDIN_SIGNATURE = LoraSignature(rank=8, alpha=16.0, target_modules=("q_proj",))
OWNER = "the-owner-secret-of-these-tests-0123"  # experiments that are cancelled or pushed to carry it


def make_spec(experiment_id: str, **overrides) -> ExperimentSpec:
    fields = dict(experiment_id=experiment_id, task=TaskSource(family="add"),
                  reward=RewardSpec(type="family", family="add"), steps=3, prompts_per_step=2,
                  group_size=2, eval_size=4)
    fields.update(overrides)
    return ExperimentSpec(**fields)


# ---------------------------------------------------------------- stand-in actors


@dataclass
class StandIns:
    """Stand-in rollout+reward and trainer actors on the real streams."""

    bus: StreamBus
    store: AdapterStore
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[RolloutRequest] = field(default_factory=list)
    jobs: list[TrainJob] = field(default_factory=list)
    train_delay_s: float = 0.0
    train_gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail_requests: set[str] = field(default_factory=set)
    skip_updates: bool = False  # announce versions with stats.skipped_update, as after a NaN loss
    tasks: list[asyncio.Task] = field(default_factory=list)

    def reward_of(self, request: RolloutRequest, prompt_index: int, sample_index: int) -> tuple[float, bool]:
        """Train: half the samples right. Eval: right only under a trained version."""
        if request.purpose == "eval":
            correct = request.adapter_version > 0
        else:
            correct = sample_index % 2 == 0
        return float(correct), correct

    async def on_request(self, request: RolloutRequest, entry) -> None:
        self.requests.append(request)
        samples = [Sample(token_ids=[1, 2], logprobs=[-0.1, -0.2], text="42", finish_reason="stop")
                   for _ in range(request.sampling.n)]
        results, prompt_scores = [], []
        for index, prompt in enumerate(request.prompts):  # fail_requests names groups: <request_id>:p<index>
            error = "engine exploded" if f"{request.request_id}:p{index}" in self.fail_requests else None
            results.append(PromptResult(prompt=prompt, prompt_token_ids=[5, 6], samples=[] if error else samples,
                                        error=error))
            scores = [self.reward_of(request, index, i) for i in range(0 if error else len(samples))]
            prompt_scores.append(PromptScore(rewards=[r for r, _ in scores], correct=[c for _, c in scores]))
        completion = Completion(
            request_id=request.request_id, experiment_id=request.experiment_id, step=request.step,
            purpose=request.purpose, results=results, adapter_version=request.adapter_version,
            reward=request.reward,
        )
        await self.bus.publish(ScoredCompletion(completion=completion, scores=prompt_scores))

    async def on_job(self, job: TrainJob, entry) -> None:
        await self.train_gate.wait()
        if self.train_delay_s:
            await asyncio.sleep(self.train_delay_s)
        self.jobs.append(job)
        version = job.base_version + 1
        path, digest = await asyncio.to_thread(write_version, self.store, job.experiment_id, version)
        stats = TrainStats(train_s=0.01, skipped_update=self.skip_updates,
                           skip_reason="nan_loss" if self.skip_updates else None)
        await self.bus.publish(AdapterPublished(
            experiment_id=job.experiment_id, version=version, step=job.step, path=str(path), digest=digest,
            stats=stats,
        ))

    def path_of(self, experiment_id: str, version: int) -> str:
        return str(self.store.path(experiment_id, version))

    def start(self, num_shards: int = 1) -> None:
        self.train_gate.set()
        consumers = [self.bus.consumer("rollout_requests", "standin-rollout", self.on_request,
                                       consumer_name="standin-rollout", batch_size=64)]
        consumers += [self.bus.consumer(f"train_jobs:{k}", "standin-trainer", self.on_job,
                                        consumer_name=f"standin-trainer-{k}") for k in range(num_shards)]
        self.tasks = [asyncio.create_task(c.run(self.stop, drain_timeout_s=1.0), name=f"standin:{c.key}")
                      for c in consumers]

    async def close(self) -> None:
        self.train_gate.set()
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT_S)


def write_version(store: AdapterStore, experiment_id: str, version: int, value: float | None = None):
    """A tiny but real PEFT version (``value`` fills its weights; default: the version)."""
    import torch

    fill = float(version if value is None else value)
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((8, 4), fill),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.full((4, 8), fill)}
    return store.write_version(experiment_id, version, tensors, STANDIN_SIGNATURE, "clora-tiny")


class SchedulerRunner:
    """One in-process scheduler; ``crash()`` cancels it without a drain."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.service: SchedulerService | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> SchedulerService:
        self.service = SchedulerService(self.config)
        await self.service.setup()
        self.task = asyncio.create_task(self.service.run(), name="scheduler-under-test")
        return self.service

    async def stop(self) -> None:
        if self.task is None:
            return
        self.service.stop()
        await asyncio.wait_for(self.task, WAIT_S)
        await self.service.close()
        self.task = None

    async def crash(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.service.close()
        self.task = None


@pytest.fixture
def config(redis_url, stream_prefix, tmp_path) -> SchedulerConfig:
    return SchedulerConfig(redis_url=redis_url, stream_prefix=stream_prefix, consumer_name="scheduler-test",
                           data_dir=str(tmp_path),
                           drain_timeout_s=2.0, reclaim_idle_s=1.0, heartbeat_ttl_s=3.0,
                           max_concurrent=8, lora_rank=8, lease_ttl_s=3.0)


@pytest.fixture
async def bus(async_redis, stream_prefix) -> StreamBus:
    return StreamBus(async_redis, prefix=stream_prefix)


@pytest.fixture
async def standins(bus, tmp_path):
    actors = StandIns(bus, AdapterStore((tmp_path / "adapters").resolve()))
    yield actors
    await actors.close()


@pytest.fixture
async def scheduler(config):
    runner = SchedulerRunner(config)
    yield runner
    await runner.stop()


async def wait_for(predicate, timeout_s: float = WAIT_S, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def record_of(sync_redis, stream_prefix, experiment_id):
    return read_experiment(sync_redis, Keys(stream_prefix), experiment_id)


async def wait_status(sync_redis, stream_prefix, experiment_id, statuses=("finished",)):
    def done():
        record = record_of(sync_redis, stream_prefix, experiment_id)
        return record if record is not None and record.status in statuses else None

    return await wait_for(done, what=f"{experiment_id} in {statuses}")


async def events_of(bus: StreamBus, experiment_id: str) -> list[ExperimentEvent]:
    entries = await bus.redis.xrange(bus.key("events"))
    events = [decode(fields[b"msg"], "events") for _, fields in entries]
    return [e for e in events if e.experiment_id == experiment_id]


async def published_requests(bus: StreamBus, experiment_id: str) -> list[RolloutRequest]:
    """The rollout requests the scheduler published for ``experiment_id``, read
    from the stream itself (a transaction publishes all of them or none)."""
    entries = await bus.redis.xrange(bus.key("rollout_requests"))
    requests = [decode(fields[b"msg"], "rollout_requests") for _, fields in entries]
    return [r for r in requests if r.experiment_id == experiment_id]


async def scheduler_caught_up(bus: StreamBus, stream: str) -> bool:
    """The scheduler's group has read and acked every entry of ``stream``:
    whatever those entries make the scheduler do is committed."""
    newest = await bus.redis.xrevrange(bus.key(stream), count=1)
    groups = {g["name"]: g for g in await bus.redis.xinfo_groups(bus.key(stream))}
    group = groups.get(b"scheduler") or groups.get("scheduler")
    if not newest or group is None:
        return False
    last = group["last-delivered-id"]
    return group["pending"] == 0 and (last.decode() if isinstance(last, bytes) else last) == newest[0][0].decode()


# ---------------------------------------------------------------- tests


async def test_steps_advance_on_policy_and_record_metrics(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("exp-a")))

    record = await wait_status(sync_redis, stream_prefix, "exp-a")

    assert [(j.step, j.base_version) for j in standins.jobs] == [(0, 0), (1, 1), (2, 2)]
    assert all(len(j.groups) == 2 and j.job_id == f"exp-a:s{j.step}" for j in standins.jobs)
    train = [r for r in standins.requests if r.purpose == "train"]
    assert sorted(r.request_id for r in train) == [f"exp-a:s{s}" for s in range(3)]  # one request per step
    assert all(len(r.prompts) == 2 for r in train)
    # on-policy: every step sampled by the version it trains, with that version's files
    assert all(r.adapter_version == r.step for r in train)
    assert all(r.adapter_path == (None if r.step == 0 else standins.path_of("exp-a", r.step)) for r in train)
    assert all(r.sampling.n == 2 for r in train)
    evals = [r for r in standins.requests if r.purpose == "eval"]
    assert Counter(r.adapter_version for r in evals) == {0: 1, 3: 1}  # one request each, every held-out prompt
    assert all(len(r.prompts) == 4 for r in evals)
    assert all(r.sampling.temperature == 0.0 and r.sampling.n == 1 for r in evals)
    assert (record.step, record.version, record.steps) == (3, 3, 3)
    assert (record.start_accuracy, record.final_accuracy) == (0.0, 1.0)
    assert record.final_adapter == standins.path_of("exp-a", 3)
    metrics = read_metrics(sync_redis, Keys(stream_prefix), "exp-a")
    # sampled by version s, produced version s + 1
    assert [(m.step, m.adapter_version, m.produced_version) for m in metrics] == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    assert all(m.reward_mean == 0.5 and m.accuracy == 0.5 and m.train_s == 0.01 for m in metrics)
    assert all((m.groups, m.failed_groups) == (2, 0) for m in metrics)
    # held-out numbers: the start one once measured, the final one on the last step
    assert [m.eval_accuracy for m in metrics] == [None, None, 1.0]
    assert metrics[-1].start_eval_accuracy == 0.0
    codes = [e.code for e in await events_of(bus, "exp-a")]
    assert codes[:2] == ["queued", "admitted"] and codes[-1] == "finished"


async def test_step_zero_rollouts_do_not_wait_for_the_start_eval(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.train_gate.clear()  # nothing trains: only what admission publishes is visible
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("exp-b", eval_size=3)))
    await wait_status(sync_redis, stream_prefix, "exp-b", ("running",))
    entries = await bus.redis.xrange(bus.key("rollout_requests"))
    requests = [decode(f[b"msg"], "rollout_requests") for _, f in entries]
    kinds = [(m.purpose, m.step) for m in requests]
    assert Counter(kinds) == {("train", 0): 1, ("eval", 0): 1}
    assert [len(m.prompts) for m in requests] == [2, 3]
    assert kinds[0] == ("train", 0)  # step 0 goes first, the eval alongside


async def test_admission_queues_beyond_max_concurrent(config, standins, bus, sync_redis, stream_prefix):
    config.max_concurrent = 1
    runner = SchedulerRunner(config)
    standins.start()
    standins.train_gate.clear()
    await runner.start()
    try:
        await bus.publish(ExperimentSubmit(spec=make_spec("first", steps=2)))
        await bus.publish(ExperimentSubmit(spec=make_spec("second", steps=2)))
        await wait_status(sync_redis, stream_prefix, "first", ("running",))
        await wait_for(lambda: any(r.experiment_id == "first" for r in standins.requests), what="first rollouts")
        await wait_status(sync_redis, stream_prefix, "second", ("queued",))
        # queued in one transaction with its record: had it been admitted, its requests would be out
        assert await published_requests(bus, "second") == []
        standins.train_gate.set()
        second = await wait_status(sync_redis, stream_prefix, "second")
        first = record_of(sync_redis, stream_prefix, "first")
        assert first.status == "finished"
        assert second.started_at >= first.finished_at
    finally:
        await runner.stop()


@pytest.mark.parametrize("case, expected", [
    ("missing_field", "reward: missing required field `type`"),
    ("wrong_type", "steps: expected `int`, got `str`"),
    ("unknown_reward", "unknown reward type 'telepathy'"),
    ("rank_over_deployment", "lora_rank: 64 is over the deployment's rank 8"),
    ("unknown_family", "task.family: unknown family 'poetry'"),
])
async def test_invalid_spec_is_refused_with_a_reason_status_shows(case, expected, scheduler, standins, bus,
                                                                  sync_redis, stream_prefix, redis_url, capsys):
    standins.start()
    await scheduler.start()
    experiment_id = f"bad-{case.replace('_', '-')}"
    good = msgspec.to_builtins(make_spec(experiment_id))
    if case == "missing_field":
        del good["reward"]["type"]
    elif case == "wrong_type":
        good["steps"] = "many"
    elif case == "unknown_reward":
        good["reward"]["type"] = "telepathy"
    elif case == "rank_over_deployment":
        good["lora_rank"] = 64
    elif case == "unknown_family":
        good["task"]["family"] = "poetry"
    # what any client sends: a plain msgpack map on the experiments stream
    raw = msgspec.msgpack.encode({"kind": "experiment_submit", "schema": SCHEMA_VERSION, "spec": good})
    await bus.redis.xadd(bus.key("experiments"), {"msg": raw})

    record = await wait_status(sync_redis, stream_prefix, experiment_id, ("invalid",))

    assert expected in record.error
    if case in ("rank_over_deployment", "unknown_family"):
        events = await events_of(bus, experiment_id)
        assert [(e.code, e.level) for e in events] == [("invalid_spec", "error")]
        assert expected in events[0].message
    assert cli.status(["--redis-url", redis_url, "--stream-prefix", stream_prefix]) == 0
    table = capsys.readouterr().out
    assert experiment_id in table and "invalid" in table and expected in table
    # refused in the transaction that recorded it: nothing was issued with it
    assert await published_requests(bus, experiment_id) == []


async def test_cli_refuses_bad_spec_file_and_status_lists_it(scheduler, bus, sync_redis, stream_prefix, redis_url,
                                                             tmp_path, capsys):
    await scheduler.start()
    connection = ["--redis-url", redis_url, "--stream-prefix", stream_prefix]
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment_id: [unclosed\n")
    assert cli.submit([str(broken), *connection]) == 2
    assert "does not parse" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text("experiment_id: no-reward\ntask: {family: add}\nsteps: 2\n")
    assert cli.submit([str(missing), *connection]) == 2
    assert "spec: missing required field `reward`" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(msgspec.to_builtins(make_spec("from-file", steps=1, eval_size=0))))
    assert cli.submit([str(good), *connection]) == 0
    assert "from-file" in capsys.readouterr().out.splitlines()
    await wait_status(sync_redis, stream_prefix, "from-file", ("running",))
    assert cli.status(["--json", *connection]) == 0
    out = capsys.readouterr().out  # in-process service logs share stdout: find the JSON document
    document, _ = json.JSONDecoder().raw_decode(out[out.index('{\n  "experiments"'):])
    listed = {e["experiment_id"]: e for e in document["experiments"]}
    assert listed["from-file"]["status"] == "running"
    assert "no-reward" not in listed  # refused by the CLI: nothing was sent


async def test_cancel_stops_issuing(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    standins.train_gate.clear()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("doomed", steps=5), owner_secret=OWNER))
    await wait_for(lambda: sum(r.experiment_id == "doomed" for r in standins.requests) >= 1 + 1,
                   what="step 0 rollouts and start eval")
    await bus.publish(ExperimentCancel(experiment_id="doomed", owner_secret=OWNER))
    record = await wait_status(sync_redis, stream_prefix, "doomed", ("cancelled",))
    issued_at_cancel = len(await published_requests(bus, "doomed"))
    standins.train_gate.set()  # the job already out still trains...
    await wait_for(lambda: standins.jobs, what="the job already out trained")
    await wait_for(partial(scheduler_caught_up, bus, "adapters"), what="its version handled")
    # ...but nothing more is issued for a cancelled experiment
    assert len(await published_requests(bus, "doomed")) == issued_at_cancel
    assert record.step == 0
    assert "cancelled" in [e.code for e in await events_of(bus, "doomed")]
    assert record_of(sync_redis, stream_prefix, "doomed").status == "cancelled"


async def test_fair_train_order_across_tenants(config, standins, bus, sync_redis, stream_prefix):
    config.train_queue_depth = 1
    runner = SchedulerRunner(config)
    standins.train_delay_s = 0.05
    standins.start()
    await runner.start()
    try:
        tenants = ["t-a", "t-b", "t-c"]
        for tenant in tenants:
            await bus.publish(ExperimentSubmit(spec=make_spec(tenant, steps=4, eval_size=0)))
        for tenant in tenants:
            await wait_status(sync_redis, stream_prefix, tenant)
    finally:
        await runner.stop()
    order = [j.experiment_id for j in standins.jobs]
    assert len(order) == 12
    # every round of three jobs trains each tenant once: nobody trains twice
    # while another tenant waits with a ready job
    for round_start in range(0, 12, 3):
        assert sorted(order[round_start:round_start + 3]) == tenants, order


async def test_trainer_shards_get_their_tenants_jobs(config, standins, bus, sync_redis, stream_prefix):
    config.num_trainer_shards = 2
    runner = SchedulerRunner(config)
    standins.start(num_shards=2)
    await runner.start()
    try:
        tenants = [f"shard-{i}" for i in (0, 1, 4, 5)]  # crc32 % 2: 0, 0, 1, 1
        for tenant in tenants:
            await bus.publish(ExperimentSubmit(spec=make_spec(tenant, steps=2, eval_size=0)))
        for tenant in tenants:
            await wait_status(sync_redis, stream_prefix, tenant)
    finally:
        await runner.stop()
    import zlib

    for shard in range(2):
        entries = await bus.redis.xrange(bus.key(f"train_jobs:{shard}"))
        jobs = [decode(f[b"msg"], f"train_jobs:{shard}") for _, f in entries]
        assert jobs and all(zlib.crc32(j.experiment_id.encode()) % 2 == shard for j in jobs)


async def test_failed_groups_are_counted_and_left_out(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.fail_requests = {"flaky:s0:p1"}
    standins.start()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("flaky", steps=2, eval_size=0)))
    record = await wait_status(sync_redis, stream_prefix, "flaky")
    assert [len(j.groups) for j in standins.jobs] == [1, 2]
    assert [g.result.prompt.prompt_id for g in standins.jobs[0].groups] == [
        r.prompts[0].prompt_id for r in standins.requests if r.request_id == "flaky:s0"][:1]
    assert record.errors == 1
    events = await events_of(bus, "flaky")
    assert any(e.code == "rollout_failed" and "flaky:s0:p1" in e.message for e in events)


async def test_off_policy_rollouts_run_ahead_but_versions_stay_contiguous(config, standins, bus, sync_redis,
                                                                          stream_prefix):
    runner = SchedulerRunner(config)
    standins.start()
    standins.train_gate.clear()
    await runner.start()
    try:
        await bus.publish(ExperimentSubmit(spec=make_spec("ahead", steps=4, eval_size=0, max_off_policy_steps=1)))
        # with the trainer held, steps 0 and 1 are both sampled by version 0
        await wait_for(lambda: sum(r.experiment_id == "ahead" for r in standins.requests) == 2,
                       what="two steps of rollouts")
        # no step 2 before version 1: test_scheduler_core covers the bound for every k
        issued = await published_requests(bus, "ahead")
        assert sorted((r.step, r.adapter_version) for r in issued) == [(0, 0), (1, 0)]
        standins.train_gate.set()
        await wait_status(sync_redis, stream_prefix, "ahead")
    finally:
        await runner.stop()
    assert [(j.step, j.base_version) for j in standins.jobs] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    for request in standins.requests:  # never staler than allowed
        assert request.step - 1 <= request.adapter_version <= request.step


async def test_streamed_tasks_feed_steps_as_they_arrive(scheduler, standins, bus, sync_redis, stream_prefix):
    standins.start()
    await scheduler.start()
    spec = make_spec("streamed", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"),
                     steps=2, eval_size=0)
    prompts = [Prompt(prompt_id=f"q{i}", text=f"{i}+1=", answer=str(i + 1)) for i in range(4)]
    # before the submit
    await bus.publish(TaskPush(experiment_id="streamed", prompts=prompts[:1], owner_secret=OWNER))
    await bus.publish(ExperimentSubmit(spec=spec, owner_secret=OWNER))
    await wait_for(partial(_codes_with, bus, "streamed", "waiting_for_prompts"), what="the wait announced")
    assert await published_requests(bus, "streamed") == []  # 1 prompt < prompts_per_step
    await bus.publish(TaskPush(experiment_id="streamed", prompts=prompts[1:], owner_secret=OWNER))
    await wait_status(sync_redis, stream_prefix, "streamed")
    assert [p.prompt_id for r in sorted(standins.requests, key=lambda r: r.request_id) for p in r.prompts] == \
        ["q0", "q1", "q2", "q3"]


@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_scheduler_restart_resumes_without_losing_or_repeating_steps(how, config, standins, bus, sync_redis,
                                                                           stream_prefix):
    steps = 6
    standins.train_delay_s = 0.02
    standins.start()
    first = SchedulerRunner(config)
    await first.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("phoenix", steps=steps, eval_size=2)))
    await bus.publish(ExperimentSubmit(spec=make_spec("phoenix-2", steps=steps, eval_size=0)))
    await wait_for(lambda: len(standins.jobs) >= 4, what="a few steps")
    await (first.stop() if how == "stop" else first.crash())
    await asyncio.sleep(0.3)  # results keep arriving while no scheduler runs
    config.consumer_name = "scheduler-test-2"  # a new process: new consumer name, reclaims the old one's entries
    second = SchedulerRunner(config)
    await second.start()
    try:
        for experiment_id in ("phoenix", "phoenix-2"):
            await wait_status(sync_redis, stream_prefix, experiment_id)
    finally:
        await second.stop()
    for experiment_id in ("phoenix", "phoenix-2"):
        jobs = [(j.step, j.base_version) for j in standins.jobs if j.experiment_id == experiment_id]
        assert jobs == [(s, s) for s in range(steps)], jobs
        metrics = read_metrics(sync_redis, Keys(stream_prefix), experiment_id)
        assert [m.produced_version for m in metrics] == list(range(1, steps + 1))
        assert [m.adapter_version for m in metrics] == list(range(steps))
    request_ids = Counter(r.request_id for r in standins.requests)
    assert max(request_ids.values()) == 1  # nothing published twice
    assert record_of(sync_redis, stream_prefix, "phoenix").final_accuracy == 1.0
    listed = {r.experiment_id: r.status for r in list_experiments(sync_redis, Keys(stream_prefix))}
    assert listed == {"phoenix": "finished", "phoenix-2": "finished"}


@pytest.mark.slow
async def test_local_cluster_runs_the_scheduler_process_and_restarts_it(redis_url, stream_prefix, standins, bus,
                                                                        sync_redis, tmp_path):
    from services.cli.local import LocalCluster

    standins.train_delay_s = 0.05
    standins.store = AdapterStore((tmp_path / "cluster" / "adapters").resolve())  # the scheduler process's store
    standins.start()
    cluster = LocalCluster(tmp_path / "cluster", redis_url=redis_url, stream_prefix=stream_prefix,
                           services=("scheduler",), env={"CLORA_LOG_LEVEL": "warning"})
    with cluster:
        await asyncio.to_thread(cluster.wait_ready, 60.0)
        first_pid = cluster.pids["scheduler"]
        await bus.publish(ExperimentSubmit(spec=make_spec("proc", steps=8, eval_size=2)))
        await wait_for(lambda: len(standins.jobs) >= 2, what="two steps")
        await asyncio.to_thread(cluster.kill, "scheduler")  # SIGKILL mid-run
        assert not cluster.processes["scheduler"].alive()
        await asyncio.to_thread(cluster.start_service, "scheduler")
        assert cluster.pids["scheduler"] != first_pid
        record = await wait_status(sync_redis, stream_prefix, "proc")
        assert (tmp_path / "cluster" / "redis_url").read_text().strip() == redis_url
    assert [j.base_version for j in standins.jobs] == list(range(8))
    assert max(Counter(r.request_id for r in standins.requests).values()) == 1
    assert record.final_accuracy == 1.0
    assert not (tmp_path / "cluster" / "redis_url").exists()


# ---------------------------------------------------------------- one scheduler at a time


def standing_by(service: SchedulerService) -> asyncio.Event:
    """An event set when ``service`` finds the lease held and goes on standby."""
    event = asyncio.Event()
    announce = service._on_standby

    def on_standby(holder):
        announce(holder)
        event.set()

    service._on_standby = on_standby
    return event


async def test_a_second_scheduler_stands_by_until_the_leader_stops_then_takes_over(config, standins, bus, sync_redis,
                                                                                   stream_prefix):
    from dataclasses import replace

    steps = 20
    standins.train_delay_s = 0.1  # long enough that the experiment outlives the leader
    standins.start()
    leader = SchedulerRunner(config)
    await leader.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("solo", steps=steps, eval_size=2)))
    await wait_for(lambda: len(standins.jobs) >= 2, what="two steps")

    standby = SchedulerService(replace(config, consumer_name="scheduler-standby"))
    on_standby = standing_by(standby)
    standby_setup = asyncio.create_task(standby.setup())
    await asyncio.wait_for(on_standby.wait(), WAIT_S)  # it found the lease taken
    assert not standby_setup.done() and not standby.leading and not standby.views  # waiting, not working
    assert sync_redis.get(Keys(stream_prefix).scheduler_lease) == b"scheduler-test"

    await leader.stop()  # gives the lease back
    await asyncio.wait_for(standby_setup, WAIT_S)
    assert standby.leading and "solo" in standby.views
    run = asyncio.create_task(standby.run())
    try:
        await wait_status(sync_redis, stream_prefix, "solo")
    finally:
        standby.stop()
        await asyncio.wait_for(run, WAIT_S)
        await standby.close()
    assert [j.base_version for j in standins.jobs] == list(range(steps))
    assert max(Counter(r.request_id for r in standins.requests).values()) == 1
    assert sync_redis.get(Keys(stream_prefix).scheduler_lease) is None  # given back on a clean stop


async def test_a_dead_leaders_lease_expires_and_a_leader_that_lost_it_stops(config, sync_redis, stream_prefix):
    from dataclasses import replace

    from shared.runtime import ServiceTaskDied

    dead = SchedulerService(config)
    await dead.setup()  # leads, then "dies": never runs, never renews, never gives the lease back
    assert dead.leading
    began = asyncio.get_running_loop().time()
    heir = SchedulerService(replace(config, consumer_name="scheduler-heir"))
    await asyncio.wait_for(heir.setup(), WAIT_S)
    waited = asyncio.get_running_loop().time() - began
    assert heir.leading and 0.5 * config.lease_ttl_s < waited < 3 * config.lease_ttl_s

    # The heir loses its lease (someone else holds it now): it stops with an error instead of working on.
    run = asyncio.create_task(heir.run())
    await asyncio.sleep(0.2)
    sync_redis.set(Keys(stream_prefix).scheduler_lease, "usurper")
    with pytest.raises(ServiceTaskDied, match="usurper"):
        await asyncio.wait_for(run, WAIT_S)
    await heir.close()
    assert sync_redis.get(Keys(stream_prefix).scheduler_lease) == b"usurper"  # not someone else's to give back

    # Stopped while on standby: no consumers, no background work, and the lease stays where it is.
    waiting = SchedulerService(replace(config, consumer_name="scheduler-waiting"))
    on_standby = standing_by(waiting)
    setup = asyncio.create_task(waiting.setup())
    await asyncio.wait_for(on_standby.wait(), WAIT_S)
    waiting.stop()
    await asyncio.wait_for(setup, WAIT_S)
    assert not waiting.leading and waiting.consumers() == [] and waiting.background() == []
    await asyncio.wait_for(waiting.run(), WAIT_S)
    await waiting.close()
    await dead.redis.aclose()
    assert sync_redis.get(Keys(stream_prefix).scheduler_lease) == b"usurper"


# ---------------------------------------------------------------- protocol details (stand-ins)


async def test_same_spec_sent_again_is_a_duplicate_but_a_redelivered_entry_is_not(scheduler, standins, bus,
                                                                                    sync_redis, stream_prefix):
    standins.start()
    service = await scheduler.start()
    spec = make_spec("twice", steps=1, eval_size=0)
    await bus.publish(ExperimentSubmit(spec=spec))
    await wait_status(sync_redis, stream_prefix, "twice")
    await bus.publish(ExperimentSubmit(spec=spec))  # a second submission, not a redelivery
    events = await wait_for(partial(_codes_with, bus, "twice", "duplicate_experiment"), what="duplicate event")
    assert events.count("duplicate_experiment") == 1
    # the first submission's own entry handled again (a redelivery) changes nothing
    [(first_entry, _)] = (await bus.redis.xrange(bus.key("experiments"), count=1))
    redelivery = Entry(stream="experiments", entry_id=first_entry.decode(), deliveries=2)
    await service.on_experiment_message(ExperimentSubmit(spec=spec), redelivery)
    assert (await events_of(bus, "twice"))[-1].code == "duplicate_experiment"
    assert record_of(sync_redis, stream_prefix, "twice").status == "finished"


async def _codes_with(bus, experiment_id: str, code: str) -> list[str] | None:
    codes = [e.code for e in await events_of(bus, experiment_id)]
    return codes if code in codes else None


async def test_a_streamed_step_short_of_prompts_says_so_once_per_wait(scheduler, standins, bus, sync_redis,
                                                                      stream_prefix):
    standins.start()
    await scheduler.start()
    spec = make_spec("hungry", task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"),
                     steps=2, eval_size=2)
    prompts = [Prompt(prompt_id=f"q{i}", text=f"{i}+1=", answer=str(i + 1)) for i in range(6)]
    await bus.publish(ExperimentSubmit(spec=spec, owner_secret=OWNER))
    await wait_for(partial(_codes_with, bus, "hungry", "waiting_for_prompts"), what="a wait event")
    await bus.publish(TaskPush(experiment_id="hungry", prompts=prompts[:3], owner_secret=OWNER))  # short of step 0's 4
    await bus.publish(TaskPush(experiment_id="hungry", prompts=prompts[3:5], owner_secret=OWNER))  # step 1 needs 6
    await wait_for(lambda: any(r.experiment_id == "hungry" and r.step == 0 and r.purpose == "train"
                               for r in standins.requests), what="step 0")
    await wait_for(lambda: len([e for e in standins.jobs if e.experiment_id == "hungry"]) == 1, what="step 0 trained")
    waits = await wait_for(partial(_waits, bus, "hungry", 2), what="the wait of step 1")
    assert waits == ["waiting for prompts: 0 pushed, step 0 needs 4",
                     "waiting for prompts: 5 pushed, step 1 needs 6"]
    await bus.publish(TaskPush(experiment_id="hungry", prompts=prompts[5:], owner_secret=OWNER))
    record = await wait_status(sync_redis, stream_prefix, "hungry")
    # the first two pushed are the held-out split; training consumed the rest in order, each once
    train = sorted((r.step, [p.prompt_id for p in r.prompts]) for r in standins.requests if r.purpose == "train")
    assert [p for _, ids in train for p in ids] == ["q2", "q3", "q4", "q5"]
    assert {p.prompt_id for r in standins.requests if r.purpose == "eval" for p in r.prompts} == {"q0", "q1"}
    assert (record.start_accuracy, record.final_accuracy) == (0.0, 1.0)
    assert len(await _waits(bus, "hungry", 0)) == 2  # one per wait


async def _waits(bus, experiment_id: str, at_least: int) -> list[str] | None:
    waits = [e.message.split(" (")[0] for e in await events_of(bus, experiment_id) if e.code == "waiting_for_prompts"]
    return waits if len(waits) >= at_least else None


async def test_failed_scoring_counts_groups_and_leaves_the_reward_nil(scheduler, standins, bus, sync_redis,
                                                                       stream_prefix):
    standins.fail_requests = {"no-score:s0:p0", "no-score:s0:p1", "no-score:s1:p0"}
    standins.start()
    await scheduler.start()
    await bus.publish(ExperimentSubmit(spec=make_spec("no-score", steps=2, eval_size=0)))
    record = await wait_status(sync_redis, stream_prefix, "no-score")
    metrics = read_metrics(sync_redis, Keys(stream_prefix), "no-score")
    assert [(m.groups, m.failed_groups) for m in metrics] == [(2, 2), (2, 1)]
    assert metrics[0].reward_mean is None and metrics[0].accuracy is None  # nothing scored: not 0.0
    assert metrics[1].reward_mean == 0.5
    assert record.errors == 3
