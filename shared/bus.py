"""Typed messages on Redis streams with at-least-once delivery.

This module owns every touch of a stream (no other module calls XADD, XREAD
or XREADGROUP). The wire format is defined once, by pure functions that the
async ``StreamBus`` and the sync ``SyncStreamBus`` (for callers outside the
services, such as the client) share: an entry is one field ``msg`` holding
msgpack (``entry_fields``, see ``shared.messages``), on the stream of its
kind (``check_stream_carries``), capped (``XADD MAXLEN ~``); replies of a
read are parsed by ``parse_entries``.

- ``publish`` appends one entry; ``publish_in`` queues the same XADD on a
  pipeline or MULTI, so a message goes out in one transaction with the
  state it belongs to;
- ``tail`` / ``StreamTail`` follow broadcast streams without a consumer
  group (every reader sees every entry), from a position the caller keeps;
- ``consumer`` builds a ``StreamConsumer``, ``dead_letter_consumer`` one
  that reads the flat entries of the dead-letter stream.

``StreamConsumer`` reads a stream through a consumer group:

- the group is created idempotently (from the start of the stream, so nothing
  published before the first consumer started is lost) and again on NOGROUP;
- on start it re-reads its own pending entries, then new ones;
- it acks an entry only after the handler returned (the effect is done);
- a handler that raises is retried after a short backoff while other entries
  keep flowing; a delivery is counted by Redis (the pending entry list), so
  the count survives crashes; past ``max_deliveries`` the entry goes to the
  dead-letter stream with the reason, then is acked;
- an entry that is not one ``msg`` field, is larger than ``max_entry_bytes``
  (the dead letter keeps a bounded prefix and says the size), does not
  decode, or whose handler raises ``PermanentError``, is dead-lettered at once;
- Redis being unreachable is never fatal: every call retries with a capped
  backoff (and a log line) until it succeeds or the consumer is stopped; a
  handler that failed only because Redis was unreachable is retried without
  that attempt counting towards ``max_deliveries``; a failure to ack or to
  dead-letter leaves the entry pending for a later retry instead of killing
  the consumer;
- entries left idle longer than ``reclaim_idle_s`` by a dead consumer are
  taken over (``XAUTOCLAIM``); a live consumer renews the lease of the entries
  it is handling, so a slow handler is not handed to a second consumer;
- ``concurrency`` bounds the handlers in flight, and only as many entries as
  there are free slots are read (backpressure);
- on stop it reads nothing more, lets in-flight handlers finish within a
  bound, acks those (the ack is shielded from cancellation) and cancels the
  rest, which stay pending for redelivery.

The dead-letter consumer uses the same loop with two differences: an entry
is a ``DeadLetter`` (flat fields, not ``msg``), and what it cannot handle (an
entry that is not a dead letter, a handler that raised) is logged and acked,
never dead-lettered again.

The Redis client must return bytes (``decode_responses=False``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis import Redis as SyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import messages, metrics
from shared.config import DEFAULT_STREAM_MAXLEN, DEFAULT_STREAM_PREFIX

log = structlog.get_logger(__name__)

PAYLOAD_FIELD = "msg"
DEAD_LETTER_STREAM = "dead_letters"
# Streams whose name needs a ``:<shard>`` / ``:<worker>`` suffix.
SUFFIXED_STREAMS = frozenset({"train_jobs", "reward"})

READ_BLOCK_MS = 500  # longest wait for new entries before re-checking stop/retries
RETRY_BACKOFF_S = 0.2  # first retry of a failed handler; doubles per delivery
MAX_RETRY_BACKOFF_S = 5.0
MAX_REDIS_RETRY_DELAY_S = 2.0  # an unreachable Redis is retried this often at most, until stop
CANCEL_GRACE_S = 2.0  # how long cancelled handlers get to unwind
SETTLE_TIMEOUT_S = 5.0  # bound on the final acks after a drain
MAX_REASON_CHARS = 2000
DEFAULT_MAX_ENTRY_BYTES = 16 * 1024 * 1024
OVERSIZED_PAYLOAD_KEPT_BYTES = 1024  # what a dead letter keeps of an entry over max_entry_bytes
MAX_FIELD_NAMES_SHOWN = 5
TAIL_READ_BLOCK_MS = 1000  # one read of a tail waits this long at most for new entries
TAIL_READ_COUNT = 100
TAIL_RETRY_FIRST_DELAY_S = 0.1  # Redis unreachable: a tail's first retry, doubling up to MAX_REDIS_RETRY_DELAY_S

RETRYABLE_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Replies of a server that is up but cannot serve yet (loading its data,
# a failover, memory pressure): worth waiting for, like a dropped connection.
TRANSIENT_REPLY_PREFIXES = ("LOADING", "BUSY", "TRYAGAIN", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "OOM", "MISCONF")


class PermanentError(Exception):
    """Raised by a handler: this entry can never succeed; dead-letter it now."""


class EntryRejected(Exception):
    """Raised by a decoder: this entry cannot be handled. ``reason`` says why;
    ``payload`` is what its dead letter keeps."""

    def __init__(self, reason: str, payload: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload


@dataclass(frozen=True)
class Entry:
    """Where a message came from. ``deliveries`` counts this delivery (1 = first)."""

    stream: str  # without prefix, e.g. "train_jobs:0"
    entry_id: str
    deliveries: int


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry as read, before decoding. ``stream`` is without
    prefix; ``fields`` is empty when the entry was trimmed while pending."""

    stream: str
    entry_id: str
    fields: dict


