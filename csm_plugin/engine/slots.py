"""Cache slot bookkeeping: which owner (conversation) each backbone cache slot belongs to, which
keyed segments of its context the slot holds, and which slot to evict (least recently used) when
a new owner needs one. Bookkeeping only, no tensors: the Engine writes the cache itself."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..errors import EngineError

log = logging.getLogger(__name__)


class SlotsBusyError(EngineError):
    """Every cache slot has a reply in progress."""


class SlotReleasedError(EngineError):
    """The slot's owner let go of it while a prefill was writing into it."""


@dataclass
class CachedSegment:
    key: Hashable  # the caller's identity for this segment; equal keys mean equal rows
    start: int
    rows: int


@dataclass(frozen=True)
class Lease:
    """A writer's claim on a slot: valid while the slot is still the one it was handed (the
    generation changes whenever the slot is handed to another owner)."""

    slot: int
    generation: int


@dataclass
class Slot:
    """What one backbone cache slot holds: a prefix of some conversation's context."""

    owner: Hashable | None = None
    generation: int = 0
    segments: list[CachedSegment] = field(default_factory=list)
    streaming: bool = False  # a reply is generating into it
    busy: bool = False  # a chunked prefill is writing into it
    released: bool = False  # its owner let go while a write ran: freed when the write ends

    @property
    def in_use(self) -> bool:
        return self.streaming or self.busy

    @property
    def free(self) -> bool:
        return self.owner is None

    @property
    def end(self) -> int:
        return self.segments[-1].start + self.segments[-1].rows if self.segments else 0


class SlotPool:
    """A fixed number of cache slots handed to owners, least recently used evicted first.

    A slot with a reply or a prefill in progress is never evicted nor handed to anyone else:
    releasing it is deferred until the write ends, and every writer holds a Lease that tells
    whether the slot is still the one it started writing into."""

    def __init__(self, slots: int):
        self.slots = [Slot() for _ in range(slots)]
        self._lru: OrderedDict[Hashable, int] = OrderedDict()
        self._generations = 0

    def slot_for(self, owner: Hashable) -> int:
        """The slot `owner` holds, or a free one, or the least recently used one (evicted)."""
        if owner in self._lru:
            if self.slots[self._lru[owner]].in_use:
                raise SlotsBusyError(f"the cache of {owner!r} is being written (a prefill or a reply)")
            self._lru.move_to_end(owner)
            return self._lru[owner]
        index = next((i for i, s in enumerate(self.slots) if s.free), None)
        if index is None:
            evicted = next((o for o, i in self._lru.items() if not self.slots[i].in_use), None)
            if evicted is None:
                raise SlotsBusyError(f"all {len(self.slots)} cache slots are generating; allow more cached conversations")
            index = self._lru.pop(evicted)
            log.debug("evicting the cache of %s", evicted)
        self._generations += 1
        self.slots[index] = Slot(owner, self._generations)
        self._lru[owner] = index
        return index

    def lease(self, slot: int) -> Lease:
        return Lease(slot, self.slots[slot].generation)

    def holds(self, lease: Lease) -> bool:
        """The slot is still the one the lease was taken on (not freed or handed on since)."""
        return self.slots[lease.slot].generation == lease.generation

    def end_write(self, lease: Lease) -> bool:
        """A prefill or reply holding `lease` stopped writing. False if the slot's owner let it
        go meanwhile (then it is freed now, and the writer must leave it alone)."""
        if not self.holds(lease):
            return False
        slot = self.slots[lease.slot]
        slot.busy = slot.streaming = False
        if slot.released:
            self.slots[lease.slot] = Slot()
            return False
        return True

    def release(self, owner: Hashable) -> None:
        """Let go of `owner`'s slot: now, or when the write in progress ends."""
        index = self._lru.pop(owner, None)
        if index is None:
            return
        if self.slots[index].in_use:
            self.slots[index].released = True
        else:
            self.slots[index] = Slot()

    def cached_keys(self, owner: Hashable) -> list[Hashable]:
        index = self._lru.get(owner)
        return [] if index is None else [s.key for s in self.slots[index].segments]

    def truncate(self, slot: int, position: int) -> None:
        """Forget everything at or after `position`: O(1), later writes overwrite the cache."""
        s = self.slots[slot]
        s.segments = [c for c in s.segments if c.start + c.rows <= position]
