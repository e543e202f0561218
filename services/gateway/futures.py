"""The futures the SDK polls (``/api/v1/retrieve_future``).

Every asynchronous request gets a ``request_id``; its work runs as a task
whose outcome lands here: a JSON dict, protobuf bytes (the SDK reads
ForwardBackwardOutput and SampleResponse only as protobuf), or an error with
its category ("user" | "server"). A future belongs to the key that made it.

With ``tables`` (Redis), a future is stored as pending before its id is
handed out and with its outcome before it reads as done, so a restarted
gateway still answers it: with the outcome, or, for one that was in flight
when the gateway died, with a clear server error (``RESTARTED``).
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import structlog

from services.gateway.store import RedisTables, StoredFuture

log = structlog.get_logger(__name__)
RESTARTED = ("the gateway restarted while this request was in flight, so its outcome is unknown: check the "
             "run (get_info, a forward) and send the call again if it did not happen")

class OpFailed(Exception):
    """An op's clear failure: ``category`` "user" (bad request) or "server"."""

    def __init__(self, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.category = category


@dataclass
class FutureRecord:
    request_id: str
    owner: str
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    json: dict[str, Any] | None = None
    proto: bytes | None = None
    error: str | None = None
    category: str = "user"
    finished_at: float = 0.0


Outcome = dict[str, Any] | bytes


class FutureStore:
    def __init__(self, keep_s: float, tables: RedisTables | None = None) -> None:
        self.keep_s = keep_s
        self._tables = tables
        self._records: dict[str, FutureRecord] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, owner: str, work: Awaitable[Outcome], timeout_s: float) -> str:
        """Run ``work`` for ``owner``; returns the new future's request id."""
        self._forget_old()
        record = FutureRecord(request_id="req-" + secrets.token_hex(12), owner=owner)
        if self._tables is not None:
            try:
                await self._tables.put_future(record.request_id, StoredFuture(owner, "pending"), self.keep_s)
            except BaseException:
                if inspect.iscoroutine(work):
                    work.close()  # never to be awaited
                raise
        self._records[record.request_id] = record
        task = asyncio.create_task(self._settle(record, work, timeout_s), name=f"future:{record.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record.request_id

    def get(self, request_id: object, owner: str) -> FutureRecord | None:
        record = self._records.get(request_id) if isinstance(request_id, str) else None
        return record if record is not None and record.owner == owner else None

    async def find(self, request_id: object, owner: str) -> FutureRecord | None:
        """``get``, or the record an earlier gateway process stored (done)."""
        record = self.get(request_id, owner)
        if record is not None or self._tables is None:
            return record
        stored = await self._tables.get_future(request_id)
        if stored is None or stored.owner != owner:
            return None
        record = FutureRecord(request_id=str(request_id), owner=owner, json=stored.json, proto=stored.proto,
                              error=stored.error, category=stored.category, finished_at=time.monotonic())
        if stored.state != "done":
            record.error, record.category = RESTARTED, "server"
        record.done.set()
        return record

    async def wait(self, record: FutureRecord, wait_s: float) -> bool:
        try:
            await asyncio.wait_for(record.done.wait(), wait_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def pending(self) -> int:
        return sum(1 for r in self._records.values() if not r.done.is_set())

    async def _settle(self, record: FutureRecord, work: Awaitable[Outcome], timeout_s: float) -> None:
        try:
            outcome = await asyncio.wait_for(work, timeout_s)
        except OpFailed as exc:
            record.error, record.category = str(exc), exc.category
        except TimeoutError:
            record.error, record.category = f"no answer from the trainer/rollout within {timeout_s:g} s", "server"
        except asyncio.CancelledError:
            record.error, record.category = "the gateway stopped before the request finished", "server"
            record.done.set()
            raise
        except Exception as exc:  # a bug of ours: the client gets a server error, the gateway lives
            record.error, record.category = f"internal error: {exc!r}", "server"
        else:
            if isinstance(outcome, bytes):
                record.proto = outcome
            else:
                record.json = outcome
        record.finished_at = time.monotonic()
        await self._store_outcome(record)
        record.done.set()

    async def _store_outcome(self, record: FutureRecord) -> None:
        if self._tables is None:
            return
        stored = StoredFuture(record.owner, "done", json=record.json, proto=record.proto, error=record.error,
                              category=record.category)
        try:
            await self._tables.put_future(record.request_id, stored, self.keep_s)
        except Exception as exc:  # the live gateway still answers from memory
            log.warning("gateway_future_not_stored", request_id=record.request_id, error=repr(exc)[:200])

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.keep_s
        stale = [rid for rid, r in self._records.items() if r.done.is_set() and r.finished_at < horizon]
        for rid in stale:
            del self._records[rid]
