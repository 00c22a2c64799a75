"""What the model's history keeps of each agent turn: exactly what LiveKit reports as played.

The LiveKit behaviour each test mirrors:
- upstream tests/test_agent_session.py `test_pipeline_multi_segment_flush` and
  `test_pipeline_multi_segment_interrupted`: an llm_node that yields FlushSentinel splits a reply
  into segments; each segment is its own TTS stream (the next one synthesized while the previous
  one plays) and its own `playback_finished` event; an interruption in the first segment means
  the second is never forwarded to the audio output.
- upstream tests/test_tts_fallback.py `test_tts_recover` / `test_tts_stream_fallback`: after a
  failure, `tts.FallbackAdapter` probes the failed TTS with the same text in a task of its own and
  throws the audio away (`AvailabilityChangedEvent(available=True)` when it succeeds).
- LiveKit's tool step (agent_activity `_pipeline_reply_task`): the text before a tool call plays,
  the SpeechHandle waits for the tool (not done, no longer the current speech), then the tool
  reply is spoken under the same handle.
- `io.AudioOutput`: one `playback_finished(playback_position, interrupted)` per output segment,
  emitted while its speech is the session's `current_speech`.
Offline: a small random checkpoint, an AgentSession without a room.
"""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("livekit.agents")

from livekit.agents import (  # noqa: E402
    DEFAULT_API_CONNECT_OPTIONS,
    Agent,
    AgentSession,
    function_tool,
    llm,
    tts,
)
from livekit.agents.voice.speech_handle import SpeechHandle  # noqa: E402
from livekit.plugins import csm  # noqa: E402
from test_livekit_support import (  # noqa: E402
    REPLY_MS,
    SEED,
    CaptureOutput,
    CountingBackend,
    ScriptedLLM,
    SegmentedAgent,
    ToneTTS,
    frames_of,
    wait_until,
)

from csm_plugin.backend import shared_service  # noqa: E402

NO_TURN_DETECTION = {"turn_detection": None}


def turns_of(speech) -> list[tuple[int, str, int]]:
    return [(s.speaker, s.text, frames_of(s)) for s in speech.conversation.history]


async def start_session(speech, agent, out, llm=None) -> AgentSession:
    # a SegmentedAgent's llm_node answers itself; the session still wants an LLM to call it
    session = AgentSession(llm=llm or ScriptedLLM([]), tts=speech, vad=None, turn_handling=NO_TURN_DETECTION)
    session.output.audio = out
    speech.attach(session)
    await session.start(agent=agent, record=False)
    return session


@pytest.mark.asyncio
async def test_a_reply_interrupted_in_its_first_segment_keeps_no_frame_of_the_second(hf_checkpoint):
    """test_pipeline_multi_segment_interrupted, seen from the model's history: the second
    segment was synthesized (while the first played) but never played, so none of its frames
    stay; the first keeps what was heard. A later interruption trims that later reply."""
    speech = csm.TTS(backend=await shared_service(hf_checkpoint), seed=SEED, max_audio_ms=REPLY_MS)
    agent = SegmentedAgent([["Your parcel left on Monday.", "It should arrive soon."], ["Let me look again."]])
    out = CaptureOutput(played_fraction=0.5)
    out.hold = True  # each segment keeps playing until the user talks over it
    session = await start_session(speech, agent, out)
    try:
        handle = session.generate_reply(user_input="Where is my parcel?")
        await wait_until(
            lambda: speech.conversation is not None
            and [s.text for s in speech.conversation.history][-1:] == ["It should arrive soon."],
            "the second segment to be synthesized while the first plays",
        )
        assert len(out.reported) == 0  # the first segment is still playing
        session.interrupt()
        await handle.wait_for_playout()
        assert [ev.interrupted for ev in out.reported] == [True]  # the second was never forwarded
        kept = math.ceil(out.reported[0].playback_position * 1000 / 80)
        assert 0 < kept < 6
        await wait_until(lambda: len(speech.conversation.history) == 2, "the reply to be trimmed to what was heard")
        user, heard = speech.conversation.history
        assert (user.speaker, user.text) == (1, "Where is my parcel?")
        assert heard.speaker == 0 and frames_of(heard) == kept
        assert "Your parcel left on Monday.".startswith(heard.text) and heard.text != "Your parcel left on Monday."

        # The next reply is matched to its own playback: interrupted, it is the one trimmed.
        before = out.duration
        handle = session.generate_reply(user_input="Are you sure?")
        await wait_until(lambda: out.duration > before, "the next reply to start playing")
        await wait_until(lambda: not speech.conversation.speaking, "the next reply to be synthesized")
        session.interrupt()
        await handle.wait_for_playout()
        kept_next = math.ceil(out.reported[-1].playback_position * 1000 / 80)
        await wait_until(
            lambda: [t[:2] for t in turns_of(speech)][-2:] == [(1, "Are you sure?"), (0, speech.conversation.history[-1].text)]
            and frames_of(speech.conversation.history[-1]) == kept_next,
            "the later reply to be trimmed",
        )
        assert turns_of(speech)[:2] == [(1, "Where is my parcel?", 0), (0, heard.text, kept)]  # untouched
        assert len(speech.conversation.history) == 4
    finally:
        await session.aclose()
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_reply_played_in_full_keeps_every_segment_and_piece(hf_checkpoint):
    """test_pipeline_multi_segment_flush: two segments, two playback events, both played; every
    piece of both stays, in order, with all its frames."""
    speech = csm.TTS(backend=await shared_service(hf_checkpoint), seed=SEED, max_audio_ms=REPLY_MS)
    agent = SegmentedAgent([["Sure thing, I can help.", "Your order shipped today."]])
    out = CaptureOutput()
    session = await start_session(speech, agent, out)
    try:
        await session.generate_reply(user_input="Can you help me?").wait_for_playout()
        assert [ev.interrupted for ev in out.reported] == [False, False]
        history = speech.conversation.history
        assert [(s.speaker, s.text) for s in history] == [
            (1, "Can you help me?"), (0, "Sure thing,"), (0, "I can help."), (0, "Your order shipped today."),
        ]
        assert all(frames_of(s) == 6 for s in history[1:])  # REPLY_MS: nothing trimmed
        assert round(sum(ev.playback_position for ev in out.reported) / 0.08) == 18
    finally:
        await session.aclose()
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_synthesis_never_played_leaves_the_history_unchanged(hf_checkpoint):
    """A `synthesize()` outside the session's speech (its audio never reaches the session's
    output) is spoken, but is not a turn of the conversation: the next reply is conditioned on
    what the listener heard, not on it."""
    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS)
    out = CaptureOutput()
    session = await start_session(speech, Agent(instructions="x"), out)
    try:
        await session.say("Hello, how can I help?").wait_for_playout()
        heard = turns_of(speech)
        assert heard == [(0, "Hello, how can I help?", 6)]

        yielded = backend.yielded
        frame = await speech.synthesize("This one is never played.").collect()
        assert frame.samples_per_channel > 0 and backend.yielded > yielded  # it was spoken
        assert turns_of(speech) == heard  # but not recorded

        await session.say("Anything else?").wait_for_playout()
        assert turns_of(speech) == heard + [(0, "Anything else?", 6)]
    finally:
        await session.aclose()
        await speech.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["stream", "synthesize"])
