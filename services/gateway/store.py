"""What the gateway keeps in Redis so that a restarted (or killed) gateway
loses nothing a client saved: its tables and its futures' outcomes.

Layout, under the deployment's stream prefix (msgpack values):

- ``<prefix>gateway:runs`` hash: run id -> Run (owner, rank, sampler paths,
  state names); ``gateway:sessions``: session id -> owner;
  ``gateway:sampling``: sampling session id -> SamplingSession;
  ``gateway:aliases``: the SDK's ``<session>:train:<seq>`` -> run id.
- ``<prefix>gateway:future:<request id>``: a future's owner and state
  (pending, or its outcome), expiring after ``futures_keep_s``.

Owners are API-key digest prefixes, never keys. Every id is checked before
it becomes part of a key; what is read back is decoded into typed structs and
an entry that does not decode is skipped (and logged), never trusted.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import structlog

log = structlog.get_logger(__name__)

TABLES = ("runs", "sessions", "sampling", "aliases")
FUTURE_ID = re.compile(r"req-[0-9a-f]{24}")


class StoredFuture(msgspec.Struct, frozen=True):
    owner: str
    state: str  # "pending" | "done"
    json: dict[str, Any] | None = None
    proto: bytes | None = None
    error: str | None = None
    category: str = "user"


def is_future_id(request_id: object) -> bool:
    return isinstance(request_id, str) and FUTURE_ID.fullmatch(request_id) is not None


class RedisTables:
    """The gateway's tables and futures in Redis (an async redis client)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self._prefix}gateway:{name}"

    async def put(self, table: str, field: str, value: Any) -> None:
        assert table in TABLES
        await self._redis.hset(self._key(table), field, msgspec.msgpack.encode(value))

    async def load(self, table: str, value_type: Any) -> dict[str, Any]:
        """Every entry of ``table`` decoded as ``value_type``; bad ones skipped."""
        assert table in TABLES
        rows: dict[str, Any] = {}
        raw_rows = await self._redis.hgetall(self._key(table))
        for raw_field, raw_value in raw_rows.items():
            try:
                field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
                rows[field] = msgspec.msgpack.decode(raw_value, type=value_type)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                log.warning("gateway_table_entry_skipped", table=table, error=str(exc)[:200])
        return rows

    async def put_future(self, request_id: str, future: StoredFuture, ttl_s: float) -> None:
        if not is_future_id(request_id):
            raise ValueError(f"bad future id {request_id[:40]!r}")
        await self._redis.set(self._key(f"future:{request_id}"), msgspec.msgpack.encode(future),
                              px=max(1, int(ttl_s * 1000)))

    async def get_future(self, request_id: object) -> StoredFuture | None:
        if not is_future_id(request_id):
            return None
        raw = await self._redis.get(self._key(f"future:{request_id}"))
        if raw is None:
            return None
        try:
            return msgspec.msgpack.decode(raw, type=StoredFuture)
        except msgspec.DecodeError as exc:
            log.warning("gateway_future_skipped", error=str(exc)[:200])
            return None
