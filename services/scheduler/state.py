"""Experiment state in Redis: the scheduler's durable memory.

Keys (``P`` is the stream prefix, e.g. ``clora:``; ``<id>`` is always a
valid experiment id, see ``Keys``):

- ``P exp:<id>`` hash, one per experiment:
  ``status`` queued|running|finished|cancelled|invalid|failed, ``steps``
  (total), ``step`` (steps finished), ``version`` (newest adapter version),
  ``adapter_path`` (its directory), ``issued`` (steps whose rollouts were
  published), ``train_sent`` (steps whose train job was published),
  ``submitted_at``/``started_at``/``finished_at``/``first_scored_at`` (unix
  s; the last: the first train group of step 0 came back), ``start_accuracy``,
  ``final_accuracy``, ``final_adapter``, ``error`` (why invalid/failed),
  ``errors`` (failed groups so far), ``reward_mean``/``accuracy`` (of the last
  step), ``skipped_updates`` (train steps that came back without updating
  the adapter) and ``last_skip`` (the last one's reason), ``family``,
  ``spec`` (msgpack ``ExperimentSpec``), ``submit_entry`` (the stream entry
  id of its submission: a redelivery of that entry changes nothing, another
  submission of the id is a duplicate), ``final_metrics`` (msgpack
  ``StepMetrics`` of the last step, held until the final eval is in and
  published just before the experiment ends), ``owner`` (the salted hash of
  its owner secret, ``services.scheduler.owners``; absent: no owner, only
  operators may cancel it or push to it), per open step
  ``issued_at:<s>`` (rollouts published) and ``completed_at:<s>`` (last
  group scored), and ``eval_issued:<v>`` for every eval of version ``v``
  published (records written by earlier versions name them ``t<s>``,
  ``c<s>`` and ``ev<v>``: still read, so a restart across the upgrade
  resumes them).
- ``P exp_index`` zset: every experiment id, scored by submission time.
- ``P exp_active`` set: running experiments (what a restart resumes).
- ``P exp_queue`` zset: queued experiments, FIFO by submission time.
- ``P exp:<id>:metrics`` list of msgpack ``StepMetrics``, one per step.
- ``P exp:<id>:s<step>`` hash group id (``<id>:s<step>:p<i>``) -> msgpack ``ScoredGroup``.
- ``P exp:<id>:e<version>`` hash group id (``<id>:e<version>:p<i>``) -> ``1``/``0`` (eval sample correct).
- ``P exp:<id>:tasks`` list of msgpack ``Prompt`` pushed by the user; the
  first ``H`` (``spec.held_out_size(spec)``) are the held-out split, then step ``s``
  uses entries ``[H + s * prompts_per_step, H + (s + 1) * prompts_per_step)``;
  no two entries share a ``prompt_id`` (repeated pushes are ignored).
- ``P exp:<id>:tasks_owner`` hash, ``owner``: the owner hash of the first
  push of an id not yet submitted; the submission keeps the early prompts
  only when its secret matches, then deletes it (expires like early prompts).

Expiry: a trained step's ``:s<step>`` hash expires ``DONE_STEP_TTL_S`` after
its version is announced. When an experiment ends (finished, cancelled,
failed, invalid) everything but its summary expires after the scheduler's
``ended_ttl_s``: ``:metrics``, ``:tasks``, the open ``:s<step>`` and the
``:e<version>`` hashes. The ``exp:<id>`` hash (status, steps, accuracies,
error, the final adapter and the ``spec``, which duplicate detection needs)
and its ``exp_index`` entry stay.

Every transition is one MULTI/EXEC transaction (``StateStore.apply`` plus
the bus's ``publish_in``) that also carries the messages it publishes, so a
crash never leaves a published request without its record or the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from shared.messages import (
    TERMINAL_STATUSES,
    ExperimentSpec,
    Prompt,
    ScoredGroup,
    StepMetrics,
    is_experiment_id,
)

if TYPE_CHECKING:
    from services.scheduler.effects import Effects

DONE_STEP_TTL_S = 3600  # a trained step's groups stay readable this long

_SPEC_DECODER = msgspec.msgpack.Decoder(ExperimentSpec)
_SCORED_DECODER = msgspec.msgpack.Decoder(ScoredGroup)
_PROMPT_DECODER = msgspec.msgpack.Decoder(Prompt)
_METRICS_DECODER = msgspec.msgpack.Decoder(StepMetrics)
_ENCODER = msgspec.msgpack.Encoder()


class InvalidExperimentId(ValueError):
    """An id that no key may be built from."""


def checked_id(experiment_id: str) -> str:
    if not is_experiment_id(experiment_id):
        raise InvalidExperimentId(f"experiment id {experiment_id[:80]!r} is not valid: no key is built from it")
    return experiment_id


class Keys:
    """Key names under one prefix.

    Keys of different kinds never collide, whatever id is asked for: every
    per-experiment key is built from a *validated* id (``checked_id`` raises
    otherwise), and a valid id holds only ``[a-z0-9_-]``, never ``:``. So
    ``exp:<id>`` ends at the id, and ``exp:<id>:metrics`` / ``:tasks`` /
    ``:s<n>`` / ``:e<n>`` each add exactly one ``:``-separated part after
    it: no id can make one experiment's key equal another kind's or another
    experiment's key (``victim:s0`` is refused, never written). The fixed keys
    (``exp_index``, ``exp_active``, ``exp_queue``, ``scheduler_lease``) use
    ``_`` after ``exp``, so no ``exp:<id>`` equals them either."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}exp_index"
        self.active = f"{prefix}exp_active"
        self.queue = f"{prefix}exp_queue"
        self.scheduler_lease = f"{prefix}scheduler_lease"  # who is the one scheduler (services.scheduler.lease)

    def exp(self, experiment_id: str) -> str:
        return f"{self.prefix}exp:{checked_id(experiment_id)}"

    def metrics(self, experiment_id: str) -> str:
        return f"{self.exp(experiment_id)}:metrics"

    def step_groups(self, experiment_id: str, step: int) -> str:
        return f"{self.exp(experiment_id)}:s{int(step)}"

    def eval_results(self, experiment_id: str, version: int) -> str:
        return f"{self.exp(experiment_id)}:e{int(version)}"

    def tasks(self, experiment_id: str) -> str:
        return f"{self.exp(experiment_id)}:tasks"

    def tasks_owner(self, experiment_id: str) -> str:
        return f"{self.exp(experiment_id)}:tasks_owner"

    def stream(self, stream: str) -> str:
        return f"{self.prefix}{stream}"


