"""``CloraClient`` (sync) and ``AsyncCloraClient`` (asyncio): C-LoRA from Python.

    from shared.client import CloraClient, SpecRefused

    client = CloraClient.connect()          # REDIS_URL, else the address `clora up` wrote
                                            # (and its client password: see find_credentials)
    try:
        client.submit({"experiment_id": "add-1", "task": {"family": "add"},
                       "reward": {"type": "family", "family": "add"}, "steps": 10})
    except SpecRefused as refused:
        print(refused.reasons)              # nothing was sent
    for metrics in client.follow_metrics("add-1", until_end=True):
        print(metrics.step, metrics.reward_mean)
    record = client.wait("add-1")           # the final ExperimentRecord
    print(record.status, record.start_accuracy, record.final_accuracy)

``submit`` validates the spec with the scheduler's own rules
(``services.scheduler.spec.validate_spec``) and the limits the scheduler
published (``shared.deployment``), refuses a duplicate id and an HTTP reward
URL that is not allow-listed, and raises ``SpecRefused`` (with every reason)
before sending anything. Messages go out in the wire format of
``shared.messages``; experiment records are read through the scheduler's own
read functions (``services.scheduler.state``), never by key names of ours.

Owners: ``submit`` makes an owner secret for the experiment, keeps it in the
user's owners file (``shared.owner_secrets``: ``CLORA_OWNERS_FILE``, else
``$XDG_CONFIG_HOME/clora/owners.json``, mode 0600) before sending, and sends
it with the submission; ``cancel`` and ``push_prompts`` present it (a push
before the submission makes it). ``NotOwner``, nothing sent, for a known
experiment whose secret is not kept here. ``admin_cancel`` / ``admin_push``
write the operators' stream ``admin`` (the admin ACL user only) and need no
secret.

What it returns:

- ``ExperimentRecord`` (``services.scheduler.state``): ``experiment_id``;
  ``status`` queued | running | finished | cancelled | invalid | failed;
  ``steps`` (asked) and ``step`` (trained so far); ``version`` (newest adapter
  version, 0 = base model); ``family`` (whose held-out split measures it, or
  None); ``submitted_at`` / ``started_at`` / ``finished_at`` (unix s or None);
  ``start_accuracy`` / ``final_accuracy`` (held-out greedy accuracy of
  version 0 and of the last version, None until measured or without a
  held-out split); ``final_adapter`` (directory of the last version);
  ``reward_mean`` / ``accuracy`` (of the last finished step's train samples; None when
  nothing of it was scored);
  ``errors`` (failed groups so far); ``error`` (why invalid or failed);
  ``terminal`` (True once it ended).
- ``StepMetrics`` and ``ExperimentEvent`` (``shared.messages``), as the
  README's protocol section describes them.

Streams are written and read through the bus (``shared.bus.SyncStreamBus``
here, ``StreamBus`` in the async client), which holds the one definition of
the wire format, the stream/kind check and the cap.

Following streams: ``follow_events`` / ``follow_metrics`` read the shared
``events`` / ``metrics`` streams from now on (``from_start=True``: from the
oldest entry still kept), keep the given experiment's messages, and stop after
``timeout_s`` without an end (None: never) or, with ``until_end=True``, after
the experiment's terminal event.
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from services.scheduler.spec import SpecFileError, convert_spec, limits_from_config, validate_spec
from services.scheduler.state import (
    ExperimentRecord,
    Keys,
    list_experiments,
    parse_record,
    read_experiment,
    read_metrics,
)
from shared.acl import connection_options, password_file, read_password_file, url_has_credentials
from shared.bus import EntryRejected, StreamBus, StreamEntry, SyncStreamBus, decode_message_entry
from shared.config import DEFAULT_DATA_DIR, DEFAULT_STREAM_PREFIX
from shared.deployment import (
    DeploymentInfo,
    read_allowlist,
    read_allowlist_async,
    read_deployment,
    read_deployment_async,
)
from shared.messages import (
    TERMINAL_STATUSES,
    ExperimentCancel,
    ExperimentEvent,
    ExperimentSpec,
    ExperimentSubmit,
    Prompt,
    StepMetrics,
    TaskPush,
    now,
)
from shared.owner_secrets import OwnerSecrets, OwnerSecretsError

DEFAULT_PREFIX = DEFAULT_STREAM_PREFIX
ADMIN_STREAM = "admin"  # operators' cancels and pushes: writable by the admin ACL user only
REDIS_URL_FILE = "redis_url"  # written by `clora up` into its data dir while it runs
STREAM_PREFIX_FILE = "stream_prefix"  # likewise
UNKNOWN_GRACE_S = 2.0
FOLLOW_BLOCK_S = 1.0  # one read of a stream blocks at most this long, so timeouts are honoured
# A half-open connection or an unreachable host fails a call instead of hanging it (> FOLLOW_BLOCK_S).
SOCKET_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 5.0, "socket_timeout": 30.0}
FOLLOW_READ_COUNT = 1000
END_CODES = TERMINAL_STATUSES | {"invalid_spec"}  # event codes that end an experiment
NO_DEPLOYMENT_WARNING = ("no deployment description under {key!r} (has a scheduler started on this prefix?): "
                         "validating with the default limits")


class ClientError(RuntimeError):
    """A request the client cannot carry out; the text says why."""


class SpecRefused(ClientError):
    """A spec refused before sending; ``reasons`` has one line per broken rule."""

    def __init__(self, experiment_id: str | None, reasons: list[str]) -> None:
        super().__init__(f"{experiment_id or 'spec'} refused: " + "; ".join(reasons))
        self.experiment_id = experiment_id
        self.reasons = reasons


class UnknownExperiment(ClientError):
    pass


class NotOwner(ClientError):
    """No owner secret of this experiment is kept here: only its owner (or an operator) may do that."""


class NoDeploymentWarning(UserWarning):
    """No scheduler has described the deployment yet; defaults were used."""


# ---------------------------------------------------------------- finding Redis


def find_redis_url(redis_url: str | None = None, data_dir: str | Path | None = None) -> str:
    """The Redis every command talks to: ``redis_url``, else ``REDIS_URL``,
    else the address ``clora up`` wrote to ``<data dir>/redis_url`` (data dir:
    ``data_dir``, ``CLORA_DATA_DIR`` or ``.clora``)."""
    if redis_url:
        return redis_url
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    url_file = data_dir_of(data_dir) / REDIS_URL_FILE
    if url_file.is_file():
        return url_file.read_text().strip()
    raise ClientError(f"no Redis to talk to: pass --redis-url, set REDIS_URL, or start `clora up` "
                      f"(it writes {url_file})")


def find_credentials(redis_url: str, role: str = "client", data_dir: str | Path | None = None) -> dict[str, Any]:
    """``username`` / ``password`` options for ``Redis.from_url(redis_url)``:
    none when the URL carries its own; else the environment's
    (``CLORA_REDIS_USERNAME`` with ``CLORA_REDIS_PASSWORD_FILE`` or
    ``CLORA_REDIS_PASSWORD``); else, when ``redis_url`` is the Redis that
    ``clora up`` runs from the data dir, the password it generated for
    ``role`` (``client``, or ``admin`` for operator commands); else none (a
    Redis without ACLs)."""
    options = connection_options(redis_url)
    if options or url_has_credentials(redis_url):
        return options
    return cluster_credentials(redis_url, role, data_dir)


def cluster_credentials(redis_url: str, role: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """``role``'s user and password when ``redis_url`` is the Redis that
    ``clora up`` runs from the data dir and it wrote that role's password
    file; {} otherwise."""
    directory = data_dir_of(data_dir)
    url_file, role_password = directory / REDIS_URL_FILE, password_file(directory, role)
    if url_file.is_file() and url_file.read_text().strip() == redis_url and role_password.is_file():
        return {"username": role, "password": read_password_file(role_password)}
    return {}


def redis_connection(redis_url: str | None = None, role: str = "client",
                     data_dir: str | Path | None = None, **options: Any) -> redis.Redis:
    """A ``redis.Redis`` to the Redis every command talks to, as ``role``
    (see ``find_redis_url`` and ``find_credentials``); ``options`` go to redis-py."""
    url = find_redis_url(redis_url, data_dir)
    return redis.Redis.from_url(url, **{**SOCKET_TIMEOUTS, **find_credentials(url, role, data_dir), **options})


def find_prefix(prefix: str | None = None, data_dir: str | Path | None = None) -> str:
    """``prefix``, else ``CLORA_STREAM_PREFIX``, else the one ``clora up`` wrote, else ``clora:``."""
    if prefix:
        return prefix
    if os.environ.get("CLORA_STREAM_PREFIX"):
        return os.environ["CLORA_STREAM_PREFIX"]
    prefix_file = data_dir_of(data_dir) / STREAM_PREFIX_FILE
    if prefix_file.is_file() and prefix_file.read_text().strip():
        return prefix_file.read_text().strip()
    return DEFAULT_PREFIX


def data_dir_of(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or os.environ.get("CLORA_DATA_DIR") or DEFAULT_DATA_DIR)


# ---------------------------------------------------------------- pure helpers


def as_spec(spec: ExperimentSpec | dict) -> ExperimentSpec:
    """An ``ExperimentSpec`` from a spec or plain data; ``SpecRefused`` when
    the data does not fit the schema."""
    if isinstance(spec, ExperimentSpec):
        return spec
    experiment_id = spec.get("experiment_id") if isinstance(spec, dict) else None
    try:
        return convert_spec(spec, "")
    except SpecFileError as exc:
        raise SpecRefused(experiment_id if isinstance(experiment_id, str) else None, [str(exc)]) from None


def spec_limits(deployment: DeploymentInfo):
    """The scheduler's ``SpecLimits`` for this deployment: built from a
    ``SchedulerConfig`` holding the deployment's values, exactly as the
    scheduler builds its own."""
    from shared.config import SchedulerConfig

    known = {name for name in SchedulerConfig.__dataclass_fields__}
    values = {name: getattr(deployment, name) for name in DeploymentInfo.__struct_fields__
              if name in known and name not in ("lora_targets", "http_allowlist")}
    values["lora_targets"] = ",".join(deployment.lora_targets)  # a list here, one string in the config
    return limits_from_config(SchedulerConfig(**values))


def refusal_reasons(spec: ExperimentSpec, deployment: DeploymentInfo, runtime_allowlist: Iterable[str],
                    existing_status: str | None) -> list[str]:
    """Every reason to refuse ``spec`` on this deployment; [] to send it."""
    reasons = validate_spec(spec, spec_limits(deployment), deployment.families or None,
                            allowlist=[*deployment.http_allowlist, *runtime_allowlist])
    if existing_status is not None and existing_status != "invalid":  # a refused id may be reused
        reasons.append(f"experiment_id: {spec.experiment_id!r} already exists ({existing_status}); "
                       "choose another id")
    return reasons


def decode_entry(entry: StreamEntry, experiment_id: str | None):
    """The message of one stream entry when it is about ``experiment_id``
    (any when None); None for other experiments and for entries that are not
    messages (a shared stream may carry anyone's garbage: skip, never fail)."""
    try:
        message, _payload = decode_message_entry(entry)
    except EntryRejected:
        return None
    if experiment_id is not None and getattr(message, "experiment_id", None) != experiment_id:
        return None
    return message


def _is_end(message: Any) -> bool:
    return isinstance(message, ExperimentEvent) and message.code in END_CODES


class _Follow:
    """Where a follow is: the last entry id read and its deadline."""

    def __init__(self, last_id: str, timeout_s: float | None) -> None:
        self.last_id = last_id
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def block_ms(self) -> int | None:
        """How long the next read may block; None when the time is up."""
        if self.deadline is None:
            return int(FOLLOW_BLOCK_S * 1000)
        left_s = self.deadline - time.monotonic()
        return None if left_s <= 0 else max(1, int(min(left_s, FOLLOW_BLOCK_S) * 1000))


# ---------------------------------------------------------------- sync client


class CloraClient:
    """Synchronous client over ``redis.Redis``."""

    def __init__(self, redis_client: redis.Redis, prefix: str = DEFAULT_PREFIX,
                 owners: OwnerSecrets | None = None) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.bus = SyncStreamBus(redis_client, prefix)
        self.owners = owners or OwnerSecrets()  # the user's owner secrets (shared.owner_secrets)
        self._submitted: set[str] = set()  # ids this client sent (wait() waits for them to appear)

    @classmethod
    def connect(cls, redis_url: str | None = None, prefix: str | None = None,
                data_dir: str | Path | None = None, role: str = "client") -> "CloraClient":
        """Connect the way every ``clora`` command does (see ``find_redis_url``
        and, for the ACL user and password, ``find_credentials``)."""
        return cls(redis_connection(redis_url, role, data_dir), find_prefix(prefix, data_dir))

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> "CloraClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------ deployment and validation

    def deployment(self) -> DeploymentInfo:
        """What the scheduler published; defaults (``written_at`` 0) with a
        ``NoDeploymentWarning`` when no scheduler has written it yet."""
        info = read_deployment(self.redis, self.prefix)
        if info is None:
            warnings.warn(NO_DEPLOYMENT_WARNING.format(key=self.prefix + "deployment"), NoDeploymentWarning,
                          stacklevel=2)
            return DeploymentInfo()
        return info

    def validate(self, spec: ExperimentSpec | dict) -> list[str]:
        """Every reason the spec would be refused; [] when it is valid."""
        try:
            spec = as_spec(spec)
        except SpecRefused as refused:
            return refused.reasons
        existing = self.experiment(spec.experiment_id) if _id_is_safe(spec.experiment_id) else None
        return refusal_reasons(spec, self.deployment(), read_allowlist(self.redis, self.prefix),
                               existing.status if existing else None)

    # ------------------------------------------------------------ what a client sends

    def submit(self, spec: ExperimentSpec | dict) -> str:
        """Send a valid spec with its owner secret (made and kept first); returns
        its id. ``SpecRefused`` (nothing sent) otherwise."""
        spec = as_spec(spec)
        reasons = self.validate(spec)
        if reasons:
            raise SpecRefused(spec.experiment_id, reasons)
        secret = _kept(lambda: self.owners.get_or_make(self.prefix, spec.experiment_id))
        self._publish(ExperimentSubmit(spec=spec, ts=now(), owner_secret=secret))
        self._submitted.add(spec.experiment_id)
        return spec.experiment_id

    def cancel(self, experiment_id: str, owner_secret: str | None = None) -> ExperimentRecord:
        """Ask the scheduler to stop it, with its owner secret (``owner_secret``,
        else the kept one; ``NotOwner`` without one); returns the record as it was."""
        record = self.experiment(experiment_id)
        if record is None:
            raise UnknownExperiment(f"unknown experiment {experiment_id!r}")
        secret = owner_secret or _kept(lambda: self.owners.get(self.prefix, experiment_id))
        if secret is None:
            raise _not_owner(experiment_id, "cancel", self.owners)
        self._publish(ExperimentCancel(experiment_id=experiment_id, ts=now(), owner_secret=secret))
        return record

    def push_prompts(self, experiment_id: str, prompts: Sequence[Prompt | dict],
                     owner_secret: str | None = None) -> None:
        """Feed a ``task.stream`` experiment: prompts are used in the order
        pushed, each once; with a verifying reward (``family``,
        ``exact_match``, ``regex``) the first ``eval_size`` are held out for
        evaluation, then each step takes the next ``prompts_per_step``. A
        ``prompt_id`` already pushed is ignored (with a warning event). The
        owner secret goes with them (made here for an id not submitted yet)."""
        batch = _as_prompts(prompts)
        secret = owner_secret or _push_secret(self.owners, self.prefix, experiment_id,
                                              known=self.experiment(experiment_id) is not None)
        self._publish(TaskPush(experiment_id=experiment_id, prompts=batch, owner_secret=secret))

    def admin_cancel(self, experiment_id: str) -> None:
        """Operators: cancel any experiment (stream ``admin``: the admin ACL user only)."""
        self.bus.publish(ExperimentCancel(experiment_id=experiment_id, ts=now()), ADMIN_STREAM)

    def admin_push(self, experiment_id: str, prompts: Sequence[Prompt | dict]) -> None:
        """Operators: push prompts to any streamed experiment (stream ``admin``)."""
        self.bus.publish(TaskPush(experiment_id=experiment_id, prompts=_as_prompts(prompts)), ADMIN_STREAM)

    def _publish(self, message) -> None:
        self.bus.publish(message)

    # ------------------------------------------------------------ what a client reads

    def experiment(self, experiment_id: str) -> ExperimentRecord | None:
        if not _id_is_safe(experiment_id):
            return None
        return read_experiment(self.redis, self.keys, experiment_id)

    def experiments(self) -> list[ExperimentRecord]:
        """Every experiment, oldest submission first."""
        return list_experiments(self.redis, self.keys)

    def metrics(self, experiment_id: str) -> list[StepMetrics]:
        """Every finished step's metrics so far, by step."""
        return read_metrics(self.redis, self.keys, experiment_id) if _id_is_safe(experiment_id) else []

    def version_path(self, experiment_id: str, version: int) -> Path:
        """The PEFT directory of one adapter version (from the deployment's adapter store)."""
        return _version_path(self.deployment(), experiment_id, version)

    def follow_events(self, experiment_id: str | None = None, *, from_start: bool = False,
                      timeout_s: float | None = None, until_end: bool = False) -> Iterator[ExperimentEvent]:
        yield from self._follow("events", experiment_id, from_start, timeout_s, until_end)

    def follow_metrics(self, experiment_id: str | None = None, *, from_start: bool = False,
                       timeout_s: float | None = None, until_end: bool = False) -> Iterator[StepMetrics]:
        """Step metrics as they arrive; ``until_end`` also watches the events
        stream and stops once the experiment ended and its metrics are all read."""
        for message in self._follow_both(experiment_id, from_start, timeout_s, until_end):
            if isinstance(message, StepMetrics):
                yield message

    def wait(self, experiment_id: str, timeout_s: float | None = None) -> ExperimentRecord:
        """Block until the experiment ended; its final record. ``TimeoutError``
        after ``timeout_s``; ``UnknownExperiment`` for an id that this client
        did not submit and that has no record after ``UNKNOWN_GRACE_S`` (time
        for the scheduler to record a submission just sent by someone else)."""
        follow = _Follow(self.bus.stream_end("events"), timeout_s)
        unknown_until = time.monotonic() + UNKNOWN_GRACE_S
        while True:
            record = self.experiment(experiment_id)
            if record is None and experiment_id not in self._submitted and time.monotonic() > unknown_until:
                raise UnknownExperiment(f"unknown experiment {experiment_id!r}")
            if record is not None and record.terminal:
                return record
            block_ms = follow.block_ms()
            if block_ms is None:
                raise TimeoutError(f"{experiment_id} still {record.status if record else 'not recorded'} "
                                   f"after {timeout_s} s")
            # any new event wakes us: re-read the record (never miss the end between two reads)
            entries = self.bus.tail({"events": follow.last_id}, block_ms=block_ms, count=FOLLOW_READ_COUNT)
            if entries:
                follow.last_id = entries[-1].entry_id

    def _follow(self, stream: str, experiment_id, from_start, timeout_s, until_end) -> Iterator[Any]:
        follow = _Follow("0-0" if from_start else self.bus.stream_end(stream), timeout_s)
        while (block_ms := follow.block_ms()) is not None:
            entries = self.bus.tail({stream: follow.last_id}, block_ms=block_ms, count=FOLLOW_READ_COUNT)
            if until_end and not entries and _ended(self.experiment(experiment_id) if experiment_id else None):
                return  # it ended before we started reading: its end event is behind us
            for entry in entries:
                follow.last_id = entry.entry_id
                message = decode_entry(entry, experiment_id)
                if message is not None:
                    yield message
                    if until_end and _is_end(message):
                        return

    def _follow_both(self, experiment_id, from_start, timeout_s, until_end) -> Iterator[Any]:
        """Metrics and events in arrival order per stream; after the end
        event, the metrics already written are drained before stopping."""
        streams = {"metrics": "0-0", "events": "0-0"}
        if not from_start:
            streams = {name: self.bus.stream_end(name) for name in streams}
        follow, ended = _Follow("0-0", timeout_s), False
        while (block_ms := follow.block_ms()) is not None:
            entries = self.bus.tail(streams, block_ms=None if ended else block_ms, count=FOLLOW_READ_COUNT)
            record = self.experiment(experiment_id) if until_end and experiment_id and not entries else None
            if not entries and (ended or _ended(record)):
                return
            for entry in entries:
                streams[entry.stream] = entry.entry_id
                message = decode_entry(entry, experiment_id)
                if message is not None:
                    ended = ended or (until_end and _is_end(message))
                    yield message


def _ended(record: ExperimentRecord | None) -> bool:
    """Whether an experiment already ended, so a follower that saw nothing new
    has passed its end event. A record still ``invalid`` may be about to be
    replaced by a corrected resubmission: not an end to stop at."""
    return record is not None and record.terminal and record.status != "invalid"


# ---------------------------------------------------------------- async client


class AsyncCloraClient:
    """The same client over ``redis.asyncio.Redis`` (every method awaits)."""

    def __init__(self, redis_client: aioredis.Redis, prefix: str = DEFAULT_PREFIX,
                 owners: OwnerSecrets | None = None) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.bus = StreamBus(redis_client, prefix)
        self.owners = owners or OwnerSecrets()
        self._submitted: set[str] = set()

    @classmethod
    def connect(cls, redis_url: str | None = None, prefix: str | None = None,
                data_dir: str | Path | None = None, role: str = "client") -> "AsyncCloraClient":
        url = find_redis_url(redis_url, data_dir)
        client = aioredis.Redis.from_url(url, **SOCKET_TIMEOUTS, **find_credentials(url, role, data_dir))
        return cls(client, find_prefix(prefix, data_dir))

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> "AsyncCloraClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def deployment(self) -> DeploymentInfo:
        info = await read_deployment_async(self.redis, self.prefix)
        if info is None:
            warnings.warn(NO_DEPLOYMENT_WARNING.format(key=self.prefix + "deployment"), NoDeploymentWarning,
                          stacklevel=2)
            return DeploymentInfo()
        return info

    async def validate(self, spec: ExperimentSpec | dict) -> list[str]:
        try:
            spec = as_spec(spec)
        except SpecRefused as refused:
            return refused.reasons
        existing = await self.experiment(spec.experiment_id)
        return refusal_reasons(spec, await self.deployment(), await read_allowlist_async(self.redis, self.prefix),
                               existing.status if existing else None)

    async def submit(self, spec: ExperimentSpec | dict) -> str:
        spec = as_spec(spec)
        reasons = await self.validate(spec)
        if reasons:
            raise SpecRefused(spec.experiment_id, reasons)
        experiment_id = spec.experiment_id
        secret = await asyncio.to_thread(_kept, lambda: self.owners.get_or_make(self.prefix, experiment_id))
        await self._publish(ExperimentSubmit(spec=spec, ts=now(), owner_secret=secret))
        self._submitted.add(spec.experiment_id)
        return spec.experiment_id

    async def cancel(self, experiment_id: str, owner_secret: str | None = None) -> ExperimentRecord:
        record = await self.experiment(experiment_id)
        if record is None:
            raise UnknownExperiment(f"unknown experiment {experiment_id!r}")
        secret = owner_secret or await asyncio.to_thread(_kept, lambda: self.owners.get(self.prefix, experiment_id))
        if secret is None:
            raise _not_owner(experiment_id, "cancel", self.owners)
        await self._publish(ExperimentCancel(experiment_id=experiment_id, ts=now(), owner_secret=secret))
        return record

    async def push_prompts(self, experiment_id: str, prompts: Sequence[Prompt | dict],
                           owner_secret: str | None = None) -> None:
        batch = _as_prompts(prompts)
        known = await self.experiment(experiment_id) is not None
        secret = owner_secret or await asyncio.to_thread(_push_secret, self.owners, self.prefix, experiment_id,
                                                         known=known)
        await self._publish(TaskPush(experiment_id=experiment_id, prompts=batch, owner_secret=secret))

    async def admin_cancel(self, experiment_id: str) -> None:
        await self.bus.publish(ExperimentCancel(experiment_id=experiment_id, ts=now()), ADMIN_STREAM)

    async def admin_push(self, experiment_id: str, prompts: Sequence[Prompt | dict]) -> None:
        await self.bus.publish(TaskPush(experiment_id=experiment_id, prompts=_as_prompts(prompts)), ADMIN_STREAM)

    async def _publish(self, message) -> None:
        await self.bus.publish(message)

    # The scheduler's read functions are sync; these mirror them with the
    # same ``Keys`` and ``parse_record`` (see the lead's note on state.py).
    async def experiment(self, experiment_id: str) -> ExperimentRecord | None:
        if not _id_is_safe(experiment_id):
            return None
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.keys.exp(experiment_id))  # type: ignore[assignment]
        return parse_record(experiment_id, raw) if raw else None

    async def experiments(self) -> list[ExperimentRecord]:
        ids: list[bytes] = await self.redis.zrange(self.keys.index, 0, -1)  # type: ignore[assignment]
        records = [await self.experiment(i.decode()) for i in ids]
        return [r for r in records if r is not None]

    async def metrics(self, experiment_id: str) -> list[StepMetrics]:
        if not _id_is_safe(experiment_id):
            return []
        raw: list[bytes] = await self.redis.lrange(self.keys.metrics(experiment_id), 0, -1)  # type: ignore[assignment]
        return [msgspec.msgpack.decode(m, type=StepMetrics) for m in raw]

    async def version_path(self, experiment_id: str, version: int) -> Path:
        return _version_path(await self.deployment(), experiment_id, version)

    async def follow_events(self, experiment_id: str | None = None, *, from_start: bool = False,
                            timeout_s: float | None = None, until_end: bool = False) -> AsyncIterator[ExperimentEvent]:
        follow = _Follow("0-0" if from_start else await self.bus.stream_end("events"), timeout_s)
        while (block_ms := follow.block_ms()) is not None:
            entries = await self.bus.tail({"events": follow.last_id}, block_ms=block_ms, count=FOLLOW_READ_COUNT)
            if until_end and not entries and _ended(await self.experiment(experiment_id) if experiment_id else None):
                return  # it ended before we started reading: its end event is behind us
            for entry in entries:
                follow.last_id = entry.entry_id
                message = decode_entry(entry, experiment_id)
                if message is not None:
                    yield message
                    if until_end and _is_end(message):
                        return

    async def follow_metrics(self, experiment_id: str | None = None, *, from_start: bool = False,
                             timeout_s: float | None = None, until_end: bool = False) -> AsyncIterator[StepMetrics]:
        streams = {"metrics": "0-0", "events": "0-0"}
        if not from_start:
            streams = {name: await self.bus.stream_end(name) for name in streams}
        follow, ended = _Follow("0-0", timeout_s), False
        while (block_ms := follow.block_ms()) is not None:
            entries = await self.bus.tail(streams, block_ms=None if ended else block_ms, count=FOLLOW_READ_COUNT)
            record = await self.experiment(experiment_id) if until_end and experiment_id and not entries else None
            if not entries and (ended or _ended(record)):
                return
            for entry in entries:
                streams[entry.stream] = entry.entry_id
                message = decode_entry(entry, experiment_id)
                if message is None:
                    continue
                ended = ended or (until_end and _is_end(message))
                if isinstance(message, StepMetrics):
                    yield message

    async def wait(self, experiment_id: str, timeout_s: float | None = None) -> ExperimentRecord:
        follow = _Follow(await self.bus.stream_end("events"), timeout_s)
        unknown_until = time.monotonic() + UNKNOWN_GRACE_S
        while True:
            record = await self.experiment(experiment_id)
            if record is None and experiment_id not in self._submitted and time.monotonic() > unknown_until:
                raise UnknownExperiment(f"unknown experiment {experiment_id!r}")
            if record is not None and record.terminal:
                return record
            block_ms = follow.block_ms()
            if block_ms is None:
                raise TimeoutError(f"{experiment_id} still {record.status if record else 'not recorded'} "
                                   f"after {timeout_s} s")
            entries = await self.bus.tail({"events": follow.last_id}, block_ms=block_ms, count=FOLLOW_READ_COUNT)
            if entries:
                follow.last_id = entries[-1].entry_id


