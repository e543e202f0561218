"""What one experiment's reward may cost the shared reward service.

``ScoringSlots`` bounds the scoring calls in flight (one HTTP request for one
sample, one forward to a reward worker, one built-in scoring of a
completion): at most ``total`` at once, at most ``per_experiment`` of them for
one experiment. A call takes its experiment's slot first and a shared slot
second, so an experiment's excess calls queue behind each other, never in the
shared queue ahead of another experiment's calls: a slow tenant slows only
itself.

``bounded_spec`` clamps a reward's ``timeout_s`` and ``max_attempts`` to the
operator's ``RewardLimits`` (the scheduler refuses specs over them at
submission; this is the reward service's own guard), so that attempts x
timeout fits in ``max_reward_budget_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from shared.config import RewardLimits
from shared.messages import RewardSpec


@dataclass
class _ExperimentSlots:
    slots: asyncio.Semaphore
    users: int = 0  # calls holding or waiting for one of the slots
    scoring: int = 0  # calls holding one


class ScoringSlots:
    """At most ``total`` scoring calls at once, ``per_experiment`` per experiment."""

    def __init__(self, total: int, per_experiment: int) -> None:
        if total < 1 or per_experiment < 1:
            raise ValueError("scoring slots: total and per_experiment must be >= 1")
        self.total = total
        self.per_experiment = per_experiment
        self._shared = asyncio.Semaphore(total)
        self._experiments: dict[str, _ExperimentSlots] = {}  # only experiments with calls: no growth

    @contextlib.asynccontextmanager
    async def hold(self, experiment_id: str) -> AsyncIterator[None]:
        """Wait for a slot of ``experiment_id`` and a shared one; hold both inside."""
        experiment = self._experiments.get(experiment_id)
        if experiment is None:
            experiment = self._experiments[experiment_id] = _ExperimentSlots(asyncio.Semaphore(self.per_experiment))
        experiment.users += 1
        try:
            async with experiment.slots, self._shared:
                experiment.scoring += 1
                try:
                    yield
                finally:
                    experiment.scoring -= 1
        finally:
            experiment.users -= 1
            if experiment.users == 0:
                del self._experiments[experiment_id]

    def scoring(self, experiment_id: str) -> int:
        """How many calls of ``experiment_id`` hold a slot now."""
        experiment = self._experiments.get(experiment_id)
        return experiment.scoring if experiment is not None else 0

    def status(self) -> dict[str, int]:
        return {
            "scoring": sum(e.scoring for e in self._experiments.values()),
            "waiting": sum(e.users - e.scoring for e in self._experiments.values()),
            "experiments": len(self._experiments),
        }


def bounded_spec(spec: RewardSpec, limits: RewardLimits) -> RewardSpec:
    """``spec`` with ``timeout_s`` and ``max_attempts`` within ``limits``."""
    budget_s = limits.max_reward_budget_s
    ceiling_s = min(limits.max_reward_timeout_s, budget_s)
    # not (x > 0) also catches NaN: a timeout that is not a positive number gets the ceiling
    timeout_s = min(spec.timeout_s, ceiling_s) if spec.timeout_s > 0 else ceiling_s
    fitting_attempts = max(1, math.floor(budget_s / timeout_s))
    attempts = max(1, min(spec.max_attempts, limits.max_reward_attempts, fitting_attempts))
    if (timeout_s, attempts) == (spec.timeout_s, spec.max_attempts):
        return spec
    return msgspec.structs.replace(spec, timeout_s=timeout_s, max_attempts=attempts)
