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
  tenant's next prompts (deficit round robin). One tenant's huge request
  therefore interleaves with another tenant's step instead of running ahead
  of it, while a step's prompts, which fit in one turn, are granted together
  and finish together: the trainer gets the first complete steps after one
  engine wave, not after every tenant's last prompt. The tenant whose turn it
  is keeps it until its prompt fits (no skipping), so a prompt of many rows
  is never starved by small ones;
- training comes first: prompts asked for as ``background`` (held-out
  evaluations: nothing waits on them but the experiment's end) rotate
  separately and, while foreground prompts (training steps, sampling) also
  wait, get one turn in every ``background_every``. Evaluations thus fill
  the rows that training leaves free instead of delaying the steps the
  trainer waits for, and are never starved: under any load they keep at
  least that share of the turns.

Pure asyncio bookkeeping, on the event loop only.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

BACKGROUND_EVERY = 4  # under contention, background prompts get one turn in this many

Waiter = tuple[int, asyncio.Future[None]]


class RowGate:
    """``capacity`` rows shared fairly by tenants (see the module docstring)."""

    def __init__(self, capacity: int, rows_per_turn: int | None = None,
                 background_every: int = BACKGROUND_EVERY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rows_per_turn = max(1, capacity // 4) if rows_per_turn is None else rows_per_turn
        if self.rows_per_turn < 1:
            raise ValueError(f"rows_per_turn must be >= 1, got {rows_per_turn}")
        if background_every < 1:
            raise ValueError(f"background_every must be >= 1, got {background_every}")
        self.background_every = background_every
        self.free = capacity
        # per class (False: foreground, True: background): tenant -> its waiting
        # (rows, future), in turn order (the first tenant's turn is next)
        self._waiting: dict[bool, dict[str, collections.deque[Waiter]]] = {False: {}, True: {}}
        # the turn under way, once it has rows: (class, tenant) and the rows granted in it so far
        self._turn: tuple[bool, str] | None = None
        self._turn_rows = 0
        self._foreground_turns = 0  # foreground turns since the last background one

    @property
    def waiting(self) -> int:
        """Prompts waiting for rows."""
        return sum(len(queue) for queues in self._waiting.values() for queue in queues.values())

    @asynccontextmanager
    async def rows(self, tenant: str, count: int, background: bool = False) -> AsyncIterator[None]:
        """Hold ``count`` rows for ``tenant`` for the duration of the block;
        ``background`` prompts yield to foreground ones (module docstring)."""
        if not 1 <= count <= self.capacity:
            raise ValueError(f"{count} rows asked of a gate of {self.capacity}")
        await self._acquire(tenant, count, background)
        try:
            yield
        finally:
            self.free += count
            self._grant()

    async def _acquire(self, tenant: str, count: int, background: bool) -> None:
        if not self._waiting[False] and not self._waiting[True] and count <= self.free:
            self.free -= count
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[background].setdefault(tenant, collections.deque()).append((count, granted))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.free += count  # granted just as we were cancelled: give the rows back
            else:
                self._forget(background, tenant, granted)
            self._grant()
            raise

    def _forget(self, background: bool, tenant: str, granted: asyncio.Future[None]) -> None:
        queues = self._waiting[background]
        queue = queues.get(tenant)
        if queue is None:
            return
        for item in list(queue):
            if item[1] is granted:
                queue.remove(item)
        if not queue:
            del queues[tenant]
            if self._turn == (background, tenant):
                self._end_turn()

    def _next_turn(self) -> tuple[bool, str] | None:
        """The (class, tenant) whose turn starts now, None if nobody waits."""
        foreground, background = self._waiting[False], self._waiting[True]
        if not foreground and not background:
            return None
        use_background = bool(background) and (
            not foreground or self._foreground_turns >= self.background_every - 1)
        return use_background, next(iter(self._waiting[use_background]))

    def _grant(self) -> None:
        """Hand free rows out, up to ``rows_per_turn`` per tenant per turn."""
        while True:
            # a turn that has rows keeps going; otherwise the class rule picks who is next
            turn = self._turn if self._turn_rows > 0 else self._next_turn()
            if turn is None:
                return
            background, tenant = turn
            queue = self._waiting[background][tenant]
            count, granted = queue[0]
            if granted.cancelled():  # its waiter is being cancelled (not yet out of the queue): skip it
                self._forget(background, tenant, granted)
                continue
            if count > self.free:
                return  # this turn waits for its rows
            queue.popleft()
            self.free -= count
            granted.set_result(None)
            self._turn, self._turn_rows = turn, self._turn_rows + count
            if queue and self._turn_rows < self.rows_per_turn:
                continue  # the turn goes on
            queues = self._waiting[background]
            del queues[tenant]
            if queue:
                queues[tenant] = queue  # to the back of its class's rotation
            self._foreground_turns = self._foreground_turns + 1 if not background else 0
            self._end_turn()

    def _end_turn(self) -> None:
        self._turn, self._turn_rows = None, 0