async def test_a_fallback_probe_is_not_a_turn(hf_checkpoint, path):
    """test_tts_recover / test_tts_stream_fallback: this TTS fails, the FallbackAdapter's other
    TTS speaks, then it probes this one with the same text. The probe speaks (and succeeds), but
    its audio is thrown away, so the history stays as it was."""
    backend = CountingBackend(await shared_service(hf_checkpoint), fail_first=1)
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS, follow_session=False)
    fallback = tts.FallbackAdapter([speech, ToneTTS()], max_retry_per_tts=0)
    recovered = asyncio.Event()
    fallback.on("tts_availability_changed", lambda ev: ev.tts is speech and ev.available and recovered.set())
    try:
        text = "How are you doing today?"
        if path == "stream":
            async with fallback.stream() as stream:
                stream.push_text(text)
                stream.end_input()
                frames = [ev.frame async for ev in stream]
        else:
            frames = [(await fallback.synthesize(text).collect())]
        assert sum(f.samples_per_channel for f in frames) >= 24000 // 4  # the tone spoke
        await asyncio.wait_for(recovered.wait(), 60)
        assert backend.yielded > 0 and [t for t, _ in backend.spoken] == [text, text]  # failed, then probed
        assert speech.conversation.history == []

        # recovered, it serves again, and what it delivers (no session: nothing reports
        # playback) is a turn
        await fallback.synthesize("I am back.").collect()
        assert [s.text for s in speech.conversation.history] == ["I am back."]
    finally:
        await fallback.aclose()
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_probe_during_a_session_turn_is_not_matched_to_its_playback(hf_checkpoint):
    """Inside a session the probe runs in the speech's own context; it must not be taken for the
    speech's audio: the session's turn is the fallback TTS's, and the history gets no agent turn."""
    backend = CountingBackend(await shared_service(hf_checkpoint), fail_first=1)
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS)
    fallback = tts.FallbackAdapter([speech, ToneTTS()], max_retry_per_tts=0)
    recovered = asyncio.Event()
    fallback.on("tts_availability_changed", lambda ev: ev.tts is speech and ev.available and recovered.set())
    out = CaptureOutput()
    session = AgentSession(llm=ScriptedLLM(["Let me check that.", "Found it, here it is."]), tts=fallback, vad=None, turn_handling=NO_TURN_DETECTION)
    session.output.audio = out
    speech.attach(session)
    await session.start(agent=Agent(instructions="x"), record=False)
    try:
        await session.generate_reply(user_input="Is my order late?").wait_for_playout()
        await asyncio.wait_for(recovered.wait(), 60)
        assert len(out.reported) == 1 and backend.yielded > 0  # the tone played; the probe spoke
        await wait_until(lambda: speech.conversation is not None and not speech.conversation.speaking, "the probe to end")
        assert [(s.speaker, s.text) for s in speech.conversation.history] == [(1, "Is my order late?")]

        # recovered, it serves the next reply through the adapter, and that reply is a turn
        await session.generate_reply(user_input="Where is it?").wait_for_playout()
        assert turns_of(speech)[1:] == [(1, "Where is it?", 0), (0, "Found it,", 6), (0, "here it is.", 6)]
    finally:
        await session.aclose()
        await fallback.aclose()
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_speech_synthesized_ahead_waits_for_the_turn_playing(hf_checkpoint):
    """LiveKit's preemptive TTS (AgentSession(preemptive_generation=...)) can start a speech's
    synthesis while the previous speech still plays. Its pieces go after that turn's only once
    the turn's playback is settled (here trimmed by a barge-in), so the trim still finds the
    turn at the end of the history; a speech LiveKit then discards (its handle done, never
    played) leaves nothing behind."""
    from livekit.agents.voice.agent_activity import (
        _SpeechHandleContextVar,  # how LiveKit marks a speech's tasks
    )

    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS)
    out = CaptureOutput(played_fraction=0.5)
    out.hold = True
    session = await start_session(speech, Agent(instructions="x"), out)
    try:
        first = session.say("Your parcel left on Monday.")
        await wait_until(
            lambda: out.duration > 0 and speech.conversation is not None and len(speech.conversation.history) == 1
            and not speech.conversation.speaking,
            "the first speech to be playing",
        )
        ahead = SpeechHandle.create()

        async def synthesize_ahead():
            token = _SpeechHandleContextVar.set(ahead)  # as LiveKit runs that speech's TTS node
            try:
                stream = speech.stream()
            finally:
                _SpeechHandleContextVar.reset(token)
            stream.push_text("Here is what I found.")
            stream.end_input()
            return [ev async for ev in stream]

        task = asyncio.create_task(synthesize_ahead())
        await asyncio.sleep(0.5)
        assert not task.done() and [t for t, _ in backend.spoken] == ["Your parcel left on Monday."]  # waiting

        session.interrupt()
        await first.wait_for_playout()
        events = await asyncio.wait_for(task, 60)
        assert sum(ev.frame.samples_per_channel for ev in events) > 0  # spoke once the turn was settled
        kept = math.ceil(out.reported[-1].playback_position * 1000 / 80)
        trimmed = speech.conversation.history[0]
        assert frames_of(trimmed) == kept < 6 and "Your parcel left on Monday.".startswith(trimmed.text)
        assert turns_of(speech) == [(0, trimmed.text, kept), (0, "Here is what I found.", 6)]

        ahead._mark_done()  # LiveKit discards a speech it will not play: its handle is done
        await wait_until(lambda: turns_of(speech) == [(0, trimmed.text, kept)], "the unplayed speech to leave")
    finally:
        await session.aclose()
        await speech.aclose()


