"""A Redis lease: at most one holder at a time.

The scheduler owns every experiment's step loop, so two schedulers on one
prefix would issue the same steps twice. Each scheduler takes the lease
before it recovers state; another one waits (standby) until the lease is
free: given back on a clean stop, or expired ``ttl_s`` after its holder died.
The holder renews it every ``ttl_s / 3``; a holder that finds the lease
taken by someone else must stop at once.

The holder's identity is its consumer name, so a restarted process with the
same name (a Kubernetes pod, ``clora up``) takes its lease back at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.asyncio import Redis

from shared.bus import RETRYABLE_REDIS_ERRORS

# KEYS[1] lease key; ARGV[1] holder; ARGV[2] ttl in ms. 1 if the holder has the lease now.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# 1 if the holder still had the lease (and now has it for another ttl).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(RuntimeError):
    """Another holder has the lease: this one must stop working at once."""


class Lease:
    def __init__(self, redis: Redis, key: str, holder: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease needs a positive ttl")
        self.redis, self.key, self.holder = redis, key, holder
        self.ttl_ms = max(int(ttl_s * 1000), 1)

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_ms / 3000

    async def try_acquire(self) -> bool:
        return bool(await self.redis.eval(_ACQUIRE, 1, self.key, self.holder, self.ttl_ms))

    async def holder_now(self) -> str | None:
        value = await self.redis.get(self.key)
        # bytes: the client does not decode responses (redis-py types it bytes | str)
        return None if value is None else value.decode()  # type: ignore[union-attr]

    async def acquire(self, stopping: asyncio.Event, on_wait) -> bool:
        """Wait until this holder has the lease (True) or ``stopping`` is set
        (False). ``on_wait(current_holder)`` is called once, when it must wait."""
        waited = False
        while not stopping.is_set():
            if await self.try_acquire():
                return True
            if not waited:
                on_wait(await self.holder_now())
                waited = True
            await _wait(stopping, self.renew_interval_s)
        return False

    async def keep(self, stopping: asyncio.Event, on_regained: Callable[[], None] = lambda: None) -> None:
        """Renew every ``ttl / 3``; once ``stopping`` is set, renew a last time
        (so the lease outlasts a drain shorter than the ttl) and return.
        ``LeaseLost`` when another holder took it. When Redis stayed away for
        a whole ttl the lease may have lapsed: once Redis answers again it is
        taken afresh if nobody else holds it, and ``on_regained()`` tells the
        holder that others may have written meanwhile (it must re-read its
        state); if someone else holds it, ``LeaseLost``."""
        renewed_at = time.monotonic()
        while True:
            stop_now = await _wait(stopping, self.renew_interval_s)
            lapsed = time.monotonic() - renewed_at >= self.ttl_ms / 1000
            try:
                held = await (self.try_acquire() if lapsed else self._renew())
            except RETRYABLE_REDIS_ERRORS:
                if stop_now:
                    return  # stopping without Redis: the lease expires on its own
                continue  # an outage: keep trying for as long as we run
            if not held:
                raise LeaseLost(f"lease {self.key} is held by {await self.holder_now()!r}, not {self.holder!r}")
            if lapsed:
                on_regained()
            renewed_at = time.monotonic()
            if stop_now:
                return

    async def _renew(self) -> bool:
        return bool(await self.redis.eval(_RENEW, 1, self.key, self.holder, self.ttl_ms))

    async def release(self) -> None:
        await self.redis.eval(_RELEASE, 1, self.key, self.holder)


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
    return event.is_set()
