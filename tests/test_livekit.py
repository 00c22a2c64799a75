"""The LiveKit Agents plugin (livekit.plugins.csm), offline: no LiveKit server, no room, no keys.

A small random checkpoint speaks; replies are capped at a few frames so the file stays fast.
What each test mirrors in LiveKit Agents 1.8: `tts.ChunkedStream` / `tts.SynthesizeStream` and
their `AudioEmitter` (frames pushed as they exist, one final event, one TTSMetrics per request or
segment, `_mark_started` for TTFB), upstream tests/test_tts.py `test_tts_stream` (`_do_stream`: text
pushed token by token as an LLM sends it, audio read while it is pushed), `tts.FallbackAdapter`, `TTS.prewarm`,
`livekit.agents.testing.fake_job_context`, and an `AgentSession` with a capturing
`io.AudioOutput` (the pattern of upstream tests/fake_io.py)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents import (  # noqa: E402
    Agent,
    AgentSession,
    APIConnectOptions,
    APIError,
    tts,
)
from livekit.agents.voice import io  # noqa: E402
from livekit.plugins import csm  # noqa: E402
from test_livekit_support import (  # noqa: E402
    FRAME,
    REPLY_MS,
    SEED,
    SR,
    CaptureOutput,
    CountingBackend,
    ScriptedLLM,
    ToneTTS,
    frames_of,
    wait_until,
)

from csm_plugin.backend import shared_service  # noqa: E402
from csm_plugin.conversation.clauses import split_text  # noqa: E402
from csm_plugin.conversation.options import SpeakOptions  # noqa: E402
from csm_plugin.engine import Engine, Sampling  # noqa: E402

# --- import ---------------------------------------------------------------------------------------


def test_import_loads_no_weights_and_starts_no_threads():
    code = textwrap.dedent(
        """
        import os, sys, threading
        import livekit.agents  # the framework's own native threads are the baseline
        before = sorted(os.listdir("/proc/self/task"))
        from livekit.plugins import csm
        t = csm.TTS(model="sesame/csm-1b", device="cpu")  # constructing loads nothing either
        assert sorted(os.listdir("/proc/self/task")) == before, "native threads were started"
        assert threading.active_count() == 1, threading.enumerate()
        # and csm_plugin.conversation: the torch-free core; voices (VoicePrompt) and audio: numpy, soxr
        light = {"csm_plugin", "csm_plugin.errors", "csm_plugin.voices", "csm_plugin.audio"}
        heavy = [m for m in sys.modules if m == "torch" or (
            m.startswith("csm_plugin") and m not in light and not m.startswith("csm_plugin.conversation"))]
        assert not heavy, heavy
        from livekit.agents import Plugin
        assert any(p.package == "livekit.plugins.csm" for p in Plugin.registered_plugins)
        assert t.sample_rate == 24000 and t.capabilities.streaming
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# --- unit level -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_synthesize_streams_frames_before_generation_ends(hf_checkpoint):
    """tts.ChunkedStream: frames of 24 kHz mono int16 pushed as they are generated, one final
    event, one TTSMetrics (not streamed). The text is cut into clauses as stream() cuts it."""
    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=960)
    metrics = []
    speech.on("metrics_collected", metrics.append)
    events, yielded_at_first = [], None
    async with speech.synthesize("Hello there, how are you today?") as stream:
        async for ev in stream:
            if yielded_at_first is None:
                yielded_at_first = backend.yielded
            events.append(ev)
    await asyncio.sleep(0)

    history = speech.conversation.history
    assert [(s.speaker, s.text) for s in history] == [(0, "Hello there,"), (0, "how are you today?")]
    n = sum(frames_of(s) for s in history)
    assert frames_of(history[0]) >= 2 and backend.yielded == n
    assert yielded_at_first < frames_of(history[0])  # the first frame went out while the model was still generating
    assert {ev.frame.sample_rate for ev in events} == {speech.sample_rate} == {SR}
    assert {ev.frame.num_channels for ev in events} == {1}
    assert sum(ev.frame.samples_per_channel for ev in events) == n * FRAME  # every frame, once
    assert len(events) >= n  # pushed frame by frame, not as one block
    assert events[-1].is_final and not any(ev.is_final for ev in events[:-1])
    assert len(metrics) == 1 and metrics[0].ttfb > 0 and not metrics[0].streamed
    assert metrics[0].audio_duration == pytest.approx(n * 0.08)
    await speech.aclose()