class _ToolLLM(ScriptedLLM):
    """Answers "<tool>" with a sentence and then a call of the agent's `look_up` tool."""

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **kw):
        if self.replies[0] != "<tool>":
            return super().chat(chat_ctx=chat_ctx, tools=tools, conn_options=conn_options, **kw)
        self.replies.pop(0)
        return _ToolCallStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ToolCallStream(llm.LLMStream):
    async def _run(self) -> None:
        for token in ("Let me", " look that up."):
            self._event_ch.send_nowait(llm.ChatChunk(id="t", delta=llm.ChoiceDelta(role="assistant", content=token)))
        call = llm.FunctionToolCall(name="look_up", arguments="{}", call_id="call-1")
        self._event_ch.send_nowait(llm.ChatChunk(id="t", delta=llm.ChoiceDelta(role="assistant", tool_calls=[call])))


@pytest.mark.asyncio
async def test_a_reply_around_a_tool_call_is_recorded_in_order(hf_checkpoint):
    """LiveKit's tool step: the reply before a tool call plays, the speech waits for the tool
    (not done, no longer playing), then the tool reply is spoken under the same SpeechHandle.
    Both parts are recorded as heard, in order, and nothing waits on the unfinished speech."""
    tool_done = asyncio.Event()

    class ToolAgent(Agent):
        @function_tool
        async def look_up(self) -> str:
            """Look up the order."""
            await asyncio.sleep(0.3)
            tool_done.set()
            return "shipped on Monday"

    speech = csm.TTS(backend=await shared_service(hf_checkpoint), seed=SEED, max_audio_ms=REPLY_MS)
    out = CaptureOutput()
    session = await start_session(speech, ToolAgent(instructions="x"), out, llm=_ToolLLM(["<tool>", "It shipped on Monday."]))
    try:
        handle = session.generate_reply(user_input="Where is my order?")
        await asyncio.wait_for(handle.wait_for_playout(), 60)
        await wait_until(lambda: len(out.reported) == 2, "the tool reply to play")
        assert tool_done.is_set()
        await wait_until(lambda: len(speech.conversation.history) == 3, "the tool reply to be recorded")
        assert turns_of(speech) == [(1, "Where is my order?", 0), (0, "Let me look that up.", 6), (0, "It shipped on Monday.", 6)]
    finally:
        await session.aclose()
        await speech.aclose()