# ---------------------------------------------------------------- records (read side)


class ExperimentRecord(msgspec.Struct, kw_only=True):
    """One experiment as the CLI shows it (parsed from ``P exp:<id>``)."""

    experiment_id: str
    status: str
    steps: int = 0
    step: int = 0
    version: int = 0
    family: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    first_scored_at: float | None = None
    start_accuracy: float | None = None
    final_accuracy: float | None = None
    final_adapter: str | None = None
    reward_mean: float | None = None
    accuracy: float | None = None
    errors: int = 0
    error: str | None = None
    skipped_updates: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _text(raw: dict[bytes, bytes], name: str) -> str | None:
    value = raw.get(name.encode())
    return None if value is None else value.decode()


def _float(raw: dict[bytes, bytes], name: str) -> float | None:
    value = _text(raw, name)
    return None if value in (None, "") else float(value)


def _int(raw: dict[bytes, bytes], name: str, default: int = 0) -> int:
    value = _text(raw, name)
    return default if value in (None, "") else int(value)


def parse_record(experiment_id: str, raw: dict[bytes, bytes]) -> ExperimentRecord:
    return ExperimentRecord(
        experiment_id=experiment_id,
        status=_text(raw, "status") or "unknown",
        steps=_int(raw, "steps"),
        step=_int(raw, "step"),
        version=_int(raw, "version"),
        family=_text(raw, "family"),
        submitted_at=_float(raw, "submitted_at"),
        started_at=_float(raw, "started_at"),
        finished_at=_float(raw, "finished_at"),
        first_scored_at=_float(raw, "first_scored_at"),
        start_accuracy=_float(raw, "start_accuracy"),
        final_accuracy=_float(raw, "final_accuracy"),
        final_adapter=_text(raw, "final_adapter"),
        reward_mean=_float(raw, "reward_mean"),
        accuracy=_float(raw, "accuracy"),
        errors=_int(raw, "errors"),
        error=_text(raw, "error"),
        skipped_updates=_int(raw, "skipped_updates"),
    )


def read_experiment(client, keys: Keys, experiment_id: str) -> ExperimentRecord | None:
    """Sync (redis.Redis) read of one experiment; None when unknown (an
    invalid id never has a record)."""
    if not is_experiment_id(experiment_id):
        return None
    raw = client.hgetall(keys.exp(experiment_id))
    return parse_record(experiment_id, raw) if raw else None


