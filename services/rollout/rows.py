"""Fair admission of engine rows across tenants.

A rollout request carries every prompt of a step (or of an evaluation), each
needing ``sampling.n`` rows of the decode batch, so one request may need more
rows than the engine has free, or has at all. The rollout service splits a
request into its prompts and each prompt waits here for its rows:

- never more rows handed out than ``capacity`` (the engine's rows): the
  service submits to the engine only what it can decode at once;
- a prompt needing more rows than are free waits (never dropped); a request
  larger than the whole engine runs prompt by prompt, so it cannot deadlock;
- tenants take turns: waiting prompts queue per tenant (FIFO within a
  tenant), and rows that free go to the tenants in rotation, a turn being
  up to ``rows_per_turn`` rows (a quarter of the engine by default) of the
  tenant's next prompts (deficit round robin). One tenant's huge request (an
  evaluation of 64 prompts) therefore interleaves with another tenant's step
  instead of running ahead of it, while a step's prompts, which fit in one
  turn, are granted together and finish together: the trainer gets the first
  complete steps after one engine wave, not after every tenant's last prompt.
  The tenant whose turn it is keeps it until its prompt fits (no skipping),
  so a prompt of many rows is never starved by small ones.

Pure asyncio bookkeeping, on the event loop only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RowGate:
    """``capacity`` rows shared fairly by tenants (see the module docstring)."""

    def __init__(self, capacity: int, rows_per_turn: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rows_per_turn = max(1, capacity // 4) if rows_per_turn is None else rows_per_turn
        if self.rows_per_turn < 1:
            raise ValueError(f"rows_per_turn must be >= 1, got {rows_per_turn}")
        self.free = capacity
        # the tenant whose turn is under way and the rows it was granted in it
        self._turn_tenant: str | None = None
        self._turn_rows = 0
        # tenant -> its waiting (rows, future), in turn order (the first tenant's turn is next)
        self._waiting: dict[str, collections.deque[tuple[int, asyncio.Future[None]]]] = {}

    @property
    def waiting(self) -> int:
        """Prompts waiting for rows."""
        return sum(len(queue) for queue in self._waiting.values())

    @asynccontextmanager
    async def rows(self, tenant: str, count: int) -> AsyncIterator[None]:
        """Hold ``count`` rows for ``tenant`` for the duration of the block."""
        if not 1 <= count <= self.capacity:
            raise ValueError(f"{count} rows asked of a gate of {self.capacity}")
        await self._acquire(tenant, count)
        try:
            yield
        finally:
            self.free += count
            self._grant()

    async def _acquire(self, tenant: str, count: int) -> None:
        if not self._waiting and count <= self.free:
            self.free -= count
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, collections.deque()).append((count, granted))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.free += count  # granted just as we were cancelled: give the rows back
            else:
                self._forget(tenant, granted)
            self._grant()
            raise

    def _forget(self, tenant: str, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        for item in list(queue):
            if item[1] is granted:
                queue.remove(item)
        if not queue:
            del self._waiting[tenant]

    def _grant(self) -> None:
        """Hand free rows out, up to ``rows_per_turn`` per tenant per turn."""
        while self._waiting:
            tenant, queue = next(iter(self._waiting.items()))
            count, granted = queue[0]
            if count > self.free:
                return  # this tenant's turn waits for its rows
            queue.popleft()
            self.free -= count
            granted.set_result(None)
            used = (self._turn_rows if self._turn_tenant == tenant else 0) + count
            self._turn_tenant, self._turn_rows = tenant, used
            if queue and used < self.rows_per_turn:
                continue  # the turn goes on
            del self._waiting[tenant]
            if queue:
                self._waiting[tenant] = queue  # to the back of the rotation
            self._turn_tenant, self._turn_rows = None, 0
