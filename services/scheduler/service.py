"""The scheduler: lifecycle and step loop of every experiment.

Consumes ``experiments`` (submit/cancel), ``tasks`` (streamed prompts),
``admin`` (operators' cancels and pushes), ``scored`` (scored rollout
groups), ``adapters`` (new versions) and ``dead_letters``; publishes ``rollout_requests``, ``train_jobs:<shard>``,
``events`` and ``metrics``.

The decisions are ``core.SchedulerCore``'s (the step machine, admission,
fair dispatch; read its docstring for the step rules). This service only
reads what a decision needs from Redis and the adapter store, calls the
core, and commits the ``Effects`` it returns in one MULTI/EXEC: the state
(``StateStore.apply``) together with the messages (``StreamBus.publish_in``).
Handlers run one at a time under one lock, so the core's views never
disagree with what was written; a transaction that failed makes the next
transition rebuild them from Redis first.

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
over from the state in Redis. A scheduler that finds another holding its
lease stops; one whose lease lapsed during a Redis outage takes it again
when Redis is back and nobody else holds it, and re-reads its state first.

After a restart ``recover`` rebuilds the views from Redis and publishes
whatever is due and not yet published; redelivered results are ignored by
request id. A watchdog re-publishes the missing requests of a step that made
no progress for ``stall_timeout_s`` (a request lost or dead-lettered elsewhere).

Owners (``owners``): a submission's ``owner_secret`` is kept only as a
salted hash; a cancel or push must present it (else ``not_owner``, nothing
changes), except on the ``admin`` stream that only operators can write. An
entry that carried a secret is deleted in the transaction that handles it.

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
import os
import re
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path

from redis.exceptions import ResponseError

from services.scheduler.core import SchedulerCore, SchedulerRules
from services.scheduler.dead_letters import raw_experiment_id
from services.scheduler.effects import Effects
from services.scheduler.lease import Lease
from services.scheduler.owners import SECRET_STREAMS, carries_secret, redacting_decoder
from services.scheduler.state import ExperimentView, Keys, StateStore, StoredRecord
from shared import messages, metrics
from shared.adapters import AdapterStoreError, DirectoryAdapterStore
from shared.bus import RETRYABLE_REDIS_ERRORS, DeadLetter, Entry
from shared.config import SchedulerConfig
from shared.deployment import (
    deployment_from_config,
    parse_allowlist,
    read_allowlist_async,
    write_deployment_async,
)
from shared.messages import (
    AdapterPublished,
    ExperimentCancel,
    ExperimentSubmit,
    Prompt,
    ScoredCompletion,
    TaskPush,
    is_experiment_id,
)
from shared.runtime import Service, set_up

CONSUMER_GROUP = "scheduler"
DEAD_LETTER_GROUP = "scheduler-dead-letters"
STALL_CHECK_INTERVAL_S = 5.0
SCORED_READ_AHEAD = 16  # scored results read per round trip
DEAD_LETTER_BATCH = 32
STREAM_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
MAX_PATH_SHOWN = 200  # characters of a refused announcement's path named in its event

Decision = Callable[[], Awaitable[Effects]]


class SchedulerService(Service):
    name = "scheduler"
    config: SchedulerConfig

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        # where versions are: announcements are checked against it, never trusted
        self.adapters = DirectoryAdapterStore(Path(config.adapter_dir).resolve())
        self.core = SchedulerCore(Keys(config.stream_prefix), SchedulerRules.from_config(config))
        # set in setup (read through the ``store`` and ``lease`` properties)
        self._store: StateStore | None = None
        self._lease: Lease | None = None
        self.leading = False  # holds the lease: the one scheduler of this prefix
        self._lock = asyncio.Lock()
        self._needs_recovery = False

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        """Connect, wait to be the one scheduler (standby meanwhile), then recover."""
        await super().setup()
        self._store = StateStore(self.redis, self.config.stream_prefix)
        self._lease = Lease(self.redis, self._store.keys.scheduler_lease, self.consumer_name, self.config.lease_ttl_s)
        self.leading = await self.lease.acquire(self.stopping, on_wait=self._on_standby)
        if self.leading:
            self.log.info("scheduler_leading", lease_ttl_s=self.config.lease_ttl_s)
            # clients validate specs with these same limits before sending (shared.deployment)
            await write_deployment_async(self.redis, self.config.stream_prefix, deployment_from_config(self.config))
            await self.recover()

    @property
    def store(self) -> StateStore:
        return set_up(self._store, "scheduler: store")

    @property
    def lease(self) -> Lease:
        return set_up(self._lease, "scheduler: lease")

    def _lease_regained(self) -> None:
        """The lease lapsed during a Redis outage and is ours again: nobody
        else holds it now, but someone may have led meanwhile, so the next
        transition rebuilds every view from Redis first."""
        self.log.warning("scheduler_lease_regained", reason="Redis was away longer than the lease ttl")
        self._needs_recovery = True

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
            "admin": (self.on_admin_message, 1),
            "scored": (self.on_scored, SCORED_READ_AHEAD),
            "adapters": (self.on_adapter_published, 4),
        }
        # what may carry an owner secret is dead-lettered with the secret masked
        decoders = dict.fromkeys(("experiments", "tasks", "admin"), redacting_decoder)
        consumers = [self.consumer(stream, CONSUMER_GROUP, handler, batch_size=64, concurrency=concurrency,
                                   **({"decoder": decoders[stream]} if stream in decoders else {}))
                     for stream, (handler, concurrency) in handlers.items()]
        dead_letters = self.bus.dead_letter_consumer(
            DEAD_LETTER_GROUP, self.on_dead_letter, consumer_name=self.consumer_name, batch_size=DEAD_LETTER_BATCH,
            reclaim_idle_s=self.config.reclaim_idle_s, drain_timeout_s=self.config.drain_timeout_s)
        return [*consumers, dead_letters]

    def background(self) -> list[Coroutine]:
        if not self.leading:
            return []  # stopped while on standby
        return [self.lease.keep(self.stopping, on_regained=self._lease_regained), self.watch_stalls()]

    @property
    def views(self) -> dict[str, ExperimentView]:
        """The queued and running experiments (the core's views)."""
        return self.core.views

    # ------------------------------------------------------------ committing

    async def _transition(self, decide: Decision) -> None:
        """Read, decide and commit one input under the lock. If the commit
        fails, the views may be ahead of Redis: rebuild them before the next."""
        async with self._lock:
            if self._needs_recovery:
                await self._recover_locked()
            try:
                await self._commit(await decide())
            except BaseException:
                self._needs_recovery = True
                raise

    async def _commit(self, effects: Effects) -> None:
        """One MULTI/EXEC with the effects' state and messages; then its log lines."""
        if not effects.empty:
            pipe = self.store.transaction()
            self.store.apply(pipe, effects)
            for outgoing in effects.messages:
                self.bus.publish_in(pipe, outgoing.message, outgoing.stream)
            await pipe.execute()
        _count_steps(effects)
        for line in effects.logs:
            getattr(self.log, line.level)(line.event, **line.fields)

    def update_metrics(self) -> None:
        statuses = [view.status for view in self.core.views.values()]
        for state in metrics.EXPERIMENT_STATES:
            metrics.EXPERIMENTS.labels(state).set(statuses.count(state))

    # ------------------------------------------------------------ recovery

    async def recover(self) -> None:
        """Rebuild every view from Redis, then publish whatever is due."""
        async with self._lock:
            await self._recover_locked()

    async def _recover_locked(self) -> None:
        views = []
        for experiment_id in await self.store.active_ids():
            view = await self._load_for_recovery(experiment_id)
            if view is not None and view.status == "running":
                views.append(view)
        for experiment_id in await self.store.queued_ids():
            view = await self._load_for_recovery(experiment_id)
            if view is not None and view.status == "queued":
                views.append(view)
        await self._commit(self.core.recover(views, messages.now()))
        self._needs_recovery = False
        outstanding = self.core.dispatcher.outstanding
        self.log.info("scheduler_recovered", running=len(self.core.running()), queued=len(self.core.queue),
                      outstanding={s: len(t) for s, t in outstanding.items()})

    async def _load_for_recovery(self, experiment_id: str) -> ExperimentView | None:
        """One experiment's view, or None. A record that does not load fails
        that experiment alone: one bad record must not stop every tenant."""
        if not is_experiment_id(experiment_id):
            await self._commit(self.core.forget(experiment_id))
            return None
        try:
            return await self.store.load_view(experiment_id)
        except RETRYABLE_REDIS_ERRORS:
            raise
        except Exception as exc:
            self.log.exception("experiment_state_unloadable", experiment_id=experiment_id)
            reason = f"its state could not be loaded: {type(exc).__name__}: {exc}"
            try:
                await self._commit(self.core.fail_unloadable(experiment_id, reason, messages.now()))
            except ResponseError as error:  # e.g. the record is not even a hash; the rest applied
                self.log.error("experiment_failure_not_recorded", experiment_id=experiment_id, error=repr(error))
            return None

    # ------------------------------------------------------------ handlers

    async def on_experiment_message(self, message, entry) -> None:
        if isinstance(message, ExperimentSubmit):
            entry_id = entry.entry_id if entry is not None else None
            await self._transition(self._forgetting(message, entry, lambda: self._submission(message, entry_id)))
        elif isinstance(message, ExperimentCancel):
            await self._transition(self._forgetting(message, entry, lambda: self._cancellation(message)))

    async def on_task_push(self, message: TaskPush, entry) -> None:
        await self._transition(self._forgetting(message, entry, lambda: self._task_push(message)))

    async def on_admin_message(self, message, entry) -> None:
        """The operators' stream (only the admin ACL user writes it): cancel
        or push without an owner secret."""
        if isinstance(message, ExperimentCancel):
            await self._transition(self._forgetting(message, entry, lambda: self._cancellation(message, admin=True)))
        elif isinstance(message, TaskPush):
            await self._transition(self._forgetting(message, entry, lambda: self._task_push(message, admin=True)))

    def _forgetting(self, message, entry: Entry | None, decide: Decision) -> Decision:
        """``decide``, plus deleting the stream entry when it carried an owner
        secret, in the same transaction: the secret is never kept in clear. A
        redelivery after the commit finds the entry gone and is only acked."""
        async def decide_and_forget() -> Effects:
            effects = await decide()
            if entry is not None and carries_secret(message):
                effects.write("xdel", self.store.keys.stream(entry.stream), entry.entry_id)
            return effects

        return decide_and_forget

    async def on_scored(self, message: ScoredCompletion, entry) -> None:
        async def decide() -> Effects:
            return self.core.collect(message, messages.now())

        await self._transition(decide)

    async def on_adapter_published(self, message: AdapterPublished, entry) -> None:
        if not self._needs_recovery and not self.core.needs_check(message):
            return  # not ours, or a re-announcement (views in step with Redis): nothing to check
        # hashing the files takes a while: off the loop, and outside the lock
        adapter_path, rejection = await asyncio.to_thread(self._check_announcement, message)

        async def decide() -> Effects:
            return self.core.advance(message, adapter_path, rejection, messages.now())

        await self._transition(decide)

    async def on_dead_letter(self, letter: DeadLetter) -> None:
        await self._transition(lambda: self._dead_letter(letter))

    # ------------------------------------------------------------ reading what a decision needs

    async def _submission(self, message: ExperimentSubmit, entry_id: str | None) -> Effects:
        spec = message.spec
        experiment_id = spec.experiment_id
        stored, allowlist, pushed, early_owner = StoredRecord(), list[str](), list[Prompt](), None
        if is_experiment_id(experiment_id):
            stored = await self.store.record(experiment_id)
            allowlist = await self._reward_allowlist()
            if spec.task.stream:
                pushed = await self.store.load_stream_prompts(experiment_id)
                early_owner = await self.store.early_owner(experiment_id)
        return self.core.submit(spec, entry_id=entry_id, stored=stored, allowlist=allowlist,
                                stream_prompts=pushed, now=messages.now(), owner_secret=message.owner_secret,
                                early_owner=early_owner)

    async def _cancellation(self, cancel: ExperimentCancel, admin: bool = False) -> Effects:
        status = await self._stored_status(cancel.experiment_id)
        return self.core.cancel(cancel.experiment_id, stored_status=status, now=messages.now(),
                                owner_secret=cancel.owner_secret, admin=admin)

    async def _task_push(self, push: TaskPush, admin: bool = False) -> Effects:
        status = await self._stored_status(push.experiment_id)
        known: set[str] = set()
        early_owner = None
        if status is None and is_experiment_id(push.experiment_id) and push.experiment_id not in self.core.views:
            known = {p.prompt_id for p in await self.store.load_stream_prompts(push.experiment_id)}
            early_owner = await self.store.early_owner(push.experiment_id)
        return self.core.push_tasks(push, stored_status=status, stored_prompt_ids=known, now=messages.now(),
                                    early_owner=early_owner, admin=admin)

    async def _dead_letter(self, letter: DeadLetter) -> Effects:
        exists = False
        if messages.base_stream(letter.stream) == "experiments":
            experiment_id = raw_experiment_id(letter.payload)
            exists = experiment_id is not None and is_experiment_id(experiment_id) \
                and await self.store.exists(experiment_id)
        effects = self.core.dead_letter(letter, submission_exists=exists, now=messages.now())
        if messages.base_stream(letter.stream) in SECRET_STREAMS and STREAM_ENTRY_ID.fullmatch(letter.entry_id):
            # acked but still in its stream, maybe with an owner secret: the dead letter keeps it, masked
            effects.write("xdel", self.store.keys.stream(letter.stream), letter.entry_id)
        return effects

    async def _stored_status(self, experiment_id: str) -> str | None:
        """The stored status of an id the views do not know (None: no record)."""
        if not is_experiment_id(experiment_id) or experiment_id in self.core.views:
            return None
        return await self.store.status(experiment_id)

    async def _reward_allowlist(self) -> list[str]:
        """The reward service's URL prefixes: configured, plus the operator's."""
        added = await read_allowlist_async(self.redis, self.config.stream_prefix)
        return [*parse_allowlist(self.config.http_allowlist), *added]

    def _check_announcement(self, published: AdapterPublished) -> tuple[str | None, str | None]:
        """``(the store's path, None)`` when the announced version is the
        store's own and its files hash to the announced digest, else
        ``(None, why)``. The path is derived, never taken from the message."""
        try:
            store_path = self.adapters.path(published.experiment_id, published.version)
            if os.path.realpath(published.path) != os.path.realpath(store_path):
                return None, f"path {published.path[:MAX_PATH_SHOWN]!r} is not the adapter store's {str(store_path)!r}"
            digest = self.adapters.verify(store_path)
        except (AdapterStoreError, OSError, ValueError) as exc:  # ValueError: e.g. a NUL in the path
            return None, f"version {published.version} does not check out in the adapter store: {exc}"
        if published.digest != digest:
            return None, f"digest {published.digest[:64]!r} is not its files' digest {digest[:12]}..."
        return str(store_path), None

    # ------------------------------------------------------------ watchdog

    async def watch_stalls(self) -> None:
        """Every ``STALL_CHECK_INTERVAL_S``: let the core re-publish what a
        stalled step still waits for."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), STALL_CHECK_INTERVAL_S)
                return
            except TimeoutError:
                pass

            async def decide() -> Effects:
                return self.core.reissue_stalled(messages.now())

            try:
                await self._transition(decide)
            except RETRYABLE_REDIS_ERRORS as exc:  # an outage: the next tick tries again (and recovers first)
                self.log.warning("stall_check_retrying", error=repr(exc))


def _count_steps(effects: Effects) -> None:
    """Each committed ``StepMetrics``: its step's rollout and train time."""
    for outgoing in effects.messages:
        if isinstance(outgoing.message, messages.StepMetrics):
            step = outgoing.message
            metrics.STEP_ROLLOUT_SECONDS.observe(max(0.0, step.rollout_s))
            metrics.STEP_TRAIN_SECONDS.observe(max(0.0, step.train_s))
            metrics.STEPS_FINISHED.labels(metrics.experiment_labels.label(step.experiment_id)).inc()
