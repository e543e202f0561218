"""The slot table both engines and the rollout service share, driven
synchronously: reference counts, LRU eviction of idle slots only,
retire-when-idle, no reload in place."""

from __future__ import annotations

import pytest

from services.rollout.slots import SlotMissing, SlotTable


def placed(table: SlotTable, *keys: str) -> dict[str, int]:
    """Claim a slot for each key and place it there."""
    slots = {}
    for key in keys:
        slot, evicted = table.claim()
        assert evicted is None
        table.place(key, slot)
        slots[key] = slot
    return slots


def test_slots_are_numbered_from_one_and_distinct():
    table = SlotTable(3)
    slots = placed(table, "a", "b", "c")
    assert sorted(slots.values()) == [1, 2, 3]
    assert table.slot_of("b") == slots["b"] and "b" in table and len(table) == 3
    assert table.claim() is not None  # nobody holds a key: one is evicted instead of failing


def test_acquire_counts_holders_and_release_drops_them():
    table = SlotTable(2)
    slots = placed(table, "a")
    assert table.acquire("a") == slots["a"]
    assert table.acquire("a") == slots["a"]
    assert table.holds("a") == 2
    assert table.release("a") is None
    assert table.release("a") is None  # a live key stays when idle
    assert table.holds("a") == 0 and "a" in table
    with pytest.raises(ValueError, match="released more often"):
        table.release("a")


def test_acquire_refuses_a_key_that_is_not_live():
    table = SlotTable(2)
    with pytest.raises(SlotMissing):
        table.acquire("ghost")
    assert table.holds("ghost") == 0


def test_full_table_evicts_the_least_recently_used_idle_key():
    table = SlotTable(3)
    slots = placed(table, "a", "b", "c")
    table.acquire("a")
    table.release("a")  # a is now the freshest: b is the least recently used
    table.touch("c")
    slot, evicted = table.claim()
    assert (slot, evicted) == (slots["b"], "b")
    assert "b" not in table and table.slot_of("b") is None


def test_held_keys_are_never_evicted_and_a_fully_held_table_claims_nothing():
    table = SlotTable(2)
    placed(table, "a", "b")
    table.acquire("a")
    table.touch("b")  # b is now the freshest, but a is held
    slot, evicted = table.claim()
    assert evicted == "b", "the idle key goes, whatever the LRU order of held ones"
    table.place("c", slot)
    table.acquire("c")
    assert table.claim() is None
    table.release("c")
    assert table.claim() == (slot, "c")


def test_retire_of_an_idle_key_frees_its_slot_at_once():
    table = SlotTable(1)
    slots = placed(table, "a")
    assert table.retire("a") == slots["a"]
    assert "a" not in table
    assert table.claim() == (slots["a"], None)  # free again, nothing evicted


def test_retire_of_a_held_key_waits_for_its_last_holder():
    table = SlotTable(1)
    slots = placed(table, "a")
    table.acquire("a")
    table.acquire("a")
    assert table.retire("a") is None
    assert "a" not in table and table.is_retiring("a")
    with pytest.raises(SlotMissing):
        table.acquire("a")  # no new user of a retired version
    assert table.claim() is None, "the slot stays while a holder uses it"
    assert table.release("a") is None
    assert table.release("a") == slots["a"]  # the last holder frees it
    assert not table.is_retiring("a")
    assert table.claim() == (slots["a"], None)


def test_retire_of_an_unknown_key_changes_nothing():
    table = SlotTable(1)
    assert table.retire("ghost") is None
    assert table.claim() == (1, None)


def test_a_version_is_never_reloaded_in_place_under_the_same_name():
    table = SlotTable(2)
    slots = placed(table, "a")
    slot, _ = table.claim()
    with pytest.raises(ValueError, match="never reloaded in place"):
        table.place("a", slot)
    table.unclaim(slot)
    table.acquire("a")
    table.retire("a")
    with pytest.raises(ValueError, match="never reloaded in place"):
        table.place("a", table.claim()[0])  # retiring still holds its slot and contents
    assert table.revive("a")  # asked for again: the same slot, nothing rewritten
    assert table.slot_of("a") == slots["a"] and not table.is_retiring("a")
    assert not table.revive("a")
    table.release("a")
    assert "a" in table, "revived: no longer retires when idle"


def test_a_retired_and_freed_key_may_be_placed_again_in_a_fresh_slot():
    table = SlotTable(2)
    placed(table, "a")
    table.retire("a")
    slot, _ = table.claim()
    table.place("a", slot)
    assert "a" in table


def test_unbounded_table_hands_out_fresh_numbers_never_twice():
    table = SlotTable(None)
    drawn = []
    for key in ("a", "b", "a"):
        slot, evicted = table.claim()
        assert evicted is None
        table.place(key, slot)
        drawn.append(slot)
        table.retire(key)
    assert drawn == [1, 2, 3]
    assert table.fresh_slot() == 4
    with pytest.raises(ValueError, match="reuses its slots"):
        SlotTable(2).fresh_slot()


def test_holds_may_come_before_the_key_is_placed():
    table = SlotTable(None)
    table.hold("a")  # a request waiting for its version's load
    table.place("a", table.fresh_slot())
    assert table.idle_keys() == []
    assert table.retire("a") is None and table.is_retiring("a")
    assert table.release("a") is not None


def test_drop_forgets_the_placement_but_keeps_the_holders():
    table = SlotTable(1)
    slots = placed(table, "a")
    table.hold("a")
    table.drop("a")
    assert "a" not in table and table.holds("a") == 1
    assert table.claim() == (slots["a"], None)


def test_idle_keys_in_lru_order():
    table = SlotTable(4)
    placed(table, "a", "b", "c")
    table.acquire("b")
    table.touch("a")
    assert table.idle_keys() == ["c", "a"]
    assert list(table.live_keys()) == ["c", "b", "a"]


def test_num_slots_must_be_positive():
    with pytest.raises(ValueError):
        SlotTable(0)