@dataclass(frozen=True)
class DeadLetter:
    """One entry of ``<prefix>dead_letters``. ``payload`` is the original ``msg``
    bytes (empty when the entry had none)."""

    dead_letter_id: str
    stream: str
    entry_id: str
    group: str
    consumer: str
    deliveries: int
    reason: str
    payload: bytes


# What ``StreamBus.dead_letter`` always writes and what a reader needs to act
# on a dead letter; its other fields only inform.
DEAD_LETTER_REQUIRED_FIELDS = ("stream", "reason", "payload")

# A handler takes the message (of its stream's kinds: typed by the handler) and where it came from.
Handler = Callable[[Any, Entry], Awaitable[None]]
DeadLetterHandler = Callable[[DeadLetter], Awaitable[None]]
# A stream entry -> (what the handler gets, the payload a dead letter keeps);
# raises ``EntryRejected``. The int is the consumer's ``max_entry_bytes``.
Decoder = Callable[[StreamEntry, int], "tuple[Any, bytes]"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _field_text(value: bytes | str) -> str:
    """A field of a hostile entry as text, whatever bytes it holds."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def is_redis_outage(exc: BaseException) -> bool:
    """True for errors that mean "Redis is not reachable or not serving now",
    which a loop waits out (retrying) instead of dying on."""
    if isinstance(exc, ResponseError):
        return str(exc).startswith(TRANSIENT_REPLY_PREFIXES)
    return isinstance(exc, RETRYABLE_REDIS_ERRORS)


def _is_connection_failure(exc: BaseException) -> bool:
    """A handler error caused by Redis being away (not the handler's own
    ``OSError``s, such as a missing file, which must count as failures)."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or (
        isinstance(exc, ResponseError) and str(exc).startswith(TRANSIENT_REPLY_PREFIXES)
    )


# ---------------------------------------------------------------- the wire format (pure)


def entry_fields(message: messages.Message) -> dict[str, bytes]:
    """The fields of the stream entry that carries ``message``."""
    return {PAYLOAD_FIELD: messages.encode(message)}


def check_stream_carries(stream: str, message: messages.Message) -> None:
    """Raise unless ``stream`` (without prefix) carries messages of this kind."""
    base = messages.base_stream(stream)
    kinds = messages.STREAM_KINDS.get(base)
    if kinds is None:
        raise ValueError(f"unknown stream {stream!r}")
    if not isinstance(message, kinds):
        raise TypeError(f"stream {stream!r} does not carry {type(message).__name__}")
    if base in SUFFIXED_STREAMS and base == stream:
        raise ValueError(f"stream {base!r} needs a suffix, e.g. {base}:0")


def parse_entries(response, prefix: str) -> list[StreamEntry]:
    """Every entry of an XREAD / XREADGROUP reply (RESP2 list or RESP3 dict),
    oldest first within each stream, streams named without ``prefix``."""
    if not response:
        return []
    batches = [(key, value[0]) for key, value in response.items()] if isinstance(response, dict) else response
    return [StreamEntry(_text(key).removeprefix(prefix), _text(entry_id), fields or {})
            for key, entries in batches for entry_id, fields in entries]


def decode_message_entry(entry: StreamEntry, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
                         ) -> tuple[messages.Message, bytes]:
    """The message an entry carries, and its payload; ``EntryRejected`` with
    the reason when the entry is not one message of its stream's kinds."""
    refusal, payload = entry_refusal(entry.fields, max_entry_bytes)
    if refusal is not None:
        raise EntryRejected(refusal, payload)
    try:
        return messages.decode(payload, entry.stream), payload
    except messages.MessageDecodeError as exc:
        raise EntryRejected(f"cannot decode message: {exc}", payload) from None


def decode_dead_letter_entry(entry: StreamEntry, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
                             ) -> tuple[DeadLetter, bytes]:
    """The dead letter an entry of the dead-letter stream holds (its payload is
    in the letter, so none is returned); ``EntryRejected`` when the entry is
    too large or lacks a field of ``DEAD_LETTER_REQUIRED_FIELDS``."""
    size = sum(_byte_size(k) + _byte_size(v) for k, v in entry.fields.items())
    if size > max_entry_bytes:
        raise EntryRejected(f"entry is {size} bytes, over the limit of {max_entry_bytes} bytes (max_entry_bytes)")
    missing = [name for name in DEAD_LETTER_REQUIRED_FIELDS if name.encode() not in entry.fields]
    if missing:
        raise EntryRejected(f"not a dead letter: no {', '.join(map(repr, missing))} field "
                            f"(fields: {_field_names(entry.fields)})")
    return _dead_letter_from(entry.entry_id, entry.fields), b""


