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


@dataclass
class CachedSegment:
    key: Hashable  # the caller's identity for this segment; equal keys mean equal rows
    start: int
    rows: int


@dataclass
class Slot:
    """What one backbone cache slot holds: a prefix of some conversation's context."""

    owner: Hashable | None = None
    segments: list[CachedSegment] = field(default_factory=list)
    streaming: bool = False  # a reply is generating into it
    busy: bool = False  # a chunked prefill is writing into it

    @property
    def in_use(self) -> bool:
        return self.streaming or self.busy

    @property
    def end(self) -> int:
        return self.segments[-1].start + self.segments[-1].rows if self.segments else 0


class SlotPool:
    """A fixed number of cache slots handed to owners, least recently used evicted first; a slot
    with a reply or a prefill in progress is never evicted."""

    def __init__(self, slots: int):
        self.slots = [Slot() for _ in range(slots)]
        self._lru: OrderedDict[Hashable, int] = OrderedDict()

    def slot_for(self, owner: Hashable) -> int:
        """The slot `owner` holds, or a free one, or the least recently used one (evicted)."""
        if owner in self._lru:
            if self.slots[self._lru[owner]].in_use:
                raise SlotsBusyError(f"the cache of {owner!r} is being written (a prefill or a reply)")
            self._lru.move_to_end(owner)
            return self._lru[owner]
        if len(self._lru) < len(self.slots):
            index = next(i for i, s in enumerate(self.slots) if s.owner is None)
        else:
            evicted = next((o for o, i in self._lru.items() if not self.slots[i].in_use), None)
            if evicted is None:
                raise SlotsBusyError(f"all {len(self.slots)} cache slots are generating; allow more cached conversations")
            index = self._lru.pop(evicted)
            log.debug("evicting the cache of %s", evicted)
        self.slots[index] = Slot(owner)
        self._lru[owner] = index
        return index

    def release(self, owner: Hashable) -> None:
        index = self._lru.pop(owner, None)
        if index is not None:
            self.slots[index] = Slot()

    def cached_keys(self, owner: Hashable) -> list[Hashable]:
        index = self._lru.get(owner)
        return [] if index is None else [s.key for s in self.slots[index].segments]

    def truncate(self, slot: int, position: int) -> None:
        """Forget everything at or after `position`: O(1), later writes overwrite the cache."""
        s = self.slots[slot]
        s.segments = [c for c in s.segments if c.start + c.rows <= position]