@pytest.mark.asyncio
async def test_sentence_mode_speaks_each_sentence_as_soon_as_it_is_complete(hf_checkpoint):
    """split="sentence": the sentence tokenizer path (blingfire, as LiveKit's own StreamAdapter):
    a sentence is spoken once complete, commas do not cut it."""
    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS, split="sentence")
    metrics = []
    speech.on("metrics_collected", metrics.append)
    events = []
    async with speech.stream() as stream:
        stream.push_text("Hello there, my good friend.")
        stream.push_text(" How are you")  # the second sentence is still incomplete
        first = await asyncio.wait_for(stream.__anext__(), 60)
        events.append(first)
        yielded_at_first = backend.yielded
        assert [s.text for s in speech.conversation.history] == []  # still speaking sentence 1
        stream.push_text(" doing on this fine day?")
        stream.end_input()
        async for ev in stream:
            events.append(ev)
    await asyncio.sleep(0)

    history = speech.conversation.history
    assert [(s.speaker, s.text) for s in history] == [
        (0, "Hello there, my good friend."),
        (0, "How are you doing on this fine day?"),
    ]
    total = sum(frames_of(s) for s in history)
    assert yielded_at_first < frames_of(history[0])
    assert backend.yielded == total
    assert sum(ev.frame.samples_per_channel for ev in events) == total * FRAME
    assert {ev.frame.sample_rate for ev in events} == {SR} and len(events) >= total
    assert len({ev.segment_id for ev in events}) == 1 and events[-1].is_final
    assert len(metrics) == 1 and metrics[0].streamed and metrics[0].ttfb > 0  # _mark_started ran
    assert metrics[0].audio_duration == pytest.approx(total * 0.08)
    # synthesize() cuts the same way
    frame = await speech.synthesize("Fine, thank you very much. And how are you doing?").collect()
    assert [s.text for s in speech.conversation.history[2:]] == ["Fine, thank you very much.", "And how are you doing?"]
    assert frame.samples_per_channel == sum(frames_of(s) for s in speech.conversation.history[2:]) * FRAME
    await speech.aclose()


@pytest.mark.asyncio
async def test_stream_starts_speaking_at_the_first_clause(hf_checkpoint):
    """Upstream tests/test_tts.py `test_tts_stream` (tokens pushed as an LLM sends them, audio
    read meanwhile): in clause mode the first piece is spoken as soon as its clause is complete, while
    the rest of the sentence has not arrived."""
    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS, follow_session=False)
    async with speech.stream() as stream:
        stream.push_text("Of course, let me")
        first = await asyncio.wait_for(stream.__anext__(), 30)  # no end of sentence yet
        assert [text for text, _ in backend.spoken] == ["Of course,"]
        assert first.frame.samples_per_channel > 0
        stream.push_text(" check that for you.")
        stream.end_input()
        events = [first] + [ev async for ev in stream]
    history = speech.conversation.history
    assert [(s.speaker, s.text) for s in history] == [(0, "Of course,"), (0, "let me check that for you.")]
    assert sum(ev.frame.samples_per_channel for ev in events) == sum(frames_of(s) for s in history) * FRAME
    await speech.aclose()