def list_experiments(client, keys: Keys) -> list[ExperimentRecord]:
    """Sync read of every experiment, oldest submission first (ids written
    before ids were validated everywhere are left out)."""
    ids = [i.decode(errors="replace") for i in client.zrange(keys.index, 0, -1)]
    ids = [i for i in ids if is_experiment_id(i)]
    pipe = client.pipeline(transaction=False)
    for experiment_id in ids:
        pipe.hgetall(keys.exp(experiment_id))
    return [parse_record(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True) if raw]


def read_metrics(client, keys: Keys, experiment_id: str, start: int = 0) -> list[StepMetrics]:
    """Sync read of an experiment's step metrics from index ``start`` on."""
    if not is_experiment_id(experiment_id):
        return []
    return [_METRICS_DECODER.decode(m) for m in client.lrange(keys.metrics(experiment_id), start, -1)]


def decode_spec(raw: bytes) -> ExperimentSpec:
    return _SPEC_DECODER.decode(raw)


def encode_spec(spec: ExperimentSpec) -> bytes:
    return _ENCODER.encode(spec)


def encode_prompt(prompt: Prompt) -> bytes:
    return _ENCODER.encode(prompt)


# ---------------------------------------------------------------- hash fields of open steps


def issued_at_field(step: int) -> str:
    return f"issued_at:{int(step)}"


def completed_at_field(step: int) -> str:
    return f"completed_at:{int(step)}"


def eval_issued_field(version: int) -> str:
    return f"eval_issued:{int(version)}"


def legacy_step_fields(step: int) -> tuple[str, str]:
    """What records written before the fields had readable names call
    ``issued_at:<s>`` and ``completed_at:<s>``."""
    return f"t{int(step)}", f"c{int(step)}"


# (prefix, what it holds): new names first, then the old ones (t<s>, c<s>, ev<v>)
_NUMBERED_FIELDS = (
    ("issued_at:", "issued_at"), ("completed_at:", "completed_at"), ("eval_issued:", "evals_issued"),
    ("t", "issued_at"), ("c", "completed_at"), ("ev", "evals_issued"),
)


def _numbered_field(name: str) -> tuple[str, int] | None:
    """``(view attribute, number)`` of an open step's field, or None."""
    for prefix, attribute in _NUMBERED_FIELDS:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return attribute, int(name[len(prefix):])
    return None


@dataclass(frozen=True)
class StoredRecord:
    """What Redis holds of an experiment id (read by the scheduler before a
    submission, a cancel or a push): enough to tell a redelivery from a
    duplicate. All None: no record."""

    status: str | None = None
    submit_entry: str | None = None
    spec: bytes | None = None

    def is_redelivery(self, spec: ExperimentSpec, entry_id: str | None) -> bool:
        if self.submit_entry is not None and entry_id is not None:
            return self.submit_entry == entry_id
        # a record written before entries were kept, or no entry: only the spec can tell
        return self.spec == encode_spec(spec)


# ---------------------------------------------------------------- live view (scheduler side)


@dataclass
class ExperimentView:
    """The scheduler's in-memory copy of one queued or running experiment;
    rebuilt from Redis by ``StateStore.load_view`` after a restart."""

    spec: ExperimentSpec
    status: str
    submitted_at: float = 0.0
    version: int = 0
    adapter_path: str | None = None
    issued: int = 0
    train_sent: int = 0
    errors: int = 0
    skipped_updates: int = 0  # train steps announced without an adapter update
    last_skip: str | None = None  # why the last of them skipped
    start_accuracy: float | None = None
    issued_at: dict[int, float] = field(default_factory=dict)
    completed_at: dict[int, float] = field(default_factory=dict)
    groups: dict[int, dict[str, ScoredGroup]] = field(default_factory=dict)
    evals: dict[int, dict[str, bool]] = field(default_factory=dict)
    evals_issued: set[int] = field(default_factory=set)
    stream_prompts: list[Prompt] = field(default_factory=list)
    stream_prompt_ids: set[str] = field(default_factory=set)  # of stream_prompts: pushes are deduplicated
    last_progress: float = 0.0  # unix s of its last progress (set by the core: the stall watchdog reads it)
    pending_metrics: StepMetrics | None = None  # the last step's, published when the experiment ends
    prompt_wait_step: int | None = None  # a streamed step whose wait for prompts was announced
    owner_hash: str | None = None  # the stored hash of its owner secret (None: operators only)

    @property
    def experiment_id(self) -> str:
        return self.spec.experiment_id

    def set_stream_prompts(self, prompts: list[Prompt]) -> None:
        self.stream_prompts = list(prompts)
        self.stream_prompt_ids = {p.prompt_id for p in prompts}

    @property
    def never_updated(self) -> bool:
        """Every step of the experiment came back without updating the adapter."""
        return self.version >= self.spec.steps and self.skipped_updates >= self.spec.steps

    @property
    def train_outstanding(self) -> bool:
        """A train job is published and its version not yet announced."""
        return self.train_sent == self.version + 1