def _dead_letter_from(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    def field(name: str) -> str:
        return _field_text(fields.get(name.encode(), b""))

    deliveries = field("deliveries")
    return DeadLetter(
        dead_letter_id=_text(entry_id), stream=field("stream"), entry_id=field("entry_id"), group=field("group"),
        consumer=field("consumer"), deliveries=int(deliveries) if deliveries.isdecimal() else 0,
        reason=field("reason"), payload=_as_bytes(fields.get(b"payload", b"")),
    )


# ---------------------------------------------------------------- the buses


class _BusBase:
    """What the async and the sync bus share: keys, the publish checks, the cap."""

    def __init__(self, redis, prefix: str = DEFAULT_STREAM_PREFIX,
                 maxlen: int = DEFAULT_STREAM_MAXLEN) -> None:
        if redis.get_encoder().decode_responses:
            raise ValueError(f"{type(self).__name__} needs a Redis client with decode_responses=False "
                             "(payloads are bytes)")
        self.redis = redis
        self.prefix = prefix
        self.maxlen = maxlen

    def key(self, stream: str) -> str:
        return self.prefix + stream

    def publish_in(self, pipe, message: messages.Message, stream: str | None = None) -> None:
        """Queue the XADD of ``message`` on ``pipe`` (a pipeline or MULTI of
        this bus's Redis), with ``publish``'s checks and cap; it is written
        when the pipeline executes, together with the pipeline's other commands."""
        key, fields = self._entry_for(message, stream)
        pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)

    def _entry_for(self, message: messages.Message, stream: str | None) -> tuple[str, dict[str, bytes]]:
        """The key and fields of ``message``'s entry (default stream: its kind's)."""
        stream = stream or messages.stream_for(message)
        check_stream_carries(stream, message)
        return self.key(stream), entry_fields(message)

    def _keys_of(self, positions: Mapping[str, str]) -> dict[str, str]:
        return {self.key(stream): entry_id for stream, entry_id in positions.items()}


