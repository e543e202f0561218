"""The one slot table: which adapter version sits in which slot, how many
users hold it, and which may go. Both engines and the rollout service keep
their adapters in one, so LRU order, reference counts and retire-when-idle
are written once.

Pure bookkeeping: no torch, no asyncio, no locks. The torch engine calls it
under its own lock (from the event loop and its engine thread); the vLLM
engine and the rollout service call it from the event loop only.

The rules:

- A key is placed once (``place``): placing a key the table holds, live or
  retiring, is refused. Versions are immutable, so a name is never reloaded
  in place; a retiring key asked for again is ``revive``d with its slot and
  contents.
- ``hold`` / ``acquire`` count users; ``acquire`` also requires the key to
  be live and returns its slot. A hold may come before the key is placed
  (the rollout service counts a request before its version loads, so that
  no retirement slips in between the load and the request).
- ``retire``: a live key stops being live at once (no new ``acquire``); its
  slot frees when its last holder ``release``s.
- Capacity: ``num_slots`` slots numbered 1..N (0 is the base model and never
  handed out). ``claim`` gives a free slot, else evicts the least recently
  used live key that nobody holds, else None (every slot is held).
  ``num_slots=None``: unbounded, every claim is a fresh number (1, 2, 3...,
  never handed out twice: vLLM's ``lora_int_id``).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SlotMissing(KeyError):
    """The key is not live in the table (never placed, evicted or retired)."""


class SlotTable(Generic[K]):
    """Slots of adapter keys with LRU order, reference counts and
    retire-when-idle (see the module docstring for the rules)."""

    def __init__(self, num_slots: int | None) -> None:
        if num_slots is not None and num_slots < 1:
            raise ValueError(f"num_slots must be >= 1 or None (unbounded), got {num_slots}")
        self.num_slots = num_slots
        self._live: OrderedDict[K, int] = OrderedDict()  # least recently used first
        self._retiring: dict[K, int] = {}  # retired, slot kept until the last holder releases
        self._holds: Counter[K] = Counter()
        self._free: list[int] = list(range(num_slots, 0, -1)) if num_slots is not None else []
        self._fresh = itertools.count(1)

    # ---------------------------------------------------------------- queries

    def __contains__(self, key: object) -> bool:
        """Live: placed, not evicted, not retired."""
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def slot_of(self, key: K) -> int | None:
        return self._live.get(key)

    def holds(self, key: K) -> int:
        return self._holds.get(key, 0)

    def is_retiring(self, key: K) -> bool:
        return key in self._retiring

    def live_keys(self) -> Iterator[K]:
        """Live keys, least recently used first."""
        return iter(list(self._live))

    def idle_keys(self) -> list[K]:
        """Live keys nobody holds, least recently used first."""
        return [key for key in self._live if not self._holds.get(key)]

    # ---------------------------------------------------------------- placing

    def claim(self) -> tuple[int, K | None] | None:
        """A slot for a new key: ``(slot, evicted key or None)``, or None when
        every slot is held. An evicted key leaves the table here."""
        if self.num_slots is None:
            return self.fresh_slot(), None
        if self._free:
            return self._free.pop(), None
        victim = next((key for key in self._live if not self._holds.get(key)), None)
        if victim is None:
            return None
        return self._live.pop(victim), victim

    def fresh_slot(self) -> int:
        """A number never handed out before (unbounded tables: nothing to evict)."""
        if self.num_slots is not None:
            raise ValueError("a bounded table reuses its slots: use claim()")
        return next(self._fresh)

    def place(self, key: K, slot: int) -> None:
        """Make ``key`` live in ``slot`` (from ``claim``), most recently used."""
        if key in self._live or key in self._retiring:
            raise ValueError(f"{key!r} is already in the table: a version is never reloaded in place")
        self._live[key] = slot

    def unclaim(self, slot: int) -> None:
        """Give back a claimed slot that was never placed (its load failed)."""
        if self.num_slots is not None:
            self._free.append(slot)

    def revive(self, key: K) -> bool:
        """A retiring key asked for again: live again with its slot (same
        immutable contents). False when ``key`` is not retiring."""
        slot = self._retiring.pop(key, None)
        if slot is None:
            return False
        self._live[key] = slot
        return True

    def touch(self, key: K) -> None:
        """Mark a live key most recently used."""
        if key in self._live:
            self._live.move_to_end(key)

    # ---------------------------------------------------------------- users

    def hold(self, key: K) -> None:
        """Count one more user of ``key``, live or not yet placed."""
        self._holds[key] += 1

    def acquire(self, key: K) -> int:
        """Hold a live key and return its slot; ``SlotMissing`` if not live."""
        slot = self._live.get(key)
        if slot is None:
            raise SlotMissing(key)
        self._holds[key] += 1
        self._live.move_to_end(key)
        return slot

    def release(self, key: K) -> int | None:
        """Drop one hold. Returns the slot freed when this was the last holder
        of a retiring key, else None."""
        left = self._holds.get(key, 0) - 1
        if left < 0:
            raise ValueError(f"{key!r} released more often than held")
        if left:
            self._holds[key] = left
            return None
        del self._holds[key]
        slot = self._retiring.pop(key, None)
        if slot is not None:
            self.unclaim(slot)
        return slot

    # ---------------------------------------------------------------- leaving

    def retire(self, key: K) -> int | None:
        """``key`` stops being live. Returns its slot when it is free now (no
        holder), None when it frees on the last ``release`` (or ``key`` was not
        live)."""
        slot = self._live.pop(key, None)
        if slot is None:
            return None
        if self._holds.get(key):
            self._retiring[key] = slot
            return None
        self.unclaim(slot)
        return slot

    def drop(self, key: K) -> None:
        """Forget ``key``'s placement whatever its holders (its engine lost it,
        e.g. evicted it); its holds stay counted."""
        slot = self._live.pop(key, None)
        if slot is None:
            slot = self._retiring.pop(key, None)
        if slot is not None:
            self.unclaim(slot)
