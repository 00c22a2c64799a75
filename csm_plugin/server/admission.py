"""Admission: which replies may generate now, which wait, and which must give their place up.

A server generates at most `capacity` replies at once (by default one per KV-cache slot: a reply
beyond the slots could not start anyway) and at most `per_key` for one API key. A reply that finds
no place waits in a bounded queue, up to `wait_s`; a full queue or a wait that runs out is refused
with `busy` and a retry-after hint, which `RemoteBackend` honours with backoff. Places are handed
out round-robin across the keys that wait, so one key's burst does not starve another key.

A reply whose reader has fallen behind real time (see stream.py) is marked `behind`: it is out of
the batch already (the engine pauses a stream whose listener does not take its frames). When
another reply waits for a place and none is free, the reply that fell behind first gives its
place up: it no longer counts against the limits and the waiting reply is admitted at once. The
reply that gave its place up is not ended: the engine suspends it when the reply admitted in its
stead needs its cache slot (csm_plugin/engine/preempt.py), and when its reader catches up it
counts again (for a while above the limit, if the places are taken; no new reply is admitted
until there is room again) and goes on where it was. A reader that stays behind past
send_timeout_s ends its reply with `slow_consumer` (stream.py), its history keeping exactly the
frames it was sent.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..conversation.protocol import Code, ProtocolError


class Busy(ProtocolError):
    """No place within the wait limit, or the queue is full: try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(Code.BUSY, message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Place:
    """One admitted reply. A place handed to a waiting reply is `yielded`: its reply goes on, out
    of the limits, until its reader catches up or it ends."""

    key_id: str
    admitted_at: float = field(default_factory=time.monotonic)
    behind_since: float | None = None  # its reader fell behind real time at this moment
    yielded: bool = False  # gave its place to a waiting reply while behind: not counted
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    key_id: str
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)


