"""Slot leases (csm_plugin.engine.slots.SlotPool), without a model: random sequences of owners
taking slots, writers starting and ending, and releases, checked against the rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_plugin.engine.slots import SlotPool, SlotsBusyError

OWNERS = ["a", "b", "c", "d", "e"]
steps = st.lists(
    st.tuples(st.sampled_from(["take", "write", "end", "release"]), st.sampled_from(OWNERS)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(1, 3))
def test_a_slot_being_written_is_never_handed_to_anyone_else(ops, slots):
    pool = SlotPool(slots)
    writes: dict[str, list] = {o: [] for o in OWNERS}  # owner -> leases of writes in progress
    for op, owner in ops:
        if op == "take":
            written_by_others = {lease.slot for other, leases in writes.items() if other != owner
                                 for lease in leases if pool.holds(lease)}
            try:
                index = pool.slot_for(owner)
            except SlotsBusyError:
                # refused only when the owner's own slot is being written, or every slot is
                assert any(pool.holds(lease) for lease in writes[owner]) or all(s.in_use for s in pool.slots)
                continue
            assert index not in written_by_others  # never a slot another owner's write still holds
        elif op == "write":
            index = pool._lru.get(owner)
            if index is None or pool.slots[index].in_use:
                continue
            pool.slots[index].busy = True
            writes[owner].append(pool.lease(index))
        elif op == "end" and writes[owner]:
            lease = writes[owner].pop()
            released = pool.slots[lease.slot].released
            kept = pool.end_write(lease)
            assert kept == (not released)  # a slot released during the write is freed at its end
            if released:
                assert pool.slots[lease.slot].free
        elif op == "release":
            index = pool._lru.get(owner)
            pool.release(owner)
            assert owner not in pool._lru  # the owner gets a fresh slot next time
            if index is not None and not any(pool.holds(lease) for lease in writes[owner]):
                assert pool.slots[index].free
        # a lease holds only while its slot is the one it was taken on
        for leases in writes.values():
            for lease in leases:
                slot = pool.slots[lease.slot]
                if pool.holds(lease):
                    assert slot.in_use


def test_a_lease_outlives_nothing():
    pool = SlotPool(1)
    index = pool.slot_for("a")
    pool.slots[index].busy = True
    lease = pool.lease(index)
    pool.release("a")  # while the write runs: deferred
    with pytest.raises(SlotsBusyError):
        pool.slot_for("b")  # not handed on before the write ends
    assert pool.end_write(lease) is False and pool.slots[index].free
    assert pool.slot_for("b") == index and not pool.holds(lease)  # handed on: the old lease is void
    assert pool.end_write(lease) is False and pool.slots[index].owner == "b"  # and changes nothing
