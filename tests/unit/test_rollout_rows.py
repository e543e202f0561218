"""``RowGate``: the rollout's fair share of engine rows between tenants."""

from __future__ import annotations

import asyncio

import pytest

from services.rollout.rows import RowGate


async def _hold(gate: RowGate, tenant: str, rows: int, order: list[str], release: asyncio.Event,
                label: str | None = None, background: bool = False) -> None:
    """Hold ``rows`` for ``tenant`` until ``release``; ``label`` (default the
    tenant) goes to ``order`` when they are granted."""
    async with gate.rows(tenant, rows, background=background):
        order.append(label or tenant)
        await release.wait()


def test_never_more_rows_out_than_the_capacity_and_waiting_prompts_get_theirs_later():
    async def main() -> None:
        gate, order, release = RowGate(4), [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, "a", 2, order, release)) for _ in range(5)]
        await asyncio.sleep(0)
        assert order == ["a", "a"] and gate.free == 0 and gate.waiting == 3
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["a"] * 5 and gate.free == 4 and gate.waiting == 0

    asyncio.run(main())


def test_tenants_take_turns_so_a_huge_request_does_not_run_ahead_of_another_tenant():
    async def main() -> None:
        gate, order, release = RowGate(1), [], asyncio.Event()
        huge = [asyncio.create_task(_hold(gate, "eval-heavy", 1, order, release)) for _ in range(6)]
        await asyncio.sleep(0)  # the first of them holds the only row; five wait
        small = [asyncio.create_task(_hold(gate, "small", 1, order, release)) for _ in range(2)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*huge, *small)
        # once both wait, the two tenants alternate until "small" has had its two
        assert order == ["eval-heavy", "eval-heavy", "small", "eval-heavy", "small"] + ["eval-heavy"] * 3

    asyncio.run(main())


def test_a_turn_grants_up_to_its_rows_so_a_step_finishes_together():
    """A turn of 4 rows: each tenant's two 2-row prompts go out together, so
    the engine finishes one tenant's step at a time instead of a piece of
    every tenant's; with turns of one prompt (2 rows) the tenants alternate."""
    async def order_with(rows_per_turn: int) -> list[str]:
        gate, order, release = RowGate(8, rows_per_turn), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "h", 8, order, release))
        await asyncio.sleep(0)
        prompts = [asyncio.create_task(_hold(gate, tenant, 2, order, release)) for tenant in "aaaa"]
        prompts += [asyncio.create_task(_hold(gate, tenant, 2, order, release)) for tenant in "bbbb"]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, *prompts)
        return order[1:]

    async def main() -> None:
        assert await order_with(4) == list("aabbaabb")
        assert await order_with(2) == list("abababab")

    asyncio.run(main())


def test_a_prompt_of_many_rows_is_not_starved_by_small_ones():
    async def main() -> None:
        gate, order = RowGate(4), []
        release_first = asyncio.Event()
        first = asyncio.create_task(_hold(gate, "small", 1, order, release_first))
        await asyncio.sleep(0)
        big = asyncio.create_task(_hold(gate, "big", 4, order, asyncio.Event()))
        await asyncio.sleep(0)
        later_small = asyncio.create_task(_hold(gate, "small", 1, order, asyncio.Event()))
        await asyncio.sleep(0)
        assert order == ["small"]  # 3 rows free, but "big" waits its turn and nothing jumps it
        release_first.set()
        await asyncio.sleep(0.01)
        assert order == ["small", "big"] and not later_small.done()
        for task in (big, later_small):
            task.cancel()
        await asyncio.gather(first, big, later_small, return_exceptions=True)

    asyncio.run(main())


def test_a_cancelled_waiter_gives_nothing_away_and_blocks_nobody():
    async def main() -> None:
        gate, order, release = RowGate(2), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "a", 2, order, release))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(_hold(gate, "b", 2, order, asyncio.Event()))
        behind = asyncio.create_task(_hold(gate, "c", 1, order, release))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, behind)
        assert order == ["a", "c"] and gate.free == 2 and gate.waiting == 0

    asyncio.run(main())


def test_more_rows_than_the_gate_has_are_refused():
    async def main() -> None:
        with pytest.raises(ValueError, match="5 rows asked of a gate of 4"):
            async with RowGate(4).rows("a", 5):
                pass

    asyncio.run(main())


def test_training_prompts_go_before_evaluation_prompts_that_waited_longer():
    async def main() -> None:
        gate, order, release = RowGate(2, rows_per_turn=1), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "h", 2, order, release))
        await asyncio.sleep(0)
        evals = [asyncio.create_task(_hold(gate, "a", 1, order, release, "a-eval", background=True))
                 for _ in range(2)]
        await asyncio.sleep(0)
        steps = [asyncio.create_task(_hold(gate, tenant, 1, order, release, f"{tenant}-train"))
                 for tenant in "ab"]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, *evals, *steps)
        assert order[1:] == ["a-train", "b-train", "a-eval", "a-eval"]

    asyncio.run(main())


def test_evaluation_prompts_keep_one_turn_in_background_every_under_steady_training_load():
    """Training prompts always waiting cannot starve an evaluation: it gets
    every fourth turn."""
    async def main() -> None:
        gate, order, release = RowGate(1, rows_per_turn=1, background_every=4), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "h", 1, order, release))
        await asyncio.sleep(0)
        evals = [asyncio.create_task(_hold(gate, "e", 1, order, release, "eval", background=True))
                 for _ in range(2)]
        steps = [asyncio.create_task(_hold(gate, tenant, 1, order, release, "train")) for tenant in "abcdefgh"]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, *evals, *steps)
        assert order[1:] == ["train"] * 3 + ["eval"] + ["train"] * 3 + ["eval"] + ["train"] * 2

    asyncio.run(main())


def test_a_cancelled_prompt_in_the_middle_of_a_turn_passes_the_turn_on():
    async def main() -> None:
        gate, order, release = RowGate(3, rows_per_turn=3), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "h", 3, order, release))
        await asyncio.sleep(0)
        first = asyncio.create_task(_hold(gate, "a", 1, order, release, "a1"))
        second = asyncio.create_task(_hold(gate, "a", 2, order, release, "a2"))
        other = asyncio.create_task(_hold(gate, "b", 1, order, release, "b1"))
        await asyncio.sleep(0)
        gate.free += 2  # two rows free up: "a" starts its turn with a1; a2 needs both
        gate._grant()
        await asyncio.sleep(0)
        assert order == ["h", "a1"] and gate.free == 1  # b1 does not jump the turn
        second.cancel()
        await asyncio.sleep(0.01)
        assert order == ["h", "a1", "b1"]
        gate.free -= 2
        release.set()
        await asyncio.gather(holder, first, second, other, return_exceptions=True)
        assert gate.free == 3 and gate.waiting == 0

    asyncio.run(main())


def test_rows_that_free_while_a_waiter_is_being_cancelled_go_to_the_next_one():
    async def main() -> None:
        gate, order, release = RowGate(1), [], asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "h", 1, order, release))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(_hold(gate, "a", 1, order, release))
        staying = asyncio.create_task(_hold(gate, "b", 1, order, release))
        await asyncio.sleep(0)
        leaving.cancel()  # its future is cancelled now; its task leaves the queue only when it next runs
        gate.free += 1  # a row frees in between
        gate._grant()
        await asyncio.sleep(0.01)
        assert order == ["h", "b"] and leaving.cancelled()
        gate.free -= 1
        release.set()
        await asyncio.gather(holder, staying)
        assert gate.free == 1 and gate.waiting == 0

    asyncio.run(main())
