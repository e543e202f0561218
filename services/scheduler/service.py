"""The scheduler: lifecycle and step loop of every experiment.

Consumes ``experiments`` (submit/cancel), ``tasks`` (streamed prompts),
``scored`` (scored rollout groups) and ``adapters`` (new versions); publishes
``rollout_requests``, ``train_jobs:<shard>``, ``events`` and ``metrics``.

Per running experiment (``v`` = newest published version, ``k`` =
``max_off_policy_steps``):

- step ``s`` is *issued* (its ``prompts_per_step`` rollout requests published
  under version ``v``) as soon as ``s <= v + k``: on-policy (k = 0) that is
  once version ``s`` exists; off-policy the rollouts of the next k steps run
  while earlier steps train;
- the train job of step ``s`` always has ``base_version = s`` (step s turns
  version s into s+1, so the tenant's versions stay one contiguous sequence);
  it is *ready* once all of step s's groups are scored **and** version ``s``
  exists, so each tenant has at most one train job out at a time, and its
  groups were sampled by versions >= s - k as ``TrainJob`` promises;
- ready jobs are released per trainer shard, at most ``train_queue_depth``
  outstanding per shard, least-recently-trained tenant first;
- ``AdapterPublished(version=s+1)`` records the step's ``StepMetrics`` and
  advances; after the last step the final eval runs, then the last step's
  metrics and ``finished``;
- a streamed step short of pushed prompts waits, announced once per wait by
  a ``waiting_for_prompts`` event.

Held-out accuracy: greedy (temperature 0, n = 1) rollouts of the held-out
prompts (``spec.held_out_size``: ``eval_size`` prompts of the family's eval
split, the same for every experiment of a family; a seeded split of inline
prompts; the first pushed prompts of a stream), under version 0 at admission
(alongside step 0, not before it) and under the final version at the end.
The last step's ``StepMetrics`` waits for the final eval and carries it; it
is published in the transaction that ends the experiment, before the terminal
event, so nothing of an experiment follows its end on ``metrics`` or
``events`` from the scheduler.

One scheduler per stream prefix: each takes a lease (``lease.Lease``)
before it recovers; another waits on standby until the lease is given back
(clean stop) or expires ``lease_ttl_s`` after its holder died, then takes
over from the state in Redis. A scheduler that loses its lease stops.

Every transition is one Redis transaction holding both the new state and the
messages it publishes (``state.StateStore``); handlers run one at a time under
one lock, so the in-memory views never disagree with what was written. After a
restart ``recover`` rebuilds the views from Redis and publishes whatever is
due and not yet published; redelivered results are ignored by request id. A
watchdog re-publishes the missing requests of a step that made no progress
for ``stall_timeout_s`` (a request lost or dead-lettered elsewhere).

Nothing in a message is trusted that can be checked: an experiment id is
validated before any key is built from it (an invalid one gets an event and
no key); an adapter announcement is accepted only when its path is the
adapter store's path of that (experiment, version) and its digest is what
the files hash to; a group whose rewards are not all finite numbers is a
failed group. Work refused for good downstream (a dead-lettered train job)
fails its experiment with the reason; an experiment none of whose steps
updated its adapter ends ``failed``, not ``finished``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgpack
import msgspec
from redis.exceptions import ResponseError

from services.scheduler import spec as spec_rules
from services.scheduler.lease import Lease
from services.scheduler.state import (
    DONE_STEP_TTL_S,
    ExperimentView,
    StateStore,
    encode_prompt,
    encode_spec,
)
from shared import messages
from shared.adapters import AdapterStore, AdapterStoreError
from shared.bus import DEAD_LETTER_STREAM, RETRYABLE_REDIS_ERRORS
from shared.deployment import (
    deployment_from_config,
    parse_allowlist,
    read_allowlist_async,
    write_deployment_async,
)
from shared.config import SchedulerConfig
from shared.messages import (
    AdapterPublished,
    Completion,
    ExperimentCancel,
    ExperimentEvent,
    ExperimentSpec,
    ExperimentSubmit,
    Prompt,
    RewardSpec,
    RolloutRequest,
    SamplingParams,
    ScoredCompletion,
    StepMetrics,
    TaskPush,
    TrainHyper,
    TrainJob,
    is_experiment_id,
)
from shared.runtime import Service

CONSUMER_GROUP = "scheduler"
DEAD_LETTER_GROUP = "scheduler-dead-letters"
EVAL_SEED = 0  # every experiment of a family is measured on the same held-out prompts
STEP_SEED_STRIDE = 100_000  # > spec.MAX_STEPS: (seed, step) -> a distinct generator seed
STALL_CHECK_INTERVAL_S = 5.0
DEAD_LETTER_BLOCK_MS = 2000
MAX_ID_CHARS = 128  # an invalid id is still named in its event, cut to this length
SCORED_READ_AHEAD = 16  # scored results read per round trip
REDIS_RETRY_DELAY_S = 0.5  # first retry of the dead-letter watcher; doubles per failure
MAX_REDIS_RETRY_DELAY_S = 10.0
EVAL_PROMPT_CACHE_SIZE = 8  # (family, eval_size) lists kept; more are generated again
MAX_LISTED_PROMPT_IDS = 5  # prompt ids named in one event


class ExperimentFailure(Exception):
    """Something about one experiment that cannot work (e.g. its family cannot
    produce enough prompts); the experiment fails, the service goes on."""


def shard_of(experiment_id: str, num_shards: int) -> int:
    return zlib.crc32(experiment_id.encode()) % num_shards


def train_request_id(experiment_id: str, step: int, index: int) -> str:
    return f"{experiment_id}:s{step}:p{index}"


def eval_request_id(experiment_id: str, version: int, index: int) -> str:
    return f"{experiment_id}:e{version}:p{index}"


def sample_successes(scored: ScoredCompletion, reward: RewardSpec) -> list[bool]:
    """Per sample: did it achieve the experiment's objective? The verifier's
    verdict (flipped for an inverted reward), else reward >= 0.5 for 0/1
    built-in rewards. [] for a failed group or a reward without a verdict."""
    if group_failed(scored) is not None:
        return []
    successes = []
    for index, reward_value in enumerate(scored.rewards):
        verdict = scored.correct[index] if index < len(scored.correct) else None
        if verdict is not None:
            successes.append(verdict != reward.invert)
        elif reward.type in ("family", "exact_match", "regex"):
            successes.append(reward_value >= 0.5)
    return successes


def group_failed(scored: ScoredCompletion) -> str | None:
    """Why a scored group must not be trained on, or None. Rewards that are
    not one finite number per sample fail the group: a NaN would poison the
    step's mean and the trainer's loss."""
    if scored.completion.error is not None:
        return f"rollout failed: {scored.completion.error}"
    if scored.reward_error is not None:
        return f"reward failed: {scored.reward_error}"
    if not all(math.isfinite(reward) for reward in scored.rewards):
        shown = ", ".join(repr(r) for r in scored.rewards[:8])
        return f"reward failed: rewards are not all finite numbers ({shown})"
    if len(scored.rewards) != len(scored.completion.samples):
        return f"reward failed: {len(scored.rewards)} rewards for {len(scored.completion.samples)} samples"
    return None


class SchedulerService(Service):
    name = "scheduler"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.limits = spec_rules.limits_from_config(config)
        self.num_shards = max(1, config.num_trainer_shards)
        self.queue_depth = max(1, config.train_queue_depth)
        self.stall_timeout_s = config.stall_timeout_s
        self.ended_ttl_s = config.ended_ttl_s
        # where versions are: announcements are checked against it, never trusted
        self.adapters = AdapterStore(Path(config.adapter_dir).resolve())
        # set in setup
        self.store: StateStore | None = None
        self.lease: Lease | None = None
        self.leading = False  # holds the lease: the one scheduler of this prefix
        # in-memory views, rebuilt by recover()
        self.views: dict[str, ExperimentView] = {}  # queued and running experiments
        self.queue: list[str] = []  # queued ids, FIFO
        self.outstanding: dict[int, set[str]] = {}  # shard -> tenants with a train job out
        self.ready: dict[int, dict[str, int]] = {}  # shard -> tenant -> ready order
        self.last_trained: dict[str, int] = {}  # tenant -> release order of its last job
        self._order = 0  # monotonic counter for ready / release order
        self._lock = asyncio.Lock()
        self._needs_recovery = False
        self._families: dict[str, Any] = {}
        # (family, size) -> held-out prompts, shared by all; least recently used dropped first
        self._eval_prompt_cache: OrderedDict[tuple[str, int], list[Prompt]] = OrderedDict()

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        """Connect, wait to be the one scheduler (standby meanwhile), then recover."""
        await super().setup()
        self.store = StateStore(self.redis, self.config.stream_prefix, self.config.stream_maxlen)
        self.lease = Lease(self.redis, self.store.keys.scheduler_lease, self.consumer_name, self.config.lease_ttl_s)
        self.leading = await self.lease.acquire(self.stopping, on_wait=self._on_standby)
        if self.leading:
            self.log.info("scheduler_leading", lease_ttl_s=self.config.lease_ttl_s)
            # clients validate specs with these same limits before sending (shared.deployment)
            await write_deployment_async(self.redis, self.config.stream_prefix, deployment_from_config(self.config))
            await self.recover()

    def _on_standby(self, holder: str | None) -> None:
        self.log.warning("scheduler_standby", leader=holder,
                         reason="another scheduler holds the lease; taking over when it stops or its lease expires")

    async def close(self) -> None:
        if self.leading:
            try:
                await self.lease.release()
            except RETRYABLE_REDIS_ERRORS as exc:
                self.log.warning("lease_not_released", error=repr(exc))  # it expires on its own
            self.leading = False
        await super().close()

    def consumers(self) -> list:
        if not self.leading:
            return []  # stopped while on standby
        # (handler, concurrency): handlers serialise on one lock anyway; more
        # than one in flight only lets the bus read results in batches.
        # Submissions stay one at a time so admission is FIFO.
        handlers = {
            "experiments": (self.on_experiment_message, 1),
            "tasks": (self.on_task_push, 1),
            "scored": (self.on_scored, SCORED_READ_AHEAD),
            "adapters": (self.on_adapter_published, 4),
        }
        return [self.consumer(stream, CONSUMER_GROUP, handler, batch_size=64, concurrency=concurrency)
                for stream, (handler, concurrency) in handlers.items()]

    def background(self) -> list[Coroutine]:
        if not self.leading:
            return []  # stopped while on standby
        return [self.lease.keep(self.stopping), self.watch_stalls(), self.watch_dead_letters()]

    # ------------------------------------------------------------ recovery

    async def recover(self) -> None:
        """Rebuild every view from Redis, then publish whatever is due."""
        async with self._lock:
            await self._recover_locked()

    async def _recover_locked(self) -> None:
        self.views.clear()
        self.queue.clear()
        self.outstanding = {shard: set() for shard in range(self.num_shards)}
        self.ready = {shard: {} for shard in range(self.num_shards)}
        for experiment_id in await self.store.active_ids():
            view = await self._load_for_recovery(experiment_id)
            if view is None or view.status != "running":
                continue
            self.views[experiment_id] = view
            if view.train_outstanding:
                self.outstanding[self._shard(experiment_id)].add(experiment_id)
        for experiment_id in await self.store.queued_ids():
            view = await self._load_for_recovery(experiment_id)
            if view is not None and view.status == "queued":
                self.views[experiment_id] = view
                self.queue.append(experiment_id)
        pipe = self.store.transaction()
        for view in self._running():
            self._reconcile(view, pipe)
        await self._admit(pipe)
        self._dispatch(pipe)
        await pipe.execute()
        self._needs_recovery = False
        self.log.info("scheduler_recovered", running=len(list(self._running())), queued=len(self.queue),
                      outstanding={s: len(t) for s, t in self.outstanding.items()})

    async def _load_for_recovery(self, experiment_id: str) -> ExperimentView | None:
        """One experiment's view, or None. A record that does not load fails
        that experiment alone: one bad record must not stop every tenant."""
        if not is_experiment_id(experiment_id):
            self.log.error("recovery_skipped_invalid_id", experiment_id=experiment_id[:MAX_ID_CHARS])
            await self._forget_membership(experiment_id)
            return None
        try:
            view = await self.store.load_view(experiment_id)
        except RETRYABLE_REDIS_ERRORS:
            raise
        except Exception as exc:
            self.log.exception("experiment_state_unloadable", experiment_id=experiment_id)
            await self._fail_unloadable(experiment_id, f"its state could not be loaded: {type(exc).__name__}: {exc}")
            return None
        if view is not None and view.spec.task.stream:
            view.set_stream_prompts(self._usable_stream_prompts(view.spec, view.stream_prompts))
        return view

    async def _forget_membership(self, experiment_id: str) -> None:
        """Drop an id from the active set and the queue (members, not keys)."""
        pipe = self.store.transaction()
        pipe.srem(self.store.keys.active, experiment_id)
        pipe.zrem(self.store.keys.queue, experiment_id)
        await pipe.execute()

    async def _fail_unloadable(self, experiment_id: str, reason: str) -> None:
        pipe = self.store.transaction()
        pipe.srem(self.store.keys.active, experiment_id)
        pipe.zrem(self.store.keys.queue, experiment_id)
        self._event(pipe, experiment_id, "error", "failed", reason)
        self.store.set_fields(pipe, experiment_id, status="failed", error=reason, finished_at=messages.now())
        try:
            await pipe.execute()
        except ResponseError as exc:  # e.g. the record is not even a hash; the rest of the transaction applied
            self.log.error("experiment_failure_not_recorded", experiment_id=experiment_id, error=repr(exc))

    async def _transition(self, work) -> None:
        """Run one handler's transition under the lock; if its transaction
        fails, the views may be ahead of Redis: rebuild them before the next."""
        async with self._lock:
            if self._needs_recovery:
                await self._recover_locked()
            pipe = self.store.transaction()
            try:
                await work(pipe)
                await self._admit(pipe)  # an experiment that ended frees a slot
                self._dispatch(pipe)
                await pipe.execute()
            except BaseException:
                self._needs_recovery = True
                raise

    # ------------------------------------------------------------ handlers

    async def on_experiment_message(self, message, entry) -> None:
        if isinstance(message, ExperimentSubmit):
            entry_id = entry.entry_id if entry is not None else None
            await self._transition(lambda pipe: self._submit(message.spec, pipe, entry_id))
        elif isinstance(message, ExperimentCancel):
            await self._transition(lambda pipe: self._cancel(message.experiment_id, pipe))

    async def on_task_push(self, message: TaskPush, entry) -> None:
        await self._transition(lambda pipe: self._push_tasks(message, pipe))

    async def on_scored(self, message: ScoredCompletion, entry) -> None:
        await self._transition(lambda pipe: self._collect(message, pipe))

    async def on_adapter_published(self, message: AdapterPublished, entry) -> None:
        view = self.views.get(message.experiment_id)  # only valid ids are ever in views
        if view is None or view.status != "running" or message.version <= view.version:
            return  # not ours, or a re-announcement: nothing to check
        # hashing the files takes a while: off the loop, and outside the lock
        adapter_path, rejection = await asyncio.to_thread(self._check_announcement, message)
        await self._transition(lambda pipe: self._advance(message, adapter_path, rejection, pipe))

    def _check_announcement(self, published: AdapterPublished) -> tuple[str | None, str | None]:
        """``(the store's path, None)`` when the announced version is the
        store's own and its files hash to the announced digest, else
        ``(None, why)``. The path is derived, never taken from the message."""
        try:
            store_path = self.adapters.path(published.experiment_id, published.version)
            if os.path.realpath(published.path) != os.path.realpath(store_path):
                return None, f"path {published.path[:200]!r} is not the adapter store's {str(store_path)!r}"
            digest = self.adapters.verify(store_path)
        except (AdapterStoreError, OSError, ValueError) as exc:  # ValueError: e.g. a NUL in the path
            return None, f"version {published.version} does not check out in the adapter store: {exc}"
        if published.digest != digest:
            return None, f"digest {published.digest[:64]!r} is not its files' digest {digest[:12]}..."
        return str(store_path), None

    # ------------------------------------------------------------ submit / cancel

    async def _reward_allowlist(self) -> list[str]:
        """The reward service's URL prefixes: configured, plus the operator's."""
        added = await read_allowlist_async(self.redis, self.config.stream_prefix)
        return [*parse_allowlist(self.config.http_allowlist), *added]

    async def _submit(self, spec: ExperimentSpec, pipe, entry_id: str | None = None) -> None:
        """``entry_id``: the submission's stream entry; the same entry again
        is a redelivery (nothing happens), another one with a known id is a
        duplicate, even with the very same spec."""
        experiment_id = spec.experiment_id
        if not is_experiment_id(experiment_id):
            reasons = spec_rules.validate_spec(spec, self.limits)
            self._refuse_unkeyed(pipe, experiment_id, "error", "invalid_spec", "; ".join(reasons))
            return
        status = await self.store.status(experiment_id)
        if status is not None:
            if await self._is_redelivery(experiment_id, spec, entry_id):
                return
            if status != "invalid":
                self._event(pipe, experiment_id, "error", "duplicate_experiment",
                            f"experiment {experiment_id!r} already exists ({status}); the new submission is ignored")
                return
            pipe.delete(self.store.keys.exp(experiment_id))  # a corrected spec replaces a refused one
        reasons = spec_rules.validate_spec(spec, self.limits, allowlist=await self._reward_allowlist())
        if reasons:
            self._record_invalid(pipe, experiment_id, "; ".join(reasons), spec)
            self.store.set_fields(pipe, experiment_id, submit_entry=entry_id)
            return
        submitted_at = messages.now()
        self.store.set_fields(pipe, experiment_id, status="queued", spec=encode_spec(spec), steps=spec.steps,
                              step=0, version=0, submitted_at=submitted_at,
                              family=spec_rules.eval_family(spec), submit_entry=entry_id)
        pipe.zadd(self.store.keys.index, {experiment_id: submitted_at})
        pipe.zadd(self.store.keys.queue, {experiment_id: submitted_at})
        view = ExperimentView(spec=spec, status="queued", submitted_at=submitted_at)
        if spec.task.stream:
            pipe.persist(self.store.keys.tasks(experiment_id))  # pushed early: they now belong to an experiment
            await self._load_stream_prompts(view)
        self.views[experiment_id] = view
        self.queue.append(experiment_id)
        self._event(pipe, experiment_id, "info", "queued", f"{spec.steps} steps queued")
        await self._admit(pipe)

    async def _is_redelivery(self, experiment_id: str, spec: ExperimentSpec, entry_id: str | None) -> bool:
        stored_entry = await self.store.submit_entry(experiment_id)
        if stored_entry is not None and entry_id is not None:
            return stored_entry == entry_id
        # a record written before entries were kept, or no entry: only the spec can tell
        return await self.store.stored_spec(experiment_id) == encode_spec(spec)

    def _record_invalid(self, pipe, experiment_id: str, reason: str, spec: ExperimentSpec | None) -> None:
        now = messages.now()
        self.store.set_fields(pipe, experiment_id, status="invalid", error=reason, submitted_at=now,
                              finished_at=now, steps=spec.steps if spec else None,
                              spec=encode_spec(spec) if spec else None)
        pipe.zadd(self.store.keys.index, {experiment_id: now})
        self.store.expire_ended(pipe, experiment_id, self.ended_ttl_s, range(0), set())
        self._event(pipe, experiment_id, "error", "invalid_spec", reason)
        self.log.info("experiment_invalid", experiment_id=experiment_id, reason=reason)

    def _refuse_unkeyed(self, pipe, experiment_id: str, level: str, code: str, reason: str) -> None:
        """Refuse a message whose experiment id is not valid: an event names it,
        and no key is built from it (so it can never touch another tenant's)."""
        shown = experiment_id[:MAX_ID_CHARS]
        self._event(pipe, shown, level, code, reason)
        self.log.warning("invalid_experiment_id_refused", experiment_id=shown, code=code, reason=reason)

    async def _cancel(self, experiment_id: str, pipe) -> None:
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(pipe, experiment_id, "warning", "cancel_ignored",
                                 f"experiment id {experiment_id[:MAX_ID_CHARS]!r} is not valid: no such experiment")
            return
        view = self.views.get(experiment_id)
        if view is None:
            status = await self.store.status(experiment_id)
            message = f"experiment is already {status}" if status else "unknown experiment"
            self._event(pipe, experiment_id, "warning", "cancel_ignored", message)
            return
        self._end(view, pipe, "cancelled", message=f"cancelled at step {view.version}")

    def _end(self, view: ExperimentView, pipe, status: str, *, message: str,
             level: str = "info", **fields: Any) -> None:
        """Move an experiment to a terminal status, announced by an event whose
        code is that status (``TERMINAL_STATUSES``); its last version stays."""
        experiment_id = view.experiment_id
        if view.pending_metrics is not None:  # the last step's metrics go out before the end, never after
            self._publish_metrics(view, view.pending_metrics, pipe)
            view.pending_metrics = None
        self.store.set_fields(pipe, experiment_id, status=status, finished_at=messages.now(),
                              final_adapter=view.adapter_path, final_metrics=None, **fields)
        # the summary hash stays; step data, evals, tasks and metrics expire
        self.store.expire_ended(pipe, experiment_id, self.ended_ttl_s, range(view.version, view.issued),
                                view.evals_issued)
        pipe.srem(self.store.keys.active, experiment_id)
        pipe.zrem(self.store.keys.queue, experiment_id)
        self._event(pipe, experiment_id, level, status, message)
        view.status = status
        self.views.pop(experiment_id, None)
        if experiment_id in self.queue:
            self.queue.remove(experiment_id)
        shard = self._shard(experiment_id)
        self.outstanding[shard].discard(experiment_id)
        self.ready[shard].pop(experiment_id, None)
        self.last_trained.pop(experiment_id, None)
        self.log.info("experiment_ended", experiment_id=experiment_id, status=status, reason=message)

    # ------------------------------------------------------------ admission

    def _running(self):
        return (v for v in list(self.views.values()) if v.status == "running")

    async def _admit(self, pipe) -> None:
        """Start queued experiments, oldest first, while fewer than
        ``max_concurrent`` run."""
        running = sum(1 for _ in self._running())
        while self.queue and running < self.config.max_concurrent:
            view = self.views[self.queue.pop(0)]
            await self._start(view, pipe)
            running += 1

    async def _start(self, view: ExperimentView, pipe) -> None:
        experiment_id = view.experiment_id
        if view.spec.task.stream:  # prompts pushed while queued
            await self._load_stream_prompts(view)
        view.status = "running"
        self.store.set_fields(pipe, experiment_id, status="running", started_at=messages.now(),
                              version=0, step=0, issued=0, train_sent=0)
        pipe.zrem(self.store.keys.queue, experiment_id)
        pipe.sadd(self.store.keys.active, experiment_id)
        self._event(pipe, experiment_id, "info", "admitted", "running")
        self._reconcile(view, pipe)

    # ------------------------------------------------------------ the step machine

    def _reconcile(self, view: ExperimentView, pipe) -> None:
        """Publish whatever is due for ``view`` now; idempotent (only what the
        state says is not yet published). A broken experiment fails alone."""
        try:
            self._issue_due_steps(view, pipe)
            self._issue_due_evals(view, pipe)
            self._mark_ready(view, pipe)
            self._finish_if_done(view, pipe)
        except ExperimentFailure as exc:
            self._end(view, pipe, "failed", message=str(exc), level="error", error=str(exc))

    def _issue_due_steps(self, view: ExperimentView, pipe) -> None:
        spec = view.spec
        while view.issued < spec.steps and view.issued <= view.version + spec.max_off_policy_steps:
            step = view.issued
            if not self._prompts_available(view, step):
                self._announce_prompt_wait(view, step, pipe)
                return
            now = messages.now()
            for index, prompt in enumerate(self._train_prompts(view, step)):
                self.store.publish(pipe, self._rollout_request(view, step, index, prompt, now))
            view.issued = step + 1
            view.issued_at[step] = now
            view.groups.setdefault(step, {})
            view.last_progress = time.monotonic()
            self.store.set_fields(pipe, view.experiment_id, issued=view.issued, **{f"t{step}": now})

    def _announce_prompt_wait(self, view: ExperimentView, step: int, pipe) -> None:
        """Say once per wait that a streamed experiment is short of prompts."""
        if view.prompt_wait_step == step:
            return
        view.prompt_wait_step = step
        held_out = spec_rules.held_out_size(view.spec)
        needed = held_out + (step + 1) * view.spec.prompts_per_step
        split = (f"the first {held_out} held out for evaluation, then {view.spec.prompts_per_step} per step"
                 if held_out else f"{view.spec.prompts_per_step} per step")
        self._event(pipe, view.experiment_id, "warning", "waiting_for_prompts",
                    f"waiting for prompts: {len(view.stream_prompts)} pushed, step {step} needs {needed} "
                    f"({split}); push more with task_push")

    def _issue_due_evals(self, view: ExperimentView, pipe) -> None:
        size = spec_rules.held_out_size(view.spec)
        if size == 0 or (view.spec.task.stream and len(view.stream_prompts) < size):
            return
        # an adapter that was never updated is the base model: no final eval to run
        final_due = view.version >= view.spec.steps and not view.never_updated
        due = [0, view.spec.steps] if final_due else [0]
        for version in due:
            if version in view.evals_issued:
                continue
            for index, prompt in enumerate(self._eval_prompts(view)):
                self.store.publish(pipe, self._eval_request(view, version, index, prompt))
            view.evals_issued.add(version)
            view.evals.setdefault(version, {})
            self.store.set_fields(pipe, view.experiment_id, **{f"ev{version}": 1})

    def _mark_ready(self, view: ExperimentView, pipe) -> None:
        """Step ``train_sent`` may train once its groups are in and version
        ``train_sent`` exists (one job per tenant at a time, in order)."""
        step = view.train_sent
        if step != view.version or step >= view.issued:
            return
        if len(view.groups.get(step, {})) < view.spec.prompts_per_step:
            return
        if step not in view.completed_at:
            view.completed_at[step] = messages.now()
            self.store.set_fields(pipe, view.experiment_id, **{f"c{step}": view.completed_at[step]})
        ready = self.ready[self._shard(view.experiment_id)]
        if view.experiment_id not in ready:
            self._order += 1
            ready[view.experiment_id] = self._order

    def _finish_if_done(self, view: ExperimentView, pipe) -> None:
        """After the last step: once the final held-out eval is in, publish
        the last step's metrics with it, then ``finished`` (``_end``)."""
        spec = view.spec
        if view.version < spec.steps:
            return
        if view.never_updated:
            reason = (f"none of {spec.steps} steps updated the adapter; "
                      f"last skip: {view.last_skip or 'no reason given'}")
            self._end(view, pipe, "failed", message=reason, level="error", error=reason)
            return
        accuracies = {}
        size = spec_rules.held_out_size(spec)
        if size > 0:
            for version in (0, spec.steps):
                results = view.evals.get(version, {})
                if len(results) < size:
                    return  # an eval is still running
                accuracies[version] = sum(results.values()) / len(results)
        final = accuracies.get(spec.steps)
        start = accuracies.get(0)
        summary = f"finished {spec.steps} steps"
        if final is not None:
            summary += f"; held-out accuracy ({size} prompts) {start:.3f} -> {final:.3f}"
        if view.pending_metrics is not None:
            view.pending_metrics = msgspec.structs.replace(view.pending_metrics, eval_accuracy=final,
                                                           start_eval_accuracy=start)
        self._end(view, pipe, "finished", message=summary,
                  start_accuracy=start, final_accuracy=final)

    def _dispatch(self, pipe) -> None:
        """Release ready train jobs: per shard at most ``train_queue_depth``
        outstanding, the least recently trained tenant first."""
        for shard, ready in self.ready.items():
            outstanding = self.outstanding[shard]
            while ready and len(outstanding) < self.queue_depth:
                experiment_id = min(ready, key=lambda t: (self.last_trained.get(t, 0), ready[t]))
                del ready[experiment_id]
                view = self.views.get(experiment_id)
                if view is None or view.status != "running" or view.train_sent != view.version:
                    continue
                self.store.publish(pipe, self._train_job(view), f"train_jobs:{shard}")
                view.train_sent = view.version + 1
                self.store.set_fields(pipe, experiment_id, train_sent=view.train_sent)
                outstanding.add(experiment_id)
                self._order += 1
                self.last_trained[experiment_id] = self._order

    # ------------------------------------------------------------ results

    async def _collect(self, scored: ScoredCompletion, pipe) -> None:
        completion = scored.completion
        view = self.views.get(completion.experiment_id)
        if view is None or view.status != "running":
            return  # finished, cancelled or unknown: nothing waits for it
        if completion.purpose == "eval":
            self._collect_eval(view, scored, pipe)
        else:
            self._collect_train(view, scored, pipe)
        self._reconcile(view, pipe)

    def _collect_train(self, view: ExperimentView, scored: ScoredCompletion, pipe) -> None:
        completion = scored.completion
        step = completion.step
        expected = {train_request_id(view.experiment_id, step, i) for i in range(view.spec.prompts_per_step)}
        groups = view.groups.get(step)
        if groups is None or step < view.train_sent or completion.request_id not in expected:
            return  # an old step's redelivery, or not ours
        if completion.request_id in groups:
            return  # duplicate
        groups[completion.request_id] = scored
        view.last_progress = time.monotonic()
        if step == 0 and len(groups) == 1:
            self.store.set_fields(pipe, view.experiment_id, first_scored_at=messages.now())
        pipe.hset(self.store.keys.step_groups(view.experiment_id, step), completion.request_id,
                  messages.encode(scored))
        failure = group_failed(scored)
        if failure is not None:
            self._count_failure(view, pipe, completion, failure)

    def _count_failure(self, view: ExperimentView, pipe, completion: Completion, failure: str) -> None:
        view.errors += 1
        pipe.hincrby(self.store.keys.exp(view.experiment_id), "errors", 1)
        code = "rollout_failed" if completion.error is not None else "reward_failed"
        self._event(pipe, view.experiment_id, "warning", code,
                    f"{completion.request_id}: {failure}; the group is left out of step {completion.step}")

    def _collect_eval(self, view: ExperimentView, scored: ScoredCompletion, pipe) -> None:
        completion = scored.completion
        version = completion.step
        results = view.evals.get(version)
        expected = {eval_request_id(view.experiment_id, version, i)
                    for i in range(spec_rules.held_out_size(view.spec))}
        if results is None or completion.request_id not in expected or completion.request_id in results:
            return
        correct = any(sample_successes(scored, view.spec.reward)[:1])
        results[completion.request_id] = correct
        view.last_progress = time.monotonic()
        pipe.hset(self.store.keys.eval_results(view.experiment_id, version), completion.request_id,
                  b"1" if correct else b"0")
        if version == 0 and len(results) == spec_rules.held_out_size(view.spec):
            view.start_accuracy = sum(results.values()) / len(results)
            self.store.set_fields(pipe, view.experiment_id, start_accuracy=view.start_accuracy)

    async def _advance(self, published: AdapterPublished, adapter_path: str | None, rejection: str | None,
                       pipe) -> None:
        """Record version ``version`` of a tenant (announced, and checked
        against the store: ``adapter_path`` its store path, or ``rejection``
        why the announcement is refused) and move the tenant on."""
        view = self.views.get(published.experiment_id)
        if view is None or view.status != "running":
            return
        if published.version <= view.version:
            return  # re-announcement of a version we already have
        if published.version != view.version + 1 or view.train_sent != published.version:
            self.log.warning("unexpected_adapter_version", experiment_id=view.experiment_id,
                             version=published.version, current=view.version, train_sent=view.train_sent)
            return
        if rejection is not None or adapter_path is None:
            self._event(pipe, view.experiment_id, "error", "adapter_rejected",
                        f"announcement of version {published.version} refused: {rejection}; "
                        "still waiting for the trainer's own version")
            self.log.warning("adapter_rejected", experiment_id=view.experiment_id, version=published.version,
                             reason=rejection, trainer=published.trainer[:MAX_ID_CHARS])
            return
        step = published.version - 1
        metrics = self._step_metrics(view, step, published)
        if published.version < view.spec.steps:
            self._publish_metrics(view, metrics, pipe)
        else:  # the last step's: held until the final eval is in (_finish_if_done), so it carries it
            view.pending_metrics = metrics
            self.store.set_fields(pipe, view.experiment_id, final_metrics=messages.encode(metrics))
        pipe.expire(self.store.keys.step_groups(view.experiment_id, step), DONE_STEP_TTL_S)
        pipe.hdel(self.store.keys.exp(view.experiment_id), f"t{step}", f"c{step}")
        view.version = published.version
        view.adapter_path = adapter_path
        if published.stats.skipped_update:
            view.skipped_updates += 1
            view.last_skip = (published.stats.skip_reason or "no reason given")[:200]
            self.store.set_fields(pipe, view.experiment_id, skipped_updates=view.skipped_updates,
                                  last_skip=view.last_skip)
        view.groups.pop(step, None)
        view.issued_at.pop(step, None)
        view.completed_at.pop(step, None)
        view.last_progress = time.monotonic()
        self.outstanding[self._shard(view.experiment_id)].discard(view.experiment_id)
        self.store.set_fields(pipe, view.experiment_id, version=view.version, step=view.version,
                              adapter_path=view.adapter_path, reward_mean=metrics.reward_mean,
                              accuracy=metrics.accuracy)
        self._reconcile(view, pipe)

    def _publish_metrics(self, view: ExperimentView, metrics: StepMetrics, pipe) -> None:
        self.store.publish(pipe, metrics)
        pipe.rpush(self.store.keys.metrics(view.experiment_id), messages.encode(metrics))

    def _step_metrics(self, view: ExperimentView, step: int, published: AdapterPublished) -> StepMetrics:
        all_groups = list(view.groups.get(step, {}).values())
        groups = [g for g in all_groups if group_failed(g) is None]
        rewards = [r for g in groups for r in g.rewards]
        successes = [s for g in groups for s in sample_successes(g, view.spec.reward)]
        issued_at = view.issued_at.get(step)
        completed_at = view.completed_at.get(step)
        rollout_s = completed_at - issued_at if issued_at is not None and completed_at is not None else 0.0
        # on-policy every group was sampled by version `step`; off-policy, the oldest that sampled one
        sampled_by = min((g.completion.adapter_version for g in all_groups), default=step)
        return StepMetrics(
            experiment_id=view.experiment_id, step=step, adapter_version=sampled_by,
            produced_version=published.version, groups=len(all_groups),
            failed_groups=len(all_groups) - len(groups),
            reward_mean=sum(rewards) / len(rewards) if rewards else None,
            accuracy=sum(successes) / len(successes) if successes else None,
            start_eval_accuracy=view.start_accuracy,
            rollout_s=max(0.0, rollout_s), train_s=published.stats.train_s, ts=messages.now(),
        )

    async def _push_tasks(self, push: TaskPush, pipe) -> None:
        experiment_id = push.experiment_id
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(pipe, experiment_id, "warning", "tasks_ignored",
                                 f"experiment id {experiment_id[:MAX_ID_CHARS]!r} is not valid; "
                                 f"{len(push.prompts)} pushed prompts ignored")
            return
        view = self.views.get(experiment_id)
        if view is None:
            status = await self.store.status(experiment_id)
            if status is not None:
                self._event(pipe, experiment_id, "warning", "tasks_ignored",
                            f"experiment is {status}; {len(push.prompts)} pushed prompts ignored")
                return
            # pushed before the experiment: kept for it (checked again against its spec when it comes)
            known = {p.prompt_id for p in await self.store.load_stream_prompts(experiment_id)}
        elif not view.spec.task.stream:
            self._event(pipe, experiment_id, "warning", "tasks_ignored",
                        "the experiment's task source is not 'stream'; pushed prompts ignored")
            return
        else:
            known = view.stream_prompt_ids
        prompts, refusals = self._screen_prompts(view.spec if view else None, push.prompts, known)
        for refusal in refusals:
            self._event(pipe, experiment_id, "warning", "tasks_ignored", refusal)
        if prompts:
            tasks_key = self.store.keys.tasks(experiment_id)
            pipe.rpush(tasks_key, *[encode_prompt(p) for p in prompts])
            if view is None:  # nobody may ever submit it: do not keep them forever
                pipe.expire(tasks_key, max(1, int(self.ended_ttl_s)))
        if view is not None:
            view.stream_prompts.extend(prompts)
            view.stream_prompt_ids.update(p.prompt_id for p in prompts)
            if view.status == "running":
                self._reconcile(view, pipe)

    def _screen_prompts(self, spec: ExperimentSpec | None, prompts: list[Prompt],
                        known_ids: set[str]) -> tuple[list[Prompt], list[str]]:
        """The prompts that may feed ``spec``'s steps (``None``: spec not known
        yet) in order, and one readable line per kind of prompt left out:
        a ``prompt_id`` already given (a repeated push changes nothing), a
        text that is empty, too long or over the train budget, a missing
        answer that the reward needs."""
        accepted: list[Prompt] = []
        left_out: dict[str, list[str]] = {}
        seen = set(known_ids)
        for prompt in prompts:
            problem = self._prompt_problem(spec, prompt, seen)
            if problem is not None:
                left_out.setdefault(problem, []).append(prompt.prompt_id)
                continue
            seen.add(prompt.prompt_id)
            accepted.append(prompt)
        return accepted, [_ignored_line(problem, ids) for problem, ids in left_out.items()]

    def _prompt_problem(self, spec: ExperimentSpec | None, prompt: Prompt, seen: set[str]) -> str | None:
        if prompt.prompt_id in seen:
            return "their prompt_id was already given"
        if spec is None:
            problem = spec_rules.prompt_problem(prompt, self.limits)
        else:
            problem = spec_rules.pushed_prompt_problem(prompt, spec, self.limits)
        if problem is not None:
            return f"the text {problem}"
        if spec is not None and spec.reward.type == "exact_match" and prompt.answer is None:
            return "they have no answer (reward exact_match needs one)"
        return None

    def _usable_stream_prompts(self, spec: ExperimentSpec, stored: list[Prompt]) -> list[Prompt]:
        """The stored pushed prompts that feed ``spec``'s steps: the same
        screen as on arrival, so a restart gives every step the same prompts
        (prompts pushed before the spec was known are checked here)."""
        usable, refusals = self._screen_prompts(spec, stored, set())
        if refusals:
            self.log.info("stored_prompts_left_out", experiment_id=spec.experiment_id, reasons=refusals)
        return usable

    async def _load_stream_prompts(self, view: ExperimentView) -> None:
        stored = await self.store.load_stream_prompts(view.experiment_id)
        view.set_stream_prompts(self._usable_stream_prompts(view.spec, stored))

    # ------------------------------------------------------------ building messages

    def _shard(self, experiment_id: str) -> int:
        return shard_of(experiment_id, self.num_shards)

    def _family(self, name: str):
        if name not in self._families:
            from shared.tasks import get_family

            self._families[name] = get_family(name)
        return self._families[name]

    def _prompts_available(self, view: ExperimentView, step: int) -> bool:
        if not view.spec.task.stream:
            return True
        needed = spec_rules.held_out_size(view.spec) + (step + 1) * view.spec.prompts_per_step
        return len(view.stream_prompts) >= needed

    def _train_prompts(self, view: ExperimentView, step: int) -> list[Prompt]:
        """Step ``s``'s prompts. Streamed: pushed prompts are consumed in
        order, each once (after the held-out ones); inline: the training
        split, cycled; family: generated from (seed, step)."""
        spec = view.spec
        count = spec.prompts_per_step
        if spec.task.stream:
            first = spec_rules.held_out_size(spec) + step * count
            return view.stream_prompts[first:first + count]
        if spec.task.prompts is not None:
            pool, _ = spec_rules.split_inline_prompts(spec)
            return [pool[(step * count + i) % len(pool)] for i in range(count)]
        return self._generate(spec.task.family, spec.seed * STEP_SEED_STRIDE + step, count, "train")

    def _eval_prompts(self, view: ExperimentView) -> list[Prompt]:
        spec = view.spec
        if spec.task.stream:
            return view.stream_prompts[:spec_rules.held_out_size(spec)]
        if spec.task.prompts is not None:
            return spec_rules.split_inline_prompts(spec)[1]
        family = spec_rules.eval_family(view.spec)
        key = (family, view.spec.eval_size)
        if key in self._eval_prompt_cache:
            self._eval_prompt_cache.move_to_end(key)
        else:
            self._eval_prompt_cache[key] = self._generate(family, EVAL_SEED, view.spec.eval_size, "eval")
            while len(self._eval_prompt_cache) > EVAL_PROMPT_CACHE_SIZE:
                self._eval_prompt_cache.popitem(last=False)
        return self._eval_prompt_cache[key]

    def _generate(self, family: str, seed: int, count: int, split: str) -> list[Prompt]:
        try:
            return self._family(family).generate(seed, count, split)
        except (KeyError, ValueError) as exc:
            raise ExperimentFailure(f"task family {family!r} cannot give {count} {split} prompts: {exc}") from exc

    def _reward(self, spec: ExperimentSpec) -> RewardSpec:
        if spec.reward.type == "family" and spec.reward.family is None:
            return msgspec.structs.replace(spec.reward, family=spec.task.family)
        return spec.reward

    def _eval_reward(self, spec: ExperimentSpec) -> RewardSpec:
        """The experiment's own reward when it is built in (so an inverted
        tenant is measured on its objective), else the family's verifier."""
        if spec.reward.type in ("family", "exact_match", "regex"):
            return self._reward(spec)
        return RewardSpec(type="family", family=spec_rules.eval_family(spec))

    def _rollout_request(self, view: ExperimentView, step: int, index: int, prompt: Prompt,
                         now: float) -> RolloutRequest:
        spec = view.spec
        return RolloutRequest(
            request_id=train_request_id(view.experiment_id, step, index), experiment_id=view.experiment_id,
            step=step, purpose="train", prompt=prompt, adapter_version=view.version,
            adapter_path=view.adapter_path if view.version > 0 else None,
            sampling=SamplingParams(n=spec.group_size, temperature=spec.temperature, top_p=spec.top_p,
                                    top_k=spec.top_k, max_tokens=spec.max_tokens),
            reward=self._reward(spec), ts=now,
        )

    def _eval_request(self, view: ExperimentView, version: int, index: int, prompt: Prompt) -> RolloutRequest:
        # the final eval is issued only once version == steps, so the path is the final one
        return RolloutRequest(
            request_id=eval_request_id(view.experiment_id, version, index), experiment_id=view.experiment_id,
            step=version, purpose="eval", prompt=prompt, adapter_version=version,
            adapter_path=view.adapter_path if version > 0 else None,
            sampling=SamplingParams(n=1, temperature=0.0, max_tokens=view.spec.max_tokens),
            reward=self._eval_reward(view.spec), ts=messages.now(),
        )

    def _train_job(self, view: ExperimentView) -> TrainJob:
        spec = view.spec
        step = view.version
        groups = view.groups.get(step, {})
        ordered = [groups[train_request_id(view.experiment_id, step, i)] for i in range(spec.prompts_per_step)]
        return TrainJob(
            job_id=f"{view.experiment_id}:s{step}", experiment_id=view.experiment_id, step=step,
            base_version=step, lora_rank=spec.lora_rank,
            groups=[g for g in ordered if group_failed(g) is None],
            hyper=TrainHyper(learning_rate=spec.learning_rate, temperature=spec.temperature, clip_eps=spec.clip_eps, kl_coef=spec.kl_coef,
                             normalize_advantage_std=spec.normalize_advantage_std,
                             max_grad_norm=spec.max_grad_norm, max_off_policy_steps=spec.max_off_policy_steps,
                             checkpoint_every=spec.checkpoint_every, seed=spec.seed),
            ts=messages.now(),
        )

    def _event(self, pipe, experiment_id: str, level: str, code: str, message: str) -> None:
        self.store.publish(pipe, ExperimentEvent(experiment_id=experiment_id, level=level, code=code,
                                                 message=message, ts=messages.now()))

    # ------------------------------------------------------------ watchdogs

    async def watch_stalls(self) -> None:
        """Re-publish what a step that made no progress for ``stall_timeout_s``
        still waits for (requests lost or dead-lettered downstream)."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), STALL_CHECK_INTERVAL_S)
                return
            except TimeoutError:
                pass
            now = time.monotonic()
            stalled = [v.experiment_id for v in self._running() if now - v.last_progress > self.stall_timeout_s]
            for experiment_id in stalled:
                await self._transition(lambda pipe, eid=experiment_id: self._reissue(eid, pipe))

    async def _reissue(self, experiment_id: str, pipe) -> None:
        view = self.views.get(experiment_id)
        if view is None or view.status != "running":
            return
        view.last_progress = time.monotonic()
        missing = 0
        for step in range(view.train_sent, view.issued):
            done = view.groups.get(step, {})
            for index, prompt in enumerate(self._train_prompts(view, step)):
                if train_request_id(experiment_id, step, index) not in done:
                    # the version that issued it may be older than view.version: re-issue under the newest
                    self.store.publish(pipe, self._rollout_request(view, step, index, prompt, messages.now()))
                    missing += 1
        for version in view.evals_issued:
            done = view.evals.get(version, {})
            for index, prompt in enumerate(self._eval_prompts(view)):
                if eval_request_id(experiment_id, version, index) not in done:
                    self.store.publish(pipe, self._eval_request(view, version, index, prompt))
                    missing += 1
        if view.train_outstanding:
            self.store.publish(pipe, self._train_job_for_outstanding(view), f"train_jobs:{self._shard(experiment_id)}")
            missing += 1
        if missing:
            self._event(pipe, experiment_id, "warning", "stalled",
                        f"no progress for {self.stall_timeout_s:.0f}s; re-published {missing} messages")

    def _train_job_for_outstanding(self, view: ExperimentView) -> TrainJob:
        return self._train_job(view)  # same job_id: the trainer re-announces a version it already wrote

    async def watch_dead_letters(self) -> None:
        """Turn dead letters that concern an experiment into its state: an
        undecodable submission becomes an ``invalid`` experiment with the
        decoder's reason; a dead-lettered rollout request or completion
        becomes a failed group, so its step does not wait forever; a
        dead-lettered train job of a tenant's current step (work the trainer
        refused for good) fails that tenant with the reason. Nothing in a
        dead letter stops this loop, and it rides out Redis outages for as
        long as the service runs."""
        key = self.store.keys.stream(DEAD_LETTER_STREAM)
        group_ready = False
        delay_s = REDIS_RETRY_DELAY_S
        while not self.stopping.is_set():
            try:
                if not group_ready:
                    await self._ensure_dead_letter_group(key)
                    group_ready = True
                await self._read_dead_letters(key)
                delay_s = REDIS_RETRY_DELAY_S
                continue
            except RETRYABLE_REDIS_ERRORS as exc:
                self.log.warning("dead_letter_watch_retrying", error=repr(exc), retry_in_s=delay_s)
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    group_ready = False
                    continue
                self.log.warning("dead_letter_watch_retrying", error=repr(exc), retry_in_s=delay_s)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay_s)
            except TimeoutError:
                pass
            delay_s = min(delay_s * 2, MAX_REDIS_RETRY_DELAY_S)

    async def _read_dead_letters(self, key: str) -> None:
        # "0" first: entries this consumer read but did not ack before a crash
        for cursor in ("0", ">"):
            response = await self.redis.xreadgroup(DEAD_LETTER_GROUP, self.consumer_name, {key: cursor},
                                                   count=32, block=None if cursor == "0" else DEAD_LETTER_BLOCK_MS)
            for _, entries in _entries_of(response):
                for entry_id, fields in entries:
                    await self._on_dead_letter_logged(entry_id, fields or {})
                    await self.redis.xack(key, DEAD_LETTER_GROUP, entry_id)

    async def _ensure_dead_letter_group(self, key: str) -> None:
        try:
            await self.redis.xgroup_create(key, DEAD_LETTER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _on_dead_letter_logged(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """A dead letter that cannot be turned into state is logged and left
        in the dead-letter stream (it is read there, not retried here); only
        an unreachable Redis makes it be read again."""
        try:
            await self._on_dead_letter(fields)
        except RETRYABLE_REDIS_ERRORS:
            raise
        except Exception:
            self.log.exception("dead_letter_not_applied", dead_letter_id=_field_text(entry_id))

    async def _on_dead_letter(self, fields: dict[bytes, bytes]) -> None:
        stream = _field_text(fields.get(b"stream", b""))
        reason = _field_text(fields.get(b"reason", b""))
        payload = fields.get(b"payload", b"")
        base = messages.base_stream(stream)
        if base == "experiments":
            await self._transition(lambda pipe: self._invalid_from_dead_letter(payload, reason, pipe))
        elif base in ("rollout_requests", "completions"):
            scored = _failed_group_from(payload, base, reason)
            if scored is not None and is_experiment_id(scored.completion.experiment_id):
                await self._transition(lambda pipe: self._collect(scored, pipe))
        elif base == "train_jobs":
            job = _decoded(payload, stream)
            if isinstance(job, TrainJob) and is_experiment_id(job.experiment_id):
                await self._transition(lambda pipe: self._fail_refused_job(job, reason, pipe))

    async def _fail_refused_job(self, job: TrainJob, reason: str, pipe) -> None:
        """The trainer gave up on a tenant's current train job: without that
        version the tenant can never move on, so it fails with the reason."""
        view = self.views.get(job.experiment_id)
        current = (view is not None and view.status == "running" and view.train_outstanding
                   and job.step == view.version and job.job_id == f"{view.experiment_id}:s{view.version}")
        if not current:
            self.log.info("train_job_dead_letter_ignored", experiment_id=job.experiment_id, step=job.step,
                          reason=reason)
            return
        message = f"the train job of step {job.step} was refused for good: {reason}"
        self._end(view, pipe, "failed", message=message, level="error", error=message)

    async def _invalid_from_dead_letter(self, payload: bytes, reason: str, pipe) -> None:
        experiment_id = _raw_experiment_id(payload)
        if experiment_id is None:
            self.log.warning("submission_dead_lettered", reason=reason)
            return
        explanation = _explain_refusal(payload, reason)
        if not is_experiment_id(experiment_id):
            self._refuse_unkeyed(pipe, experiment_id, "error", "invalid_spec",
                                 f"experiment_id: {experiment_id[:MAX_ID_CHARS]!r} is not a valid id; {explanation}")
            return
        if await self.store.exists(experiment_id):
            self.log.warning("submission_dead_lettered", experiment_id=experiment_id, reason=reason)
            return
        self._record_invalid(pipe, experiment_id, explanation, None)


def _field_text(value: bytes | str) -> str:
    """A dead letter's field as text, whatever bytes it holds."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _ignored_line(problem: str, prompt_ids: list[str]) -> str:
    shown = ", ".join(repr(i[:MAX_ID_CHARS]) for i in prompt_ids[:MAX_LISTED_PROMPT_IDS])
    more = f" and {len(prompt_ids) - MAX_LISTED_PROMPT_IDS} more" if len(prompt_ids) > MAX_LISTED_PROMPT_IDS else ""
    return f"{len(prompt_ids)} pushed prompts ignored: {problem} ({shown}{more})"


def _entries_of(response) -> list:
    """(stream, entries) pairs of an XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not response:
        return []
    if isinstance(response, dict):
        return [(name, value[0]) for name, value in response.items()]
    return response


def _raw_map(payload: bytes) -> dict | None:
    """The payload as a plain map, or None when it is not one. Malformed,
    unhashable keys or too deeply nested (msgpack raises ValueError or
    RecursionError): all just "not a map" here."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        return None
    return raw if isinstance(raw, dict) else None


def _explain_refusal(payload: bytes, reason: str) -> str:
    """The spec rules' wording of why a raw submission's spec does not fit
    the schema (field first); the bus's reason when the spec itself is fine
    or cannot even be read."""
    raw = _raw_map(payload)
    if raw is None or "spec" not in raw:
        return reason
    try:
        spec_rules.convert_spec(raw["spec"], source="")
    except spec_rules.SpecFileError as exc:
        return str(exc)
    except (ValueError, TypeError, RecursionError):
        return reason
    return reason


def _raw_experiment_id(payload: bytes) -> str | None:
    """The experiment id of a submission that did not decode, if it has one."""
    raw = _raw_map(payload)
    if raw is None or raw.get("kind") == "experiment_cancel":
        return None
    spec = raw.get("spec")
    candidate = spec.get("experiment_id") if isinstance(spec, dict) else raw.get("experiment_id")
    return candidate if isinstance(candidate, str) and candidate else None


def _decoded(payload: bytes, stream: str) -> messages.Message | None:
    """A dead letter's message, or None when it does not decode (whatever
    the decoder raises: a dead letter is hostile input too)."""
    try:
        return messages.decode(payload, stream)
    except (ValueError, TypeError, RecursionError):  # MessageDecodeError is a ValueError
        return None


def _failed_group_from(payload: bytes, stream: str, reason: str) -> ScoredCompletion | None:
    """A failed ``ScoredCompletion`` standing for a dead-lettered request or completion."""
    message = _decoded(payload, stream)
    if isinstance(message, RolloutRequest):
        completion = Completion(
            request_id=message.request_id, experiment_id=message.experiment_id, step=message.step,
            purpose=message.purpose, prompt=message.prompt, prompt_token_ids=[], samples=[],
            adapter_version=message.adapter_version, reward=message.reward, error=f"dead-lettered: {reason}",
        )
        return ScoredCompletion(completion=completion, rewards=[], reward_error=None)
    if isinstance(message, Completion):
        return ScoredCompletion(completion=message, rewards=[0.0] * len(message.samples),
                                reward_error=f"dead-lettered: {reason}")
    return None