class StreamBus(_BusBase):
    """Publishes messages, reads broadcast streams and builds consumers for
    one key prefix (``redis.asyncio``)."""

    def __init__(self, redis: aioredis.Redis, prefix: str = DEFAULT_STREAM_PREFIX,
                 maxlen: int = DEFAULT_STREAM_MAXLEN) -> None:
        super().__init__(redis, prefix, maxlen)

    async def publish(self, message: messages.Message, stream: str | None = None) -> str:
        """Append ``message`` to ``stream`` (default: the stream of its kind); returns the entry id."""
        key, fields = self._entry_for(message, stream)
        return _text(await self.redis.xadd(key, fields, maxlen=self.maxlen, approximate=True))

    async def tail(self, positions: Mapping[str, str], *, block_ms: int | None, count: int) -> list[StreamEntry]:
        """One read of broadcast streams, without a consumer group: the
        entries after each stream's position (stream -> entry id, ``"0-0"``:
        from the oldest kept), waiting up to ``block_ms`` for one (None: not
        at all); [] when none came. The caller keeps the positions."""
        response = await self.redis.xread(self._keys_of(positions), count=count, block=block_ms)
        return parse_entries(response, self.prefix)

    async def stream_end(self, stream: str) -> str:
        """The id of ``stream``'s newest entry (``"0-0"`` when empty): a tail
        from there sees only what is added from now on."""
        newest = await self.redis.xrevrange(self.key(stream), count=1)
        return _text(newest[0][0]) if newest else "0-0"

    def consumer(self, stream: str, group: str, handler: Handler, *, consumer_name: str,
                 **options: Any) -> StreamConsumer:
        """A consumer of ``stream`` through ``group``; ``options``: those of ``StreamConsumer``."""
        return StreamConsumer(self, stream, group, handler, consumer_name=consumer_name, **options)

    def dead_letter_consumer(self, group: str, handler: DeadLetterHandler, *, consumer_name: str,
                             **options: Any) -> StreamConsumer:
        """A consumer of the dead-letter stream through ``group`` (created at the
        stream's start, so letters written before it are read too). Each
        ``DeadLetter`` goes to ``handler``, then is acked. An entry that is not
        a dead letter, or a handler that raised, is logged and acked: a dead
        letter is never dead-lettered again. A handler that failed because
        Redis was away gets the letter again once it is back."""

        async def handle(letter: DeadLetter, entry: Entry) -> None:
            try:
                await handler(letter)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_connection_failure(exc):
                    raise  # the consumer retries it, not counting the attempt
                log.error("dead_letter_handler_failed", group=group, dead_letter_id=letter.dead_letter_id,
                          stream=letter.stream, exc_info=True)

        return StreamConsumer(self, DEAD_LETTER_STREAM, group, handle, consumer_name=consumer_name,
                              decoder=decode_dead_letter_entry, dead_letter_rejects=False, **options)

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create ``group`` on ``stream`` (and the stream) unless it exists.
        A new group starts at ``start_id``: the beginning of the stream, or
        ``"$"`` for only what is added from now on."""
        try:
            await self.redis.xgroup_create(self.key(stream), group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def dead_letter(
        self, stream: str, entry_id: str, group: str, consumer: str, deliveries: int, reason: str, payload: bytes
    ) -> None:
        """Write the entry to ``<prefix>dead_letters``, then ack it. Not one
        MULTI: a MULTI runs the ack even when the write fails (Redis does not
        roll back), and the entry would be lost. A crash between the two
        leaves the entry pending: it is dead-lettered again (at least once)."""
        fields = {
            "stream": stream, "entry_id": entry_id, "group": group, "consumer": consumer,
            "deliveries": str(deliveries), "reason": reason[:MAX_REASON_CHARS], "payload": payload,
        }
        await self.redis.xadd(self.key(DEAD_LETTER_STREAM), fields, maxlen=self.maxlen, approximate=True)
        metrics.dead_lettered(stream, reason)
        await self.redis.xack(self.key(stream), group, entry_id)

    async def dead_letters(self, stream: str | None = None) -> list[DeadLetter]:
        """Every dead letter (oldest first), only those of ``stream`` when given."""
        entries = await self.redis.xrange(self.key(DEAD_LETTER_STREAM))
        letters = [_dead_letter_from(entry_id, fields) for entry_id, fields in entries]
        return [d for d in letters if stream is None or d.stream == stream]


class SyncStreamBus(_BusBase):
    """The same publish and tail over a synchronous ``redis.Redis``, for
    callers outside the services (the client, the CLI)."""

    def __init__(self, redis: SyncRedis, prefix: str = DEFAULT_STREAM_PREFIX,
                 maxlen: int = DEFAULT_STREAM_MAXLEN) -> None:
        super().__init__(redis, prefix, maxlen)

    def publish(self, message: messages.Message, stream: str | None = None) -> str:
        """See ``StreamBus.publish``."""
        key, fields = self._entry_for(message, stream)
        return _text(self.redis.xadd(key, fields, maxlen=self.maxlen, approximate=True))

    def tail(self, positions: Mapping[str, str], *, block_ms: int | None, count: int) -> list[StreamEntry]:
        """See ``StreamBus.tail``."""
        return parse_entries(self.redis.xread(self._keys_of(positions), count=count, block=block_ms), self.prefix)

    def stream_end(self, stream: str) -> str:
        """See ``StreamBus.stream_end``."""
        newest = self.redis.xrevrange(self.key(stream), count=1)
        return _text(newest[0][0]) if newest else "0-0"


class StreamTail:
    """Follows broadcast streams for a long-lived reader (every reader sees
    every entry; nothing is acked). ``last_ids`` holds, per stream, the last
    entry handled: an entry whose handling failed because Redis was away is
    read again once it is back, so none is skipped; an entry whose handler
    raised anything else is logged and passed (one hostile entry must not
    stop the stream). Redis being unreachable is retried with a capped
    backoff until ``follow``'s ``until`` holds."""

    def __init__(self, bus: StreamBus, streams: list[str], *, count: int = TAIL_READ_COUNT,
                 block_ms: int = TAIL_READ_BLOCK_MS, retry_event: str = "stream_tail_read_retrying") -> None:
        self.bus = bus
        self.count = count
        self.block_ms = block_ms
        self.retry_event = retry_event  # the log line of a retry, so each reader's outage is recognisable
        self.last_ids: dict[str, str] = {stream: "0-0" for stream in streams}

    async def start_at_end(self) -> None:
        """Follow only what is added from now on."""
        for stream in self.last_ids:
            self.last_ids[stream] = await self.bus.stream_end(stream)

    async def read(self) -> list[StreamEntry]:
        """The next entries after ``last_ids`` (which ``advance`` moves)."""
        return await self.bus.tail(self.last_ids, block_ms=self.block_ms, count=self.count)

    def advance(self, entry: StreamEntry) -> None:
        self.last_ids[entry.stream] = entry.entry_id

    async def follow(self, handle: Callable[[StreamEntry], Awaitable[None]], until: Callable[[], bool]) -> None:
        """Hand each new entry to ``handle`` until ``until()`` is true."""
        delay_s = TAIL_RETRY_FIRST_DELAY_S
        while not until():
            try:
                await self._read_and_handle(handle)
                delay_s = TAIL_RETRY_FIRST_DELAY_S
            except (*RETRYABLE_REDIS_ERRORS, ResponseError) as exc:
                log.warning(self.retry_event, streams=list(self.last_ids), error=repr(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, MAX_REDIS_RETRY_DELAY_S)

    async def _read_and_handle(self, handle: Callable[[StreamEntry], Awaitable[None]]) -> None:
        for entry in await self.read():
            try:
                await handle(entry)
            except (*RETRYABLE_REDIS_ERRORS, ResponseError):
                raise  # read again from this entry once Redis is back
            except Exception:
                log.exception("stream_tail_entry_skipped", stream=entry.stream, entry_id=entry.entry_id)
            self.advance(entry)


@dataclass(frozen=True)
class _Delivery:
    """An entry handed to this consumer, before decoding. Empty ``fields``: the
    entry was trimmed from the stream while pending."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int


class StreamConsumer:
    """Consumes one stream through one consumer group; see the module doc.

    ``decoder`` turns an entry into what ``handler`` gets (default: the
    message of its ``msg`` field). ``dead_letter_rejects``: an entry that
    cannot be handled goes to the dead-letter stream (True), or is logged
    and acked (False: for the dead-letter stream itself)."""

    def __init__(
        self,
        bus: StreamBus,
        stream: str,
        group: str,
        handler: Handler,
        *,
        consumer_name: str,
        max_deliveries: int = 5,
        reclaim_idle_s: float = 30.0,
        batch_size: int = 16,
        concurrency: int = 1,
        retry_backoff_s: float = RETRY_BACKOFF_S,
        drain_timeout_s: float = 20.0,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        decoder: Decoder = decode_message_entry,
        dead_letter_rejects: bool = True,
    ) -> None:
        if concurrency < 1 or batch_size < 1 or max_deliveries < 1 or max_entry_bytes < 1:
            raise ValueError("concurrency, batch_size, max_deliveries and max_entry_bytes must be >= 1")
        if reclaim_idle_s <= 0:
            raise ValueError("reclaim_idle_s must be > 0")
        if not consumer_name:
            raise ValueError("consumer_name is required")
        # fixed at construction
        self.bus = bus
        self.stream = stream
        self.group = group
        self.handler = handler
        self.consumer_name = consumer_name
        self.max_deliveries = max_deliveries
        self.reclaim_idle_s = reclaim_idle_s
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retry_backoff_s = retry_backoff_s
        self.drain_timeout_s = drain_timeout_s
        self.max_entry_bytes = max_entry_bytes
        self.decoder = decoder
        self.dead_letter_rejects = dead_letter_rejects
        self.key = bus.key(stream)
        self._redis = bus.redis
        self._log = log.bind(stream=stream, group=group, consumer=consumer_name)
        # reset by run()
        self._inflight: dict[str, asyncio.Task] = {}
        self._settling: set[asyncio.Task] = set()
        self._retry_due: dict[str, float] = {}  # entry id -> monotonic time of the next attempt
        self._uncounted: dict[str, int] = {}  # entry id -> delivery count to keep (failed over a Redis outage)
        self._stop: asyncio.Event = asyncio.Event()
        self._backlog_cursor: str | None = "0"  # own pending entries still to re-read; None: done
        self._autoclaim_cursor = "0-0"
        self._next_autoclaim_at = 0.0
        self._fatal: BaseException | None = None
        # counters for status()
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0
        self.rejected = 0  # logged and acked (dead_letter_rejects=False)

    # ------------------------------------------------------------ public

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def status(self) -> dict[str, int | str]:
        return {
            "stream": self.stream, "group": self.group, "in_flight": self.in_flight,
            "retrying": len(self._retry_due), "handled": self.handled, "failed": self.failed,
            "dead_lettered": self.dead_lettered, "rejected": self.rejected,
        }

    async def run(self, stop: asyncio.Event, drain_timeout_s: float | None = None) -> None:
        """Consume until ``stop`` is set, then drain in-flight handlers for at most
        ``drain_timeout_s`` (default: the consumer's own) and return.
        An unreachable Redis is waited for (not an error); raises only on an
        unexpected Redis reply or a bug."""
        self._reset()
        self._stop = stop
        await self._redis_call(lambda: self.bus.ensure_group(self.stream, self.group))
        self._log.info("consumer_started", concurrency=self.concurrency, max_deliveries=self.max_deliveries)
        stop_waiter = asyncio.create_task(stop.wait(), name=f"stop-waiter:{self.key}:{self.consumer_name}")
        lease_renewal = asyncio.create_task(self._renew_leases(), name=f"lease-renewal:{self.key}:{self.consumer_name}")
        try:
            await self._consume(stop, stop_waiter, lease_renewal)
        except RETRYABLE_REDIS_ERRORS:
            if not stop.is_set():
                await self._abandon_inflight()
                raise
            # stopped while Redis was away: nothing more to read; drain below
        except BaseException:
            await self._abandon_inflight()
            raise
        finally:
            stop_waiter.cancel()
            lease_renewal.cancel()
        await self._drain(self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        await self._forget_consumer_if_idle()

    # ------------------------------------------------------------ main loop

    def _reset(self) -> None:
        self._inflight.clear()
        self._retry_due.clear()
        self._uncounted.clear()
        self._backlog_cursor = "0"
        self._autoclaim_cursor = "0-0"
        self._next_autoclaim_at = 0.0
        self._fatal = None

    async def _consume(self, stop: asyncio.Event, stop_waiter: asyncio.Task, lease_renewal: asyncio.Task) -> None:
        while not stop.is_set():
            self._raise_if_broken(lease_renewal)
            free_slots = self.concurrency - len(self._inflight)
            if free_slots <= 0:
                await asyncio.wait(
                    [*self._inflight.values(), stop_waiter, lease_renewal], return_when=asyncio.FIRST_COMPLETED
                )
                continue
            # Entries read while stop was being set are handled too: they are
            # in our pending list already, and the drain gives them their bound.
            for delivery in await self._next_deliveries(min(free_slots, self.batch_size)):
                await self._dispatch(delivery)

    def _raise_if_broken(self, lease_renewal: asyncio.Task) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"consumer {self.consumer_name} on {self.key} failed: {self._fatal!r}") from self._fatal
        if lease_renewal.done() and not lease_renewal.cancelled():
            raise RuntimeError(f"lease renewal of {self.key} stopped") from lease_renewal.exception()

    async def _next_deliveries(self, count: int) -> list[_Delivery]:
        """Sources in priority order: due retries, entries abandoned by dead
        consumers, our own pending entries (after a restart), new entries."""
        now = time.monotonic()
        due_ids = [entry_id for entry_id, due in self._retry_due.items() if due <= now][:count]
        if due_ids:
            return await self._claim_retries(due_ids)
        if now >= self._next_autoclaim_at:
            reclaimed = await self._autoclaim(count)
            if reclaimed:
                return reclaimed
        if self._backlog_cursor is not None:
            return await self._read_backlog(count)
        return await self._read_new(count, self._read_block_ms(now))

    def _read_block_ms(self, now: float) -> int | None:
        """Block for new entries, but not past the next retry or reclaim scan."""
        wake_at = min([now + READ_BLOCK_MS / 1000, self._next_autoclaim_at, *self._retry_due.values()])
        block_ms = int((wake_at - now) * 1000)
        return block_ms if block_ms >= 1 else None  # None: do not block (0 would block forever)

    # ------------------------------------------------------------ reading

    async def _read_new(self, count: int, block_ms: int | None) -> list[_Delivery]:
        response = await self._redis_call(
            lambda: self._redis.xreadgroup(self.group, self.consumer_name, {self.key: ">"}, count=count, block=block_ms)
        )
        return [_Delivery(entry.entry_id, entry.fields, 1) for entry in parse_entries(response, self.bus.prefix)]

    async def _read_backlog(self, count: int) -> list[_Delivery]:
        """Our own pending entries (id "0" onwards): left by a previous run of
        this consumer name. Each read counts as a delivery in Redis."""
        cursor = self._backlog_cursor
        response = await self._redis_call(
            lambda: self._redis.xreadgroup(self.group, self.consumer_name, {self.key: cursor}, count=count)
        )
        entries = parse_entries(response, self.bus.prefix)
        if not entries:
            self._backlog_cursor = None
            return []
        self._backlog_cursor = entries[-1].entry_id
        fresh = [(e.entry_id, e.fields) for e in entries if e.entry_id not in self._inflight
                 and e.entry_id not in self._retry_due]
        if fresh:
            self._log.info("pending_entries_reread", count=len(fresh))
        return await self._with_delivery_counts(fresh)

    async def _autoclaim(self, count: int) -> list[_Delivery]:
        min_idle_ms = int(self.reclaim_idle_s * 1000)
        cursor = self._autoclaim_cursor
        response = await self._redis_call(
            lambda: self._redis.xautoclaim(
                self.key, self.group, self.consumer_name, min_idle_ms, start_id=cursor, count=count
            )
        )
        next_cursor, claimed = _text(response[0]), response[1]
        deleted = response[2] if len(response) > 2 else []
        self._autoclaim_cursor = next_cursor
        if next_cursor == "0-0":  # scan complete: wait before the next one
            self._next_autoclaim_at = time.monotonic() + self.reclaim_idle_s / 2
        if deleted:
            self._log.warning("reclaimed_entries_were_trimmed", entry_ids=[_text(i) for i in deleted])
        fresh = []
        for entry_id, fields in claimed:
            entry_id = _text(entry_id)
            if entry_id in self._inflight:
                continue  # our own slow handler; it still owns the entry
            self._retry_due.pop(entry_id, None)
            fresh.append((entry_id, fields))
        if fresh:
            self._log.info("idle_entries_reclaimed", entry_ids=[i for i, _ in fresh])
        return await self._with_delivery_counts(fresh)

    async def _claim_retries(self, entry_ids: list[str]) -> list[_Delivery]:
        """Take failed entries again (XCLAIM counts the delivery). An entry that
        someone else claimed meanwhile (recently delivered) or acked is skipped."""
        for entry_id in entry_ids:
            del self._retry_due[entry_id]
        min_idle_ms = int(self.retry_backoff_s * 1000 / 2)
        counted = [i for i in entry_ids if i not in self._uncounted]
        claimed = []
        if counted:
            claimed += await self._redis_call(
                lambda: self._redis.xclaim(self.key, self.group, self.consumer_name, min_idle_ms, counted)
            )
        for entry_id in [i for i in entry_ids if i in self._uncounted]:
            # RETRYCOUNT: an attempt that failed only because Redis was away is not a delivery
            kept = self._uncounted.pop(entry_id)
            claimed += await self._redis_call(functools.partial(
                self._redis.xclaim, self.key, self.group, self.consumer_name, min_idle_ms, [entry_id], retrycount=kept
            ))
        return await self._with_delivery_counts([(_text(i), f) for i, f in claimed])

    async def _with_delivery_counts(self, entries: Sequence[tuple[str, dict | None]]) -> list[_Delivery]:
        deliveries = []
        for entry_id, fields in entries:
            pending = await self._redis_call(
                functools.partial(self._redis.xpending_range, self.key, self.group, entry_id, entry_id, 1)
            )
            if not pending:
                continue  # acked by someone meanwhile
            deliveries.append(_Delivery(entry_id, fields or {}, int(pending[0]["times_delivered"])))
        return deliveries

    async def _redis_call(self, call: Callable[[], Awaitable]):
        """Run one Redis command: recreate the group on NOGROUP; while Redis is
        unreachable (or not serving yet), retry with a capped backoff for as
        long as the consumer is not stopping. Once it is, the outage error is
        raised, so a stop ends the consumer promptly even without Redis."""
        delay_s = 0.1
        recreate_group = False
        outage_since: float | None = None
        while True:
            try:
                if recreate_group:
                    await self.bus.ensure_group(self.stream, self.group)
                    recreate_group = False
                result = await call()
            except ResponseError as exc:
                if _is_nogroup(exc):
                    self._log.warning("consumer_group_missing_recreating")
                    recreate_group = True
                    continue
                if not is_redis_outage(exc):
                    raise
                error: BaseException = exc
            except RETRYABLE_REDIS_ERRORS as exc:
                error = exc
            else:
                if outage_since is not None:
                    self._log.info("redis_reachable_again", outage_s=round(time.monotonic() - outage_since, 2))
                return result
            if self._stop.is_set():
                raise error if isinstance(error, RETRYABLE_REDIS_ERRORS) else RedisConnectionError(str(error))
            outage_since = outage_since or time.monotonic()
            self._log.warning("redis_unavailable_retrying", error=repr(error), retry_in_s=delay_s)
            await _wait_for(self._stop, delay_s)
            delay_s = min(delay_s * 2, MAX_REDIS_RETRY_DELAY_S)

    # ------------------------------------------------------------ handling

    async def _dispatch(self, delivery: _Delivery) -> None:
        """Decode and start the handler, or dead-letter what cannot be handled."""
        entry = Entry(self.stream, delivery.entry_id, delivery.deliveries)
        with structlog.contextvars.bound_contextvars(stream=self.stream, entry_id=entry.entry_id):
            if not delivery.fields:
                self._log.warning("pending_entry_was_trimmed")
                await self._settle_ack(entry)
                return
            try:
                item, payload = self.decoder(StreamEntry(self.stream, entry.entry_id, delivery.fields),
                                             self.max_entry_bytes)
            except EntryRejected as rejected:
                await self._reject(entry, rejected.reason, rejected.payload)
                return
            if entry.deliveries > self.max_deliveries:
                reason = (f"delivered {entry.deliveries} times without an ack "
                          f"(its consumers died or were stopped while handling it)")
                await self._reject(entry, reason, payload)
                return
            task = asyncio.create_task(self._handle(entry, item, payload), name=f"handle:{self.key}:{entry.entry_id}")
        self._inflight[entry.entry_id] = task
        task.add_done_callback(functools.partial(self._handler_done, entry.entry_id))

    def _handler_done(self, entry_id: str, task: asyncio.Task) -> None:
        self._inflight.pop(entry_id, None)
        if not task.cancelled() and task.exception() is not None and self._fatal is None:
            self._fatal = task.exception()  # _handle catches handler errors: this is a bus failure

    async def _handle(self, entry: Entry, item: Any, payload: bytes) -> None:
        kind = "dead_letter" if isinstance(item, DeadLetter) else messages.kind_of(item)
        with structlog.contextvars.bound_contextvars(stream=entry.stream, entry_id=entry.entry_id, kind=kind):
            started = time.monotonic()
            error: str | None = None
            outcome = "ok"
            try:
                await self.handler(item, entry)
            except asyncio.CancelledError:
                raise
            except PermanentError as exc:
                error, outcome = f"permanent error: {exc}", "permanent"
                self._log.warning("handler_permanent_error", error=str(exc))
            except Exception as exc:
                error, outcome = f"{type(exc).__name__}: {exc}", "failed"
                if _is_connection_failure(exc):
                    outcome = "redis_outage"
                    self._log.warning("handler_failed_redis_unavailable", error=repr(exc))
                else:
                    self._log.warning("handler_failed", deliveries=entry.deliveries, exc_info=True)
            metrics.message_settled(entry.stream, kind, outcome, time.monotonic() - started)
            settle = asyncio.create_task(
                self._settle_logged(entry, payload, error, outcome, time.monotonic() - started),
                name=f"settle:{self.key}:{entry.entry_id}",
            )
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
            # A stop that cancels this handler now must not lose the ack.
            await asyncio.shield(settle)

    async def _settle_logged(self, entry: Entry, payload: bytes, error: str | None, outcome: str,
                             took_s: float) -> None:
        """``_settle``; a failure to settle leaves the entry pending (it is
        retried later) and never takes the consumer down."""
        try:
            await self._settle(entry, payload, error, outcome, took_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.error("settle_failed", error=repr(exc), exc_info=not is_redis_outage(exc))
            self._retry_later(entry.entry_id, MAX_RETRY_BACKOFF_S)

    async def _settle(self, entry: Entry, payload: bytes, error: str | None, outcome: str, took_s: float) -> None:
        if error is None:
            await self._redis_call(lambda: self._redis.xack(self.key, self.group, entry.entry_id))
            self.handled += 1
            self._log.debug("message_handled", took_s=round(took_s, 4))
            return
        self.failed += 1
        if outcome == "permanent":
            await self._reject(entry, error, payload)
        elif outcome == "redis_outage":
            self._uncounted[entry.entry_id] = entry.deliveries
            self._retry_later(entry.entry_id, self.retry_backoff_s)
        elif entry.deliveries >= self.max_deliveries:
            await self._reject(entry, f"failed {entry.deliveries} deliveries; last error: {error}", payload)
        else:
            backoff_s = min(self.retry_backoff_s * 2 ** (entry.deliveries - 1), MAX_RETRY_BACKOFF_S)
            self._retry_later(entry.entry_id, backoff_s)

    def _retry_later(self, entry_id: str, backoff_s: float) -> None:
        if not self._stop.is_set():  # after a stop the entry stays pending for the next run
            self._retry_due[entry_id] = time.monotonic() + backoff_s

    async def _settle_ack(self, entry: Entry) -> None:
        try:
            await self._redis_call(lambda: self._redis.xack(self.key, self.group, entry.entry_id))
        except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
            self._log.error("ack_failed", error=repr(exc))
            self._retry_later(entry.entry_id, MAX_RETRY_BACKOFF_S)

    async def _reject(self, entry: Entry, reason: str, payload: bytes) -> None:
        """Give up on an entry: dead-letter and ack it, or (``dead_letter_rejects``
        False) log and ack it. When that fails (an odd reply, Redis gone at
        stop), the entry stays pending and is tried again later."""
        if not self.dead_letter_rejects:
            self._log.error("entry_rejected", entry_id=entry.entry_id, deliveries=entry.deliveries, reason=reason)
            self.rejected += 1
            await self._settle_ack(entry)
            return
        try:
            await self._redis_call(
                lambda: self.bus.dead_letter(
                    entry.stream, entry.entry_id, self.group, self.consumer_name, entry.deliveries, reason, payload
                )
            )
        except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
            self._log.error("dead_letter_failed", entry_id=entry.entry_id, reason=reason, error=repr(exc))
            self._retry_later(entry.entry_id, MAX_RETRY_BACKOFF_S)
            return
        self.dead_lettered += 1
        self._log.error("message_dead_lettered", entry_id=entry.entry_id, deliveries=entry.deliveries, reason=reason)

    async def _renew_leases(self) -> None:
        """Reset the idle time of entries being handled (XCLAIM JUSTID does not
        count a delivery), so only a dead consumer's entries look abandoned."""
        interval_s = self.reclaim_idle_s / 3
        while True:
            await asyncio.sleep(interval_s)
            entry_ids = list(self._inflight)
            if not entry_ids:
                continue
            try:
                await self._redis.xclaim(self.key, self.group, self.consumer_name, 0, entry_ids, justid=True)
            except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
                # Redis away, or the group gone (the main loop recreates it):
                # the lease lapses at worst, and the next renewal tries again.
                self._log.warning("lease_renewal_failed", error=repr(exc))

    # ------------------------------------------------------------ stopping

    async def _drain(self, timeout_s: float) -> None:
        """Let in-flight handlers finish within ``timeout_s``; cancel the rest
        (they stay pending and are redelivered later)."""
        inflight = list(self._inflight.values())
        finished: set[asyncio.Task] = set()
        unfinished: set[asyncio.Task] = set()
        if inflight:
            self._log.info("draining", in_flight=len(inflight), timeout_s=timeout_s)
            finished, unfinished = await asyncio.wait(inflight, timeout=timeout_s)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=CANCEL_GRACE_S)
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=SETTLE_TIMEOUT_S)
        self._log.info(
            "consumer_stopped", finished=len(finished), cancelled=len(unfinished), retry_pending=len(self._retry_due)
        )
        if self._fatal is not None:
            raise RuntimeError(f"consumer {self.consumer_name} on {self.key} failed: {self._fatal!r}") from self._fatal

    async def _abandon_inflight(self) -> None:
        """On failure or cancellation: cancel handlers; their entries stay pending."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)

    async def _forget_consumer_if_idle(self) -> None:
        """Remove this consumer from the group when it owns no pending entry, so
        consumer names with a pid do not pile up across restarts."""
        try:
            pending = await self._redis.xpending_range(
                self.key, self.group, "-", "+", 1, consumername=self.consumer_name
            )
            if not pending:
                await self._redis.xgroup_delconsumer(self.key, self.group, self.consumer_name)
        except (ResponseError, *RETRYABLE_REDIS_ERRORS) as exc:
            self._log.warning("consumer_cleanup_skipped", error=repr(exc))


async def _wait_for(event: asyncio.Event, timeout_s: float) -> None:
    """Sleep ``timeout_s``, or less when ``event`` is set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass


def entry_refusal(fields: dict, max_entry_bytes: int) -> tuple[str | None, bytes]:
    """Why a stream entry cannot be a message, before decoding it (None: it
    may be one), and the payload its dead letter keeps. One rule for every
    reader of a stream, group consumer or not."""
    size = sum(_byte_size(k) + _byte_size(v) for k, v in fields.items())
    payload = fields.get(PAYLOAD_FIELD.encode())
    if size > max_entry_bytes:
        kept = _as_bytes(payload if payload is not None else b"")[:OVERSIZED_PAYLOAD_KEPT_BYTES]
        return (f"entry is {size} bytes, over the limit of {max_entry_bytes} bytes (max_entry_bytes); "
                f"not decoded; this dead letter keeps its first {len(kept)} payload bytes"), kept
    names = _field_names(fields)
    if payload is None:
        return f"entry has no {PAYLOAD_FIELD!r} field (fields: {names})", b""
    if len(fields) > 1:
        return f"entry has fields other than {PAYLOAD_FIELD!r} (fields: {names})", _as_bytes(payload)
    if not isinstance(payload, bytes):
        return f"payload is {type(payload).__name__}, not bytes", _as_bytes(payload)
    return None, payload


def _byte_size(value) -> int:
    return len(value) if isinstance(value, (bytes, str)) else len(repr(value))


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode(errors="replace") if isinstance(value, str) else repr(value).encode()


def _field_names(fields: dict) -> list[str]:
    """A bounded, printable list of an entry's field names (they are hostile input)."""
    names = sorted(repr(k.decode(errors="replace") if isinstance(k, bytes) else k)[:40] for k in fields)
    shown = names[:MAX_FIELD_NAMES_SHOWN]
    return shown + [f"... {len(names) - len(shown)} more"] if len(names) > len(shown) else shown