@pytest.mark.asyncio
async def test_clauses_are_spoken_as_consecutive_turns(hf_checkpoint):
    """Each clause is the next turn of the conversation, conditioned on the ones before: the
    stream's history equals speaking the clauses one after another on a fresh conversation (same
    seed), and all of the audio goes, back to back, into one output segment."""
    service = await shared_service(hf_checkpoint)
    speech = csm.TTS(backend=service, seed=SEED, max_audio_ms=REPLY_MS, follow_session=False)
    text = "Of course, let me check that for you. Your order shipped on Monday, and it should arrive soon."
    async with speech.stream() as stream:
        for i, word in enumerate(text.split(" ")):  # tokens as an LLM sends them
            stream.push_text(word if i == 0 else " " + word)
        stream.end_input()
        events = [ev async for ev in stream]
    clauses = split_text(text, "clause")
    assert len(clauses) == 4
    history = speech.conversation.history
    assert [(s.speaker, s.text) for s in history] == [(0, clause) for clause in clauses]

    reference = service.conversation(f"{speech.conversation_id}-reference")
    options = SpeakOptions(speaker=0, seed=SEED, max_audio_ms=REPLY_MS, chunk_frames=1)
    for clause in clauses:
        async for _ in reference.speak(clause, options):
            pass
    assert reference.history == history  # the same turns, the same codes
    assert sum(ev.frame.samples_per_channel for ev in events) == sum(frames_of(s) for s in history) * FRAME
    assert len({ev.segment_id for ev in events}) == 1 and events[-1].is_final
    assert not any(ev.is_final for ev in events[:-1])  # no gap: no segment ends between pieces
    await reference.close()
    await speech.aclose()


@pytest.mark.asyncio
async def test_bad_input_is_a_non_retryable_api_error(hf_checkpoint):
    speech = csm.TTS(model=hf_checkpoint, max_audio_ms=REPLY_MS)
    errors = []
    speech.on("error", errors.append)
    with pytest.raises(APIError) as info:
        # a lone surrogate: no tokenizer can take it (a text too long no longer is bad input:
        # clause mode cuts it into pieces)
        await speech.synthesize("Hello \ud800 there.", conn_options=APIConnectOptions(max_retry=2, retry_interval=0)).collect()
    assert not info.value.retryable and "InputError" in str(info.value)
    assert len(errors) == 1 and not errors[0].recoverable  # no retry was attempted
    # the conversation is still usable
    frame = await speech.synthesize("Fine.").collect()
    assert frame.samples_per_channel > 0 and frame.sample_rate == SR
    await speech.aclose()


@pytest.mark.asyncio
async def test_a_failing_model_falls_back_to_another_tts(tmp_path):
    broken = csm.TTS(model=str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(APIError) as info:
        await broken.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0)).collect()
    assert not info.value.retryable and "CheckpointError" in str(info.value)

    fallback = tts.FallbackAdapter([broken, ToneTTS()])
    frame = await fallback.synthesize("Hello there.").collect()
    assert frame.samples_per_channel >= SR // 4  # the tone TTS spoke instead
    await fallback.aclose()
    await broken.aclose()


def test_prewarm_outside_an_event_loop_loads_the_shared_model(hf_checkpoint):
    speech = csm.TTS(model=hf_checkpoint, seed=SEED, max_audio_ms=REPLY_MS)
    speech.prewarm()  # an AgentServer setup_fnc: blocks until loaded

    async def main():
        assert speech._backend is await shared_service(hf_checkpoint)  # the process-wide one
        frame = await speech.synthesize("Ready.").collect()
        await speech.aclose()
        return frame

    frame = asyncio.run(main())
    assert frame.sample_rate == SR and frame.samples_per_channel > 0