# ---------------------------------------------------------------- shared bits


def _kept(read: Any) -> Any:
    """``read()`` of the owners file, its failures as ``ClientError``."""
    try:
        return read()
    except OwnerSecretsError as exc:
        raise ClientError(str(exc)) from None


def _push_secret(owners: OwnerSecrets, prefix: str, experiment_id: str, *, known: bool) -> str:
    """The secret a push presents: the kept one; for an id not submitted yet a
    new one (its submission then sends the same); ``NotOwner`` for an
    experiment submitted elsewhere."""
    if known:
        secret = _kept(lambda: owners.get(prefix, experiment_id))
        if secret is None:
            raise _not_owner(experiment_id, "push to", owners)
        return secret
    return _kept(lambda: owners.get_or_make(prefix, experiment_id))


def _not_owner(experiment_id: str, action: str, owners: OwnerSecrets) -> NotOwner:
    return NotOwner(f"no owner secret for {experiment_id!r} in {owners.path}: only the user who submitted it "
                    f"can {action} it (operators: the --admin option)")


def _as_prompts(prompts: Sequence[Prompt | dict]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else msgspec.convert(p, Prompt) for p in prompts]


def _id_is_safe(experiment_id: str) -> bool:
    """Only a valid id becomes part of a key (a hostile one could name another's)."""
    from shared.messages import is_experiment_id

    return is_experiment_id(experiment_id)


def _version_path(deployment: DeploymentInfo, experiment_id: str, version: int) -> Path:
    if not deployment.adapter_dir:
        raise ClientError("the deployment does not say where adapters live (no scheduler has described it)")
    from shared.adapters import DirectoryAdapterStore  # lazy: it imports torch

    return DirectoryAdapterStore(deployment.adapter_dir).path(experiment_id, version)


__all__ = [
    "CloraClient", "AsyncCloraClient", "SpecRefused", "UnknownExperiment", "NotOwner", "ClientError",
    "NoDeploymentWarning", "OwnerSecrets",
    "ExperimentRecord", "find_redis_url", "find_credentials",
    "cluster_credentials", "redis_connection", "find_prefix", "refusal_reasons", "spec_limits", "as_spec", "END_CODES",
]
