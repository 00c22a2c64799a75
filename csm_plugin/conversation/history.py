"""A conversation's history and the one rule that keeps it true: record what the listener heard.

`History` is pure: no model, no I/O, no clock. Each operation changes the history and returns
the events that describe the change, oldest first. The local service applies them to nothing
but itself (the cache is keyed by turn ids, so a changed turn is simply prefilled again); the
server sends them to its client, whose own `History` applies exactly the same events; the
framework adapters never edit a history, they say what was played.

The rules, each written once:
- a reply is recorded as heard: the frames delivered (or fewer, when the caller says less was
  played), rounded up to whole frames, and the words estimated to start within them;
- a barge-in trims the last `replies` agent turns newest first: each keeps what started playing;
- a turn is dropped once the newer turns and the pinned voice prompts alone fill the context
  budget (no later reply could be conditioned on it), so a history never outgrows its budget by
  more than one turn; pinned voice prompts are never dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ContextTooLongError, InputError
from .types import FRAME_MS, Origin, Segment, Turn, Word, check_origin

# Typical conversational speaking rate, used to estimate which words a stretch of audio covers.
CHARS_PER_SECOND = 14.0


def word_timings(text: str) -> list[tuple[Word, int, int]]:
    """(word, char start, char end) with start times from the speaking-rate estimate."""
    return [
        (Word(m.group(), 1000 * m.start() / CHARS_PER_SECOND), m.start(), m.end()) for m in re.finditer(r"\S+", text)
    ]


def spoken_text(text: str, heard_ms: float) -> str:
    """The words of `text` that started within the first `heard_ms` (at least the first word)."""
    words = [w.text for w, _, _ in word_timings(text) if w.start_ms < heard_ms]
    return " ".join(words) or text.split()[0]


def check_played_ms(played_ms: object) -> float:
    """A finite, non-negative number of milliseconds (bool and strings refused)."""
    if isinstance(played_ms, bool) or not isinstance(played_ms, (int, float)):
        raise InputError(f"played_ms must be a number of milliseconds, got {type(played_ms).__name__} {played_ms!r}")
    if not math.isfinite(played_ms) or played_ms < 0:
        raise InputError(f"played_ms must be a finite number >= 0, got {played_ms!r}")
    return float(played_ms)


def heard_frames(played_ms: float) -> int:
    """Frames that started playing within `played_ms`: what was heard, rounded up to whole frames."""
    return math.ceil(check_played_ms(played_ms) / FRAME_MS)


def heard_part(segment: Segment, frames: int, *, complete: bool = False) -> Segment | None:
    """The first `frames` frames of an agent segment and the words estimated to start within
    them; None when nothing was heard. complete: all of it was heard, so the text stays whole."""
    if frames <= 0 or segment.codes is None:
        return None
    if frames >= segment.frames and complete:
        return segment
    frames = min(frames, segment.frames)
    return Segment(segment.speaker, spoken_text(segment.text, frames * FRAME_MS), segment.codes[:frames])


# --- events -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """A turn was appended."""

    segment: Segment
    origin: Origin


@dataclass(frozen=True)
class Trimmed:
    """The turn at `index` (among the unpinned turns) now holds only what was heard."""

    index: int
    segment: Segment


@dataclass(frozen=True)
class Removed:
    """The turn at `index` (among the unpinned turns) was not heard at all."""

    index: int


@dataclass(frozen=True)
class Dropped:
    """The `count` oldest unpinned turns no longer fit in any context and were dropped."""

    count: int


Event = Recorded | Trimmed | Removed | Dropped


# --- the history --------------------------------------------------------------------------------

class History:
    """Pinned voice prompts, then the conversation's turns, oldest first.

    rows(segment) -> backbone positions of a segment, and budget (positions) enable the bound on
    the history's length; a history without them (the remote client's) receives its drops as
    events from the side that has a tokenizer.
    """

    def __init__(
        self,
        voices: Iterable[Segment] = (),
        *,
        rows: Callable[[Segment], int] | None = None,
        budget: int | None = None,
    ):
        self._rows = rows
        self.budget = budget
        self._next_id = 0
        self._voices: list[Turn] = [self._turn(s, "voice") for s in voices]
        self._turns: list[Turn] = []

    # --- reading --------------------------------------------------------------------------

    @property
    def voices(self) -> list[Turn]:
        return list(self._voices)

    @property
    def turns(self) -> list[Turn]:
        """The unpinned turns, oldest first."""
        return list(self._turns)

    def __iter__(self):
        return iter(self._voices + self._turns)

    def __len__(self) -> int:
        return len(self._voices) + len(self._turns)

    @property
    def segments(self) -> list[Segment]:
        return [t.segment for t in self]

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self)

    def digest(self, voice_names: Mapping[int, str] | None = None) -> str:
        """A fingerprint of the unpinned turns (speaker, text, origin, codes) and the names of the
        voices: client and server compare it to tell whether the server's copy is current."""
        h = hashlib.sha256()
        h.update(json.dumps(sorted((int(k), v) for k, v in (voice_names or {}).items())).encode())
        for turn in self._turns:
            segment = turn.segment
            frames = -1 if segment.codes is None else segment.frames
            h.update(json.dumps([segment.speaker, segment.text, turn.origin, frames]).encode())
            if segment.codes is not None:
                h.update(np.ascontiguousarray(segment.codes, dtype="<u2").tobytes())
        return h.hexdigest()[:32]

    # --- operations (each returns its events) ---------------------------------------------

    def record(self, segment: Segment, origin: Origin) -> list[Event]:
        """Append a user or agent turn; then drop what no context can hold any more."""
        if check_origin(origin) == "voice":
            raise InputError("voice prompts are pinned when the conversation starts, not recorded")
        self._turns.append(self._turn(segment, origin))
        return [Recorded(segment, origin), *self._bound()]

    def record_reply(self, speaker: int, text: str, codes: Sequence | np.ndarray, *, complete: bool) -> list[Event]:
        """Record a reply as heard: `codes` are the frames the listener got (all delivered ones,
        or fewer when they said so); complete: it ran to its end and all of it was heard."""
        if len(codes) == 0:
            return []
        whole = Segment(speaker, text, np.stack([np.asarray(c) for c in codes]) if not isinstance(codes, np.ndarray) else codes)
        return self.record(heard_part(whole, whole.frames, complete=complete), "agent")

    def record_heard(
        self, speaker: int, text: str, codes: Sequence | np.ndarray, *, complete: bool,
        played_ms: float | None = None, replies: int = 1,
    ) -> tuple[list[Event], Turn | None]:
        """A reply just ended: record it as heard (record_reply), then apply a barge-in that came
        while it ran (trim_heard over it and the replies before it). Returns the events and the
        reply's turn as finally kept (None when none of it was heard)."""
        events = self.record_reply(speaker, text, codes, complete=complete and played_ms is None)
        index = len(self._turns) - 1 if events else None
        replies = replies if events else replies - 1  # a reply with no frames is not in the history
        if played_ms is not None and replies >= 1:
            events += self.trim_heard(played_ms, replies)
        if index is None or any(isinstance(e, Removed) and e.index == index for e in events):
            return events, None
        return events, self._turns[index]

    def trim_heard(self, played_ms: float, replies: int = 1) -> list[Event]:
        """The listener talked over the last `replies` agent turns, played back to back, after
        `played_ms` of them: trim them newest first, each to the frames that started playing.
        Turns heard in full (and every turn before them) stay as they are."""
        played_ms = check_played_ms(played_ms)
        if isinstance(replies, bool) or not isinstance(replies, int) or replies < 1:
            raise InputError(f"replies must be an int >= 1, got {replies!r}")
        last = self._turns[-replies:] if len(self._turns) >= replies else []
        if not last or any(t.origin != "agent" or t.segment.codes is None for t in last):
            return []  # not a run of spoken replies at the end: nothing of them can be trimmed
        events: list[Event] = []
        offset_ms = sum(t.segment.frames for t in last) * FRAME_MS
        for index in reversed(range(len(self._turns) - replies, len(self._turns))):
            turn = self._turns[index]
            offset_ms -= turn.segment.frames * FRAME_MS
            kept = heard_frames(max(0.0, played_ms - offset_ms))
            if kept >= turn.segment.frames:
                break  # heard in full, and so was everything before it
            part = heard_part(turn.segment, kept)
            if part is None:
                del self._turns[index]
                events.append(Removed(index))
            else:
                self._turns[index] = self._turn(part, "agent")
                events.append(Trimmed(index, part))
        return events

    def context_for(self, room: int, budget: int) -> list[Turn]:
        """The turns a reply that needs `room` positions is conditioned on (pure): all of them
        if they fit in `budget` with the reply, else the pinned prompts and the newest turns that
        fill about half of what is left, so that the cache is rebuilt rarely, in large steps."""
        pinned = sum(t.rows for t in self._voices)
        if pinned + room > budget:
            raise ContextTooLongError(
                f"the voice prompts ({pinned} rows) and this reply (up to {room} rows) exceed the "
                f"context budget of {budget} positions; use a shorter text or voice prompt"
            )
        if self.rows + room <= budget:
            return list(self)
        total, keep = pinned, 0
        for turn in reversed(self._turns):
            if total + turn.rows > (budget - room + pinned) // 2:
                break
            total += turn.rows
            keep += 1
        return self._voices + self._turns[len(self._turns) - keep :]

    def keep(self, context: Sequence[Turn]) -> list[Event]:
        """Drop the turns older than `context` (from context_for): they no longer fit."""
        kept = [t.id for t in context if not t.pinned]
        if kept and [t.id for t in self._turns[-len(kept):]] != kept:
            raise InputError("the history changed since its context was chosen")
        return self._drop(len(self._turns) - len(kept))

    def apply(self, event: Event) -> None:
        """Apply an event produced by another History (the server's, on the client)."""
        if isinstance(event, Recorded):
            self._turns.append(self._turn(event.segment, event.origin))
        elif isinstance(event, Trimmed):
            self._turns[self._index(event.index)] = self._turn(event.segment, "agent")
        elif isinstance(event, Removed):
            del self._turns[self._index(event.index)]
        elif isinstance(event, Dropped):
            if not 0 <= event.count <= len(self._turns):
                raise InputError(f"cannot drop {event.count} of {len(self._turns)} turns")
            del self._turns[: event.count]
        else:
            raise InputError(f"not a history event: {event!r}")

    def replace(self, voices: Iterable[Segment], turns: Iterable[tuple[Segment, Origin]]) -> None:
        """Take another copy's state as it is (voices as the server pinned them, turns as kept)."""
        self._voices = [self._turn(s, "voice") for s in voices]
        self._turns = [self._turn(s, o) for s, o in turns]

    # --- internals ------------------------------------------------------------------------

    def _turn(self, segment: Segment, origin: Origin) -> Turn:
        self._next_id += 1
        return Turn(segment, origin, self._next_id, self._rows(segment) if self._rows is not None else 0)

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self._turns):
            raise InputError(f"no turn at index {index} (the history has {len(self._turns)})")
        return index

    def _bound(self) -> list[Event]:
        """Drop the oldest turns that the newer turns and the pinned prompts alone crowd out."""
        if self.budget is None or self._rows is None:
            return []
        newer = sum(t.rows for t in self._voices) + sum(t.rows for t in self._turns)
        count = 0
        for turn in self._turns[:-1]:  # the newest turn always stays
            newer -= turn.rows
            if newer < self.budget:
                break
            count += 1
        return self._drop(count)

    def _drop(self, count: int) -> list[Event]:
        if count <= 0:
            return []
        del self._turns[:count]
        return [Dropped(count)]


class HistoryView:
    """The read side of a conversation handle over its `_history` (the local service's and the
    remote client's conversations share it)."""

    _history: History

    @property
    def history(self) -> list[Segment]:
        """The context the next reply is conditioned on, oldest first (pinned voices included)."""
        return self._history.segments

    @property
    def turns(self) -> list[Turn]:
        """The history with each entry's origin (and id)."""
        return list(self._history)
