"""What one experiment's reward may cost the reward service: scoring slots
shared fairly between experiments, and timeouts/attempts within the limits."""

from __future__ import annotations

import asyncio

import pytest

from services.reward.limits import ScoringSlots, bounded_spec
from shared.config import RewardLimits
from shared.messages import RewardSpec

WAIT_S = 10.0  # a guard against hanging, never an assertion


async def test_one_experiment_holds_at_most_its_share_while_others_get_slots():
    slots = ScoringSlots(total=3, per_experiment=2)
    release_slow = asyncio.Event()
    slow_started = 0
    slow_most_at_once = 0

    async def slow_call():
        nonlocal slow_started, slow_most_at_once
        async with slots.hold("slow"):
            slow_started += 1
            slow_most_at_once = max(slow_most_at_once, slots.scoring("slow"))
            await release_slow.wait()

    slow_calls = [asyncio.create_task(slow_call()) for _ in range(6)]
    while slots.status()["waiting"] < 4:  # two holding, four queued on the experiment's own slots
        await asyncio.sleep(0)
    quick_done = []
    for index in range(5):  # one shared slot is left: other experiments take turns on it
        async with slots.hold(f"quick-{index % 2}"):
            quick_done.append(index)
    assert quick_done == [0, 1, 2, 3, 4]
    assert slow_started == 2 and not release_slow.is_set()

    release_slow.set()
    await asyncio.wait_for(asyncio.gather(*slow_calls), WAIT_S)
    assert slow_started == 6 and slow_most_at_once == 2
    assert slots.status() == {"scoring": 0, "waiting": 0, "experiments": 0}  # nothing kept per experiment


async def test_the_shared_bound_holds_across_experiments():
    slots = ScoringSlots(total=2, per_experiment=2)
    release = asyncio.Event()
    most_at_once = 0

    async def call(experiment_id: str):
        nonlocal most_at_once
        async with slots.hold(experiment_id):
            most_at_once = max(most_at_once, slots.status()["scoring"])
            await release.wait()

    calls = [asyncio.create_task(call(f"exp-{i % 3}")) for i in range(6)]
    while slots.status()["scoring"] + slots.status()["waiting"] < 6:
        await asyncio.sleep(0)
    assert slots.status()["scoring"] == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*calls), WAIT_S)
    assert most_at_once == 2


async def test_a_cancelled_waiter_gives_its_place_back():
    slots = ScoringSlots(total=1, per_experiment=1)
    release = asyncio.Event()

    async def holder():
        async with slots.hold("a"):
            await release.wait()

    holding = asyncio.create_task(holder())
    waiting = asyncio.create_task(holder())
    while slots.status()["waiting"] < 1:
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await asyncio.wait_for(holding, WAIT_S)
    async with slots.hold("a"):  # the slot is free again
        assert slots.scoring("a") == 1


LIMITS = RewardLimits(max_reward_timeout_s=10.0, max_reward_attempts=4, max_reward_budget_s=25.0)


@pytest.mark.parametrize("timeout_s, attempts, expected", [
    (5.0, 3, (5.0, 3)),               # within every limit: unchanged
    (1000.0, 3, (10.0, 2)),           # timeout clamped, then 2 x 10 s fit the 25 s budget
    (1.0, 100, (1.0, 4)),             # attempts clamped
    (8.0, 4, (8.0, 3)),               # 4 x 8 s is over the budget: 3 x 8 s fit
    (float("nan"), 2, (10.0, 2)),     # not a number: the ceiling
    (-1.0, 0, (10.0, 1)),             # nonsense: the ceiling, one attempt
    (float("inf"), 5, (10.0, 2)),
])
def test_timeouts_and_attempts_are_clamped_to_the_limits(timeout_s, attempts, expected):
    spec = bounded_spec(RewardSpec(type="http", url="http://x/", timeout_s=timeout_s, max_attempts=attempts), LIMITS)
    assert (spec.timeout_s, spec.max_attempts) == expected
    assert spec.timeout_s * spec.max_attempts <= LIMITS.max_reward_budget_s
    assert spec.url == "http://x/"


def test_a_spec_within_the_limits_is_the_same_object():
    spec = RewardSpec(type="regex", pattern="x")
    assert bounded_spec(spec, RewardLimits()) is spec