class StateStore:
    """Async access to the state; writes go through ``transaction()`` pipelines."""

    def __init__(self, redis, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)

    def transaction(self):
        return self.redis.pipeline(transaction=True)

    def apply(self, pipe, effects: Effects) -> None:
        """Queue ``effects``' writes, then its hash fields (HSET the values,
        HDEL the Nones); its messages go through the bus."""
        for write in effects.writes:
            getattr(pipe, write.command)(write.key, *write.args)
        for experiment_id, values in effects.fields.items():
            key = self.keys.exp(experiment_id)
            present = {k: _field_value(v) for k, v in values.items() if v is not None}
            absent = [k for k, v in values.items() if v is None]
            if present:
                pipe.hset(key, mapping=present)
            if absent:
                pipe.hdel(key, *absent)

    async def exists(self, experiment_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.exp(experiment_id)))

    async def record(self, experiment_id: str) -> StoredRecord:
        status, submit_entry, spec = await self.redis.hmget(self.keys.exp(experiment_id),
                                                            ["status", "submit_entry", "spec"])
        return StoredRecord(status=None if status is None else status.decode(),
                            submit_entry=None if submit_entry is None else submit_entry.decode(), spec=spec)

    async def status(self, experiment_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.exp(experiment_id), "status")
        return None if raw is None else raw.decode()

    async def active_ids(self) -> list[str]:
        return sorted(i.decode() for i in await self.redis.smembers(self.keys.active))

    async def queued_ids(self) -> list[str]:
        return [i.decode() for i in await self.redis.zrange(self.keys.queue, 0, -1)]

    async def early_owner(self, experiment_id: str) -> str | None:
        """The owner hash prompts pushed before ``experiment_id``'s submission were bound to."""
        raw = await self.redis.hget(self.keys.tasks_owner(experiment_id), "owner")
        return None if raw is None else raw.decode()

    async def load_stream_prompts(self, experiment_id: str) -> list[Prompt]:
        return [_PROMPT_DECODER.decode(p) for p in await self.redis.lrange(self.keys.tasks(experiment_id), 0, -1)]

    async def load_view(self, experiment_id: str) -> ExperimentView | None:
        """Rebuild the in-memory view of a queued/running experiment."""
        raw = await self.redis.hgetall(self.keys.exp(experiment_id))
        if not raw or b"spec" not in raw:
            return None
        view = _view_from_hash(raw)
        if view.spec.task.stream:
            view.set_stream_prompts(await self.load_stream_prompts(experiment_id))
        for step in range(view.version, view.issued):
            groups = await self.redis.hgetall(self.keys.step_groups(experiment_id, step))
            view.groups[step] = {k.decode(): _SCORED_DECODER.decode(v) for k, v in groups.items()}
        for version in view.evals_issued:
            results = await self.redis.hgetall(self.keys.eval_results(experiment_id, version))
            view.evals[version] = {k.decode(): v == b"1" for k, v in results.items()}
        return view


def _field_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    return value


def _view_from_hash(raw: dict[bytes, bytes]) -> ExperimentView:
    spec = decode_spec(raw[b"spec"])
    view = ExperimentView(
        spec=spec,
        status=_text(raw, "status") or "queued",
        submitted_at=_float(raw, "submitted_at") or 0.0,
        version=_int(raw, "version"),
        adapter_path=_text(raw, "adapter_path"),
        issued=_int(raw, "issued"),
        train_sent=_int(raw, "train_sent"),
        errors=_int(raw, "errors"),
        skipped_updates=_int(raw, "skipped_updates"),
        last_skip=_text(raw, "last_skip"),
        start_accuracy=_float(raw, "start_accuracy"),
        pending_metrics=_METRICS_DECODER.decode(raw[b"final_metrics"]) if b"final_metrics" in raw else None,
        owner_hash=_text(raw, "owner"),
    )
    for name, value in raw.items():
        numbered = _numbered_field(name.decode())
        if numbered is None:
            continue
        attribute, number = numbered
        if attribute == "evals_issued":
            view.evals_issued.add(number)
        else:
            getattr(view, attribute)[number] = float(value)
    return view