@pytest.mark.asyncio
async def test_follows_the_jobs_session_without_wiring(hf_checkpoint):
    from livekit.agents.testing import fake_job_context

    speech = csm.TTS(model=hf_checkpoint, seed=SEED, max_audio_ms=REPLY_MS)
    with fake_job_context():
        session = AgentSession(llm=ScriptedLLM(["Sure thing."]), tts=speech, vad=None, turn_handling={"turn_detection": None})
        session.output.audio = CaptureOutput()
        await session.start(agent=Agent(instructions="x"), record=False)
        try:
            await session.say("Hello, how can I help?").wait_for_playout()
            await session.generate_reply(user_input="Read me the news.").wait_for_playout()
            assert [(s.speaker, s.text) for s in speech.conversation.history] == [
                (0, "Hello, how can I help?"),
                (1, "Read me the news."),
                (0, "Sure thing."),
            ]
        finally:
            await session.aclose()
            await speech.aclose()


@pytest.mark.asyncio
async def test_remote_mode_through_a_server(hf_checkpoint):
    pytest.importorskip("csm_plugin.client")
    from aiohttp import web

    from csm_plugin.server.app import create_app
    from csm_plugin.server.config import ServerConfig

    service = await shared_service(hf_checkpoint)
    config = ServerConfig(model=str(hf_checkpoint), port=0, allow_no_auth=True, warmup=False)
    runner = web.AppRunner(create_app(config, service=service))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    speech = csm.TTS(url=f"ws://127.0.0.1:{port}", seed=SEED, max_audio_ms=REPLY_MS)
    try:
        events = []
        async with speech.stream() as stream:
            stream.push_text("Hello from the server. It speaks")
            stream.push_text(" in two sentences.")
            stream.end_input()
            events = [ev async for ev in stream]
        history = speech.conversation.history
        assert [(s.speaker, s.text) for s in history] == [(0, "Hello from the server."), (0, "It speaks in two sentences.")]
        assert sum(ev.frame.samples_per_channel for ev in events) == sum(frames_of(s) for s in history) * FRAME
        assert {ev.frame.sample_rate for ev in events} == {SR}
    finally:
        await speech.aclose()
        await runner.cleanup()


# --- AgentSession -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.asyncio
async def test_agent_session_two_turns_in_context_then_barge_in(hf_checkpoint):
    backend = CountingBackend(await shared_service(hf_checkpoint))
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS)
    scripted = ScriptedLLM(
        [
            "I am sorry to hear that. Let me check.",
            "Thanks, I found your order.",
            "Your parcel left our warehouse on Monday and should reach you within two or three days",
            "Glad to help.",
        ]
    )
    session = AgentSession(llm=scripted, tts=speech, vad=None, turn_handling={"turn_detection": None})
    out = CaptureOutput(played_fraction=0.5)
    session.output.audio = out
    speech.attach(session)  # outside a job; inside one the TTS finds the job's session itself
    await session.start(agent=Agent(instructions="You are a test agent."))
    try:
        # turn 1 and turn 2
        await session.generate_reply(user_input="Hi, my parcel never arrived.").wait_for_playout()
        await session.generate_reply(user_input="It is order four two.").wait_for_playout()
        history = speech.conversation.history
        assert [(s.speaker, s.text) for s in history] == [
            (1, "Hi, my parcel never arrived."),
            (0, "I am sorry to hear that."),
            (0, "Let me check."),
            (1, "It is order four two."),
            (0, "Thanks, I found your order."),
        ]
        assert all(frames_of(s) > 0 for s in history if s.speaker == 0)
        assert sum(f.samples_per_channel for f in out.frames) == sum(frames_of(s) for s in history) * FRAME
        # the second reply was conditioned on the first turn: it is exactly what the model says
        # after that history (same seed), and not what it says without it
        reference = Engine.load(hf_checkpoint)

        def fresh(context):
            sampling = Sampling(seed=SEED, max_audio_ms=REPLY_MS)
            return torch.stack([f.codes for f in reference.synthesize(context, 0, history[-1].text, sampling)])

        assert np.array_equal(history[-1].codes, fresh(history[:-1]))
        assert not np.array_equal(history[-1].codes[:4], fresh(history[3:4])[:4])

        # turn 3: the user barges in while the long reply is being spoken
        speech.update_options(max_audio_ms=4000)
        out.hold = True  # still playing when the user talks over it
        before = out.duration
        handle = session.generate_reply(user_input="When will it come?")
        await wait_until(lambda: out.duration >= before + 0.4, "the reply to start playing")
        session.interrupt()
        yielded_at_interrupt = backend.yielded
        await handle.wait_for_playout()
        assert handle.interrupted
        report = out.reported[-1]
        assert report.interrupted
        kept = math.ceil(report.playback_position * 1000 / 80)  # frames that started playing
        await wait_until(
            lambda: len(speech.conversation.history) == 7 and frames_of(speech.conversation.history[-1]) == kept,
            "the reply to be trimmed to what was played",
        )
        assert not speech.conversation.speaking
        assert backend.yielded - yielded_at_interrupt <= 2  # generation stopped right away
        heard = speech.conversation.history[-1]
        delivered_s = sum(f.duration for f in out.frames) - sum(frames_of(s) for s in history) * 0.08
        assert heard.speaker == 0 and frames_of(heard) * 0.08 < delivered_s  # trimmed below what was sent
        long_reply = "Your parcel left our warehouse on Monday and should reach you within two or three days"
        assert long_reply.startswith(heard.text) and len(heard.text) < len(long_reply)

        # turn 4 follows the trimmed history
        speech.update_options(max_audio_ms=REPLY_MS)
        out.hold = False
        await session.generate_reply(user_input="Okay, thanks.").wait_for_playout()
        tail = [(s.speaker, s.text) for s in speech.conversation.history[-3:]]
        assert tail == [(0, heard.text), (1, "Okay, thanks."), (0, "Glad to help.")]
    finally:
        await session.aclose()
        await speech.aclose()


