"""Which tenants' rows ran in each decode step, for both engines' stats.

The rollout heartbeat reports ``shared_steps`` (decode steps that held both
tenants of a pair ``"a|b"``) and the tests read it to show that tenants
share one batch. Recording a step costs one deque append and one counter
increment keyed by the step's tenant set (a frozenset, its hash cached):
nothing per pair and nothing per row runs in the decode loop. The pairs
are expanded only when someone reads them, once per distinct tenant set
since the last read.

Not thread-safe: the torch engine records under its lock, the vLLM engine
behind its own.
"""

from __future__ import annotations

import collections
from collections import Counter
from collections.abc import Iterable

STEP_TENANTS_KEPT = 1000  # recent decode steps whose tenant sets stats keep


def tenant_pairs(tenants: Iterable[str | None]) -> list[str]:
    """``"a|b"`` (a < b) for every pair of distinct named tenants (None, the
    base model, pairs with no one)."""
    named = sorted({t for t in tenants if t is not None})
    return [f"{a}|{b}" for i, a in enumerate(named) for b in named[i + 1:]]


class TenantStepLog:
    """Decode steps by the set of tenants (None = base) whose rows ran in them."""

    def __init__(self, kept: int = STEP_TENANTS_KEPT) -> None:
        self.steps = 0
        self._recent: collections.deque[frozenset] = collections.deque(maxlen=kept)
        self._unfolded: Counter[frozenset] = Counter()  # steps per tenant set, since the last read
        self._shared: Counter[str] = Counter()

    def record(self, tenants: frozenset) -> None:
        """One decode step ran rows of ``tenants``."""
        self.steps += 1
        self._recent.append(tenants)
        self._unfolded[tenants] += 1

    def recent(self) -> list[frozenset]:
        """The tenant sets of the last ``kept`` steps, oldest first."""
        return list(self._recent)

    def shared_steps(self) -> Counter[str]:
        """Steps since start that held both tenants of each pair ``"a|b"``."""
        for tenants, steps in self._unfolded.items():
            for pair in tenant_pairs(tenants):
                self._shared[pair] += steps
        self._unfolded.clear()
        return Counter(self._shared)
