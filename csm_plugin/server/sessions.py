"""The conversations a server holds, per API key, and the bounds on them.

A conversation outlives its WebSocket: a client that reconnects (network blip, proxy restart)
finds it again. Detached conversations are forgotten after an idle timeout or when too many are
held; that costs nothing but one replay, because the client keeps the history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..conversation.history import Event
from ..conversation.types import Segment, Turn
from ..service import Conversation, CSMService

if TYPE_CHECKING:
    from .stream import Connection

log = logging.getLogger(__name__)


# --- conversation views ------------------------------------------------------------------------

def voice_segments(conv: Conversation) -> list[Segment]:
    return [t.segment for t in conv.turns if t.pinned]


async def add_turn(conv: Conversation, segment: Segment, origin: str, audio: tuple | None = None) -> None:
    """Add a wire segment: with its codes (a replayed history, or codes sent by the client), with
    audio (samples, rate) to encode, or text only."""
    samples, rate = audio if audio is not None else (None, None)
    await conv.add_segment(segment.speaker, segment.text, samples, rate, codes=segment.codes, origin=origin)


def worker_alive(service: CSMService) -> bool:
    return service.alive


# --- sessions ----------------------------------------------------------------------------------

class Session:
    """One conversation of one API key, and the connection it is attached to (if any)."""

    def __init__(self, key_id: str, conversation_id: str, conv: Conversation, voices: dict[int, str]):
        self.key_id = key_id
        self.id = conversation_id
        self.conv = conv
        self.voices = voices
        self.connection: Connection | None = None
        self.last_used = time.monotonic()
        self._events: list[Event] = []  # history changes not yet sent to the client
        conv.subscribe(self._events.extend)

    def turns(self) -> list[Turn]:
        """The turns that are not pinned voice prompts, oldest first."""
        return [t for t in self.conv.turns if not t.pinned]

    def digest(self) -> str:
        return self.conv.digest(self.voices)

    def take_events(self) -> list[Event]:
        """The history's changes since the last call, oldest first (sent to the client in order)."""
        events, self._events[:] = list(self._events), []
        return events


class Sessions:
    def __init__(self, service: CSMService, retained: int, idle_timeout_s: float, on_change=None):
        self.service = service
        self.retained = retained
        self.idle_timeout_s = idle_timeout_s
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._on_change = on_change or (lambda n: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key_id: str, conversation_id: str) -> Session | None:
        session = self._sessions.get((key_id, conversation_id))
        if session is not None:
            self.touch(session)
        return session

    def touch(self, session: Session) -> None:
        session.last_used = time.monotonic()
        if (session.key_id, session.id) in self._sessions:
            self._sessions.move_to_end((session.key_id, session.id))

    def create(self, key_id: str, conversation_id: str, voices: dict[int, str]) -> Session:
        """A new, empty conversation (the caller has discarded any older one)."""
        internal_id = f"{key_id}/{conversation_id}"
        conv = self.service.conversation(internal_id, voices=voices)
        session = Session(key_id, conversation_id, conv, voices)
        self._sessions[(key_id, conversation_id)] = session
        self._on_change(len(self._sessions))
        return session

    async def discard(self, session: Session) -> None:
        """Forget a conversation and free its cache slot. Its connection (if any) must have
        stopped speaking."""
        if self._sessions.get((session.key_id, session.id)) is session:
            del self._sessions[(session.key_id, session.id)]
            self._on_change(len(self._sessions))
        try:
            await session.conv.close()
        except Exception as e:  # noqa: BLE001 - forgetting must not fail the caller
            log.warning("closing conversation %s/%s failed: %s", session.key_id, session.id, e)

    async def sweep(self) -> None:
        """Forget detached conversations idle too long, then the oldest detached ones over the cap."""
        now = time.monotonic()
        detached = [s for s in self._sessions.values() if s.connection is None and not s.conv.speaking]
        excess = len(self._sessions) - self.retained
        for session in detached:  # oldest first
            if now - session.last_used > self.idle_timeout_s or excess > 0:
                excess -= 1
                await self.discard(session)

    async def run_sweeper(self, interval_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must keep running
                log.exception("sweeping idle conversations failed")

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())