class Admission:
    def __init__(self, capacity: int, per_key: int, max_queue: int, max_queue_per_key: int, wait_s: float,
                 on_change: Callable[[int, int, int], None] | None = None):
        self.capacity = capacity
        self.per_key = per_key
        self.max_queue = max_queue
        self.max_queue_per_key = max_queue_per_key
        self.wait_s = wait_s
        self.active: set[Place] = set()  # the places counted against capacity and per_key
        self.active_per_key: collections.Counter[str] = collections.Counter()
        self.yielded: set[Place] = set()  # replies behind that gave their place up (not counted)
        self._queues: collections.OrderedDict[str, collections.deque[_Waiter]] = collections.OrderedDict()
        self._hold_s = 2.0  # running mean of how long a place is held (for the retry-after hint)
        self._closed: ProtocolError | None = None
        self._on_change = on_change or (lambda active, queued, behind: None)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def behind(self) -> int:
        """Replies whose reader is behind real time (holding a place or not)."""
        return sum(p.behind_since is not None for p in (*self.active, *self.yielded))

    def retry_after_s(self) -> float:
        """A hint: about when a place may be free for one more reply (whole seconds, 1..60)."""
        rounds = (self.queued + 1) / max(1, self.capacity)
        return float(min(60, max(1, math.ceil(rounds * self._hold_s))))

    async def acquire(self, key_id: str) -> Place:
        """A place for one reply of `key_id`: at once, or after waiting in the queue. Raises Busy
        (queue full, or no place within wait_s) or the close reason (draining)."""
        if self._closed is not None:
            raise self._closed
        if self._free_for(key_id) and not self._queues.get(key_id):
            return self._admit(key_id)
        if self.queued >= self.max_queue:
            raise Busy(f"the server is busy: {self.queued} replies are waiting", self.retry_after_s())
        queue = self._queues.setdefault(key_id, collections.deque())
        if len(queue) >= self.max_queue_per_key:
            raise Busy(f"this API key has {len(queue)} replies waiting already", self.retry_after_s())
        waiter = _Waiter(key_id, asyncio.get_running_loop().create_future())
        queue.append(waiter)
        self._changed()
        self._rebalance()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except asyncio.TimeoutError:
            pass
        except BaseException:  # cancelled, or the queue was closed (draining)
            place = self._leave(waiter)
            if place is not None:  # handed a place just as it gave up: pass it on
                self.release(place)
            raise
        place = self._leave(waiter)
        if place is None:
            raise Busy(f"no place for the reply within {self.wait_s:g} s: the server is busy", self.retry_after_s())
        return place

    def _leave(self, waiter: _Waiter) -> Place | None:
        """Take a waiter out of the queue; the place it was handed, if any."""
        queue = self._queues.get(waiter.key_id)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.key_id]
            self._changed()
        if not waiter.future.done():
            waiter.future.cancel()
            return None
        if waiter.future.cancelled() or waiter.future.exception() is not None:
            return None
        return waiter.future.result()

    def release(self, place: Place) -> None:
        if place.released:
            return
        place.released = True
        if place.yielded:
            self.yielded.discard(place)
        else:
            self._uncount(place)
        held = time.monotonic() - place.admitted_at
        self._hold_s = 0.8 * self._hold_s + 0.2 * min(held, 60.0)
        self._dispatch()
        self._changed()

    def set_behind(self, place: Place, behind: bool) -> None:
        """The place's reader fell behind real time (or caught up again: a reply that gave its
        place up counts again, even above the limits, since it is running already)."""
        if place.released:
            return
        if behind and place.behind_since is None:
            place.behind_since = time.monotonic()
            self._changed()
            self._rebalance()
        elif not behind and place.behind_since is not None:
            place.behind_since = None
            if place.yielded:
                place.yielded = False
                self.yielded.discard(place)
                self._count(place)
            self._changed()

    def close(self, reason: ProtocolError) -> None:
        """Refuse every waiting and every new request with `reason` (the server is draining)."""
        self._closed = reason
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                if not waiter.future.done():
                    waiter.future.set_exception(reason)
        self._queues.clear()
        self._changed()

    # --- internals -------------------------------------------------------------------------

    def _free_for(self, key_id: str) -> bool:
        return len(self.active) < self.capacity and self.active_per_key[key_id] < self.per_key

    def _admit(self, key_id: str) -> Place:
        place = Place(key_id)
        self._count(place)
        self._changed()
        return place

    def _count(self, place: Place) -> None:
        self.active.add(place)
        self.active_per_key[place.key_id] += 1

    def _uncount(self, place: Place) -> None:
        self.active.discard(place)
        self.active_per_key[place.key_id] -= 1
        if self.active_per_key[place.key_id] <= 0:
            del self.active_per_key[place.key_id]

    def _dispatch(self) -> None:
        """Hand free places to waiters, one key after another (round robin)."""
        while len(self.active) < self.capacity:
            for key_id in list(self._queues):
                queue = self._queues[key_id]
                while queue and queue[0].future.done():  # cancelled or timed out meanwhile
                    queue.popleft()
                if queue and self.active_per_key[key_id] < self.per_key:
                    waiter = queue.popleft()
                    self._queues.move_to_end(key_id)  # this key goes to the back of the line
                    if not queue:
                        del self._queues[key_id]
                    waiter.future.set_result(self._admit(key_id))
                    break
                if not queue:
                    del self._queues[key_id]
            else:
                return  # nobody that can take a place

    def _rebalance(self) -> None:
        """While replies wait and every place is taken, the reply that fell behind first gives
        its place to one of them (as long as that lets a waiting reply in)."""
        while len(self.active) >= self.capacity:
            victims = [p for p in self.active if p.behind_since is not None]
            waiters = [w for q in self._queues.values() for w in q if not w.future.done()]
            if not victims or not waiters or len(self.active) - len(victims) >= self.capacity:
                return  # (the last: even all of them would not make room, after places came back above it)
            victim = min(victims, key=lambda p: p.behind_since)
            if not any(self.active_per_key[w.key_id] < self.per_key or w.key_id == victim.key_id for w in waiters):
                return  # the waiting replies are held by their key's limit, not by this place
            self._uncount(victim)
            victim.yielded = True
            self.yielded.add(victim)
            self._dispatch()
            self._changed()

    def _changed(self) -> None:
        self._on_change(len(self.active), self.queued, self.behind)