class ToneInput(io.AudioInput):
    """User audio: `seconds` of a tone in 50 ms frames, then silence forever."""

    def __init__(self, seconds: float):
        super().__init__(label="tone-in")
        t = np.arange(int(SR * seconds)) / SR
        pcm = (6000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
        step = SR // 20
        self._frames = [rtc.AudioFrame(pcm[i : i + step].tobytes(), SR, 1, step) for i in range(0, len(pcm), step)]
        self.done = asyncio.Event()

    async def __anext__(self) -> rtc.AudioFrame:
        if not self._frames:
            self.done.set()
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        return self._frames.pop(0)


@pytest.mark.asyncio
async def test_user_turns_are_recorded_with_the_users_voice(hf_checkpoint):
    speech = csm.TTS(model=hf_checkpoint, seed=SEED, max_audio_ms=REPLY_MS)
    session = AgentSession(tts=speech, vad=None, turn_handling={"turn_detection": None})
    tone = ToneInput(seconds=1.0)
    session.input.audio = tone
    session.output.audio = CaptureOutput()
    speech.attach(session)
    started = time.time()
    await session.start(agent=Agent(instructions="x"))
    try:
        assert session.input.audio.source is tone  # tapped, not replaced
        await asyncio.wait_for(tone.done.wait(), 60)  # the session has read it all
        stopped = time.time()
        # a committed user turn carries when the user spoke (the session's own metrics)
        session.history.add_message(
            role="user", content="Where is my parcel?", metrics={"started_speaking_at": started, "stopped_speaking_at": stopped}
        )
        session.history.add_message(role="user", content="Hello?")  # no timing: transcript only
        await session.say("Let me look into it.").wait_for_playout()
        history = speech.conversation.history
        assert [(s.speaker, s.text) for s in history] == [
            (1, "Where is my parcel?"),
            (1, "Hello?"),
            (0, "Let me look into it."),
        ]
        assert frames_of(history[0]) == 13  # the user's 1 s of audio, Mimi-encoded (12.5 frames/s)
        assert history[1].codes is None
    finally:
        await session.aclose()
        await speech.aclose()
