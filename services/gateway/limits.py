"""Each API key's share of the deployment (GatewayConfig ``gateway_max_*``).

- runs per key: the runs a key holds plus those being created;
- checkpoints per run: saved sampler versions plus distinct state names,
  plus the saves in flight;
- ops in flight per key: trainer ops and samples published and not yet
  answered (a refusal here is a 429 with Retry-After, which the SDK retries);
- datums and tokens per forward / forward_backward.

Counts in flight are reservations taken before anything is published and
given back when the op's future settles, whatever its outcome, so a burst of
concurrent requests cannot slip past a limit between its check and its publish.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

Release = Callable[[], None]


class Reservations:
    """How many of something each holder (an owner, a run) has in flight."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    def held(self, holder: str) -> int:
        return self._held[holder]

    def take(self, holder: str, limit: int, already: int = 0) -> Release | None:
        """One more for ``holder`` unless ``already`` + those in flight reach
        ``limit`` (None). The release it returns may be called more than once."""
        if already + self._held[holder] >= limit:
            return None
        self._held[holder] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._held[holder] -= 1
            if self._held[holder] <= 0:
                del self._held[holder]

        return release


class Shares:
    """The reservations the gateway keeps: ops per key, runs being created per
    key, saves in flight per run."""

    def __init__(self) -> None:
        self.ops = Reservations()
        self.creating_runs = Reservations()
        self.saving = Reservations()
