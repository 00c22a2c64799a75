"""The conversation core's rules, without a model: property tests over random sequences of
record / barge-in over several replies / budget trim, and the torch-free imports."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_plugin.conversation import FRAME_MS, History, Segment, SpeakOptions
from csm_plugin.conversation.history import Dropped, Recorded, Removed, Trimmed, heard_part, spoken_text
from csm_plugin.conversation.protocol import events_in, events_out
from csm_plugin.errors import ContextTooLongError, InputError

WORDS = ["yes", "no", "maybe", "hello", "there", "order", "parcel", "blue", "jacket", "sorry"]


def rows(segment: Segment) -> int:
    """A stand-in for the tokenizer: a few rows per word, then the frames and the end frame."""
    return 3 + 2 * len(segment.text.split()) + (segment.frames + 1 if segment.codes is not None else 0)


def codes(frames: int, salt: int = 0) -> np.ndarray:
    return (np.arange(frames * 32).reshape(frames, 32) * 7 + salt) % 2048


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
user_turn = st.tuples(st.just("user"), texts, st.integers(0, 20))
reply = st.tuples(st.just("reply"), texts, st.integers(0, 20), st.booleans())
barge_in = st.tuples(st.just("interrupt"), st.floats(0, 3000, allow_nan=False), st.integers(1, 3))
operations = st.lists(st.one_of(user_turn, reply, barge_in), max_size=30)


def apply(history: History, op, salt: int):
    if op[0] == "user":
        _, text, frames = op
        return history.record(Segment(1, text, codes(frames, salt) if frames else None), "user")
    if op[0] == "reply":
        _, text, frames, complete = op
        return history.record_reply(0, text, list(codes(frames, salt)), complete=complete)
    _, played_ms, replies = op
    return history.trim_heard(played_ms, replies)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(40, 400), st.integers(0, 2))
def test_history_rules_hold_over_random_sequences(ops, budget, voices):
    pinned = [Segment(0, f"voice {i}", codes(3, 100 + i)) for i in range(voices)]
    server = History(pinned, rows=rows, budget=budget)
    client = History(pinned)  # no tokenizer: it applies the server's events, as the remote client does
    for salt, op in enumerate(ops):
        before = server.turns
        events = apply(server, op, salt)
        for event in events_in(events_out(events)):  # through the wire format
            client.apply(event)
        # the client's copy is the server's: same digest, same segments
        assert client.digest({0: "v"}) == server.digest({0: "v"})
        assert client.segments == server.segments
        # pinned voice prompts are never dropped
        assert server.segments[:voices] == pinned
        # bounded: the newer turns and the pinned prompts alone never fill the budget
        turns = server.turns
        assert sum(rows(s) for s in pinned) + sum(t.rows for t in turns[1:]) < budget or len(turns) <= 1
        if op[0] == "interrupt":
            check_barge_in(before, server.turns, *op[1:])


def check_barge_in(before, after, played_ms: float, replies: int) -> None:
    """Kept audio equals what was heard, rounded up to whole frames, reply by reply."""
    last = before[-replies:] if len(before) >= replies else []
    if not last or any(t.origin != "agent" or t.segment.codes is None for t in last):
        assert [t.segment for t in after] == [t.segment for t in before]
        return
    assert [t.segment for t in after[: len(before) - replies]] == [t.segment for t in before[: len(before) - replies]]
    offset, kept = 0.0, []
    for turn in last:
        heard = min(turn.segment.frames, math.ceil(max(0.0, played_ms - offset) / FRAME_MS))
        offset += turn.segment.frames * FRAME_MS
        kept.append((turn, heard))
    survivors = after[len(before) - replies :]
    expected = [(t, h) for t, h in kept if h > 0]
    assert len(survivors) == len(expected)
    for got, (turn, heard) in zip(survivors, expected):
        assert np.array_equal(got.segment.codes, turn.segment.codes[:heard])
        if heard < turn.segment.frames:
            assert got.segment.text == spoken_text(turn.segment.text, heard * FRAME_MS)
        else:
            assert got.segment.text == turn.segment.text


def test_barge_in_over_three_replies_trims_newest_first():
    history = History()
    for i, frames in enumerate((5, 4, 6)):
        history.record_reply(0, f"reply number {i} is here", list(codes(frames, i)), complete=True)
    events = history.trim_heard(5 * 80 + 2 * 80 + 1)  # replies=1: only the newest counts, from its own start
    assert [type(e) for e in events] == [] or all(isinstance(e, (Trimmed, Removed)) for e in events)
    history = History()
    for i, frames in enumerate((5, 4, 6)):
        history.record_reply(0, f"reply number {i} is here", list(codes(frames, i)), complete=True)
    events = history.trim_heard(5 * 80 + 2 * 80 - 10, replies=3)  # the middle reply: 2 frames started
    assert events == [Removed(2), Trimmed(1, events[1].segment)]
    assert [s.frames for s in history.segments] == [5, 2]


def test_record_reply_keeps_the_delivered_frames_and_their_words():
    history = History()
    text = "Hello there, how are you doing today?"
    events = history.record_reply(0, text, list(codes(3)), complete=False)
    assert events == [Recorded(history.segments[0], "agent")]
    assert history.segments[0].text == spoken_text(text, 240) and history.segments[0].frames == 3
    history.record_reply(0, text, list(codes(4)), complete=True)
    assert history.segments[1].text == text  # ran to its end: the whole text
    assert history.record_reply(0, text, [], complete=False) == []  # nothing heard, nothing kept


def test_budget_drops_oldest_turns_never_voices():
    voice = Segment(0, "my voice", codes(4))
    history = History([voice], rows=rows, budget=60)
    events = []
    for i in range(40):
        events += history.record(Segment(1, f"turn {i} " + "word " * 5), "user")
    assert any(isinstance(e, Dropped) for e in events)
    assert history.segments[0] == voice and history.turns[-1].segment.text.startswith("turn 39")
    assert rows(voice) + sum(t.rows for t in history.turns[1:]) < 60


def test_context_for_keeps_about_half_and_refuses_what_cannot_fit():
    history = History([Segment(0, "voice", codes(2))], rows=rows, budget=200)
    for i in range(12):
        history.record(Segment(1, f"turn {i} and some words"), "user")
    context = history.context_for(room=50, budget=200)
    assert context[0].pinned and context[-1] is history.turns[-1]
    assert sum(t.rows for t in context) <= (200 - 50 + rows(history.segments[0])) // 2
    dropped = len(history.turns) - (len(context) - 1)
    assert dropped > 0 and history.keep(context) == [Dropped(dropped)]
    assert history.turns == context[1:]
    with pytest.raises(ContextTooLongError):
        history.context_for(room=199, budget=200)


@pytest.mark.parametrize("played", [-5, float("nan"), float("inf"), "10", True, None])
def test_bad_played_ms_is_refused_and_changes_nothing(played):
    history = History()
    history.record_reply(0, "one two three", list(codes(5)), complete=True)
    before = history.segments
    with pytest.raises(InputError):
        history.trim_heard(played)
    assert history.segments == before


def test_heard_part_rounds_up_to_whole_frames():
    segment = Segment(0, "one two three four five six", codes(10))
    assert heard_part(segment, 0) is None
    assert heard_part(segment, 10, complete=True) is segment
    assert heard_part(segment, 3).frames == 3


def test_speak_options_validate_once():
    assert SpeakOptions.build(None, seed=3, top_k=1) == SpeakOptions(seed=3, top_k=1)
    for bad in ({"temperature": 0}, {"temperature": 10**400}, {"max_audio_ms": 10**400}, {"top_k": 10**30}, {"seed": 1.5}, {"max_audio_ms": float("inf")},
                {"chunk_frames": 0}, {"speaker": -1}, {"nonsense": 1}):
        with pytest.raises(InputError):
            SpeakOptions.build(None, **bad)


def test_segment_codes_are_compact_and_checked():
    segment = Segment(0, "hi", [[1] * 32, [2] * 32])
    assert segment.codes.dtype == np.uint16 and not segment.codes.flags.writeable
    for bad in ([[1] * 31], [[-1] * 32], [[2051] * 32], [[0.5] * 32]):
        with pytest.raises(InputError):
            Segment(0, "hi", bad)


def test_core_and_client_import_without_torch():
    code = ("import sys; import csm_plugin.client, csm_plugin.conversation.protocol; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_text_with_a_lone_surrogate_is_refused():
    """A lone surrogate reached the tokenizer as a TypeError on the local path."""
    from csm_plugin.conversation.types import check_text

    for text in ("hello \ud800 there", "\udfff"):
        with pytest.raises(InputError, match="not valid Unicode"):
            check_text(text)
