"""Pipecat's contract for TTS services, point by point (pipecat-ai 1.14).

Each test names the framework behaviour it mirrors: `TTSService.add_word_timestamps` (one
`TTSTextFrame` per word, in time order, within the audio), the official services' `run_tts`
(Piper, Kokoro, Cartesia: `@traced_tts`, every exception becomes an `ErrorFrame`, TTFB metrics
stopped in `finally`), the pipeline's `EndFrame` / `stop()` life cycle (`pipecat.tests.utils.run_test`
ends every run with an EndFrame), and the user aggregator's `LLMContextUserTurnFrame` (one per user
turn, stamped with the turn's start). Offline, on the small random checkpoint.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    LLMAssistantPushAggregationFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import run_test  # noqa: E402

from csm_plugin.backend import shared_service  # noqa: E402
from pipecat_csm import CSMTTSService  # noqa: E402


def make_tts(checkpoint, **settings) -> CSMTTSService:
    settings.setdefault("max_audio_ms", 480)
    return CSMTTSService(settings=CSMTTSService.Settings(model=str(checkpoint), **settings))


def voice(seconds: float, rate: int = 16_000, pitch: float = 220.0) -> list[InputAudioRawFrame]:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * pitch * t) * 32767).astype(np.int16).tobytes()
    return [InputAudioRawFrame(pcm[i : i + 640], rate, 1) for i in range(0, len(pcm), 640)]


@pytest.mark.asyncio
async def test_a_capped_reply_times_every_word_inside_its_audio(hf_checkpoint):
    """TTSService.add_word_timestamps: one TTSTextFrame per word, increasing times, and (ours)
    within the audio actually produced, even when the reply is cut short by max_audio_ms."""
    text = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    tts = make_tts(hf_checkpoint, seed=3, max_audio_ms=320)  # 4 frames: far shorter than the text
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text)])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    audio_s = sum(len(f.audio) // 2 / f.sample_rate for f in down if isinstance(f, TTSAudioRawFrame))
    assert audio_s == pytest.approx(0.32)
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [w.text for w in words] == text.split()  # every word its own frame
    pts = [w.pts for w in words]
    assert all(b > a for a, b in zip(pts, pts[1:]))  # strictly increasing
    assert (pts[-1] - pts[0]) / 1e9 < audio_s  # inside the audio produced


class _SlowLoad:
    """The shared service behind a load that takes a while (the pipeline may end meanwhile)."""

    def __init__(self, service, seconds: float):
        self.service, self.seconds = service, seconds

    async def start(self):
        await asyncio.sleep(self.seconds)
        return self.service

    def conversation(self, conversation_id, *, voices=None):
        return self.service.conversation(conversation_id, voices=voices)

    async def close(self):
        pass


class _RunTtsOutcomes(CSMTTSService):
    """Notes how each run_tts call ended. A CancelledError that escapes run_tts while its task is
    not being cancelled kills Pipecat's frame-processing task and hangs the pipeline; here it is
    noted instead, so that the test can fail on it rather than hang."""

    outcomes: list[tuple[str, bool]]

    async def run_tts(self, text, context_id):
        self.__dict__.setdefault("outcomes", [])
        try:
            async for frame in super().run_tts(text, context_id):
                yield frame
            self.outcomes.append(("returned", self._closed))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # a real cancellation (an interruption): not ours to note
            self.outcomes.append(("raised CancelledError", self._closed))


@pytest.mark.asyncio
async def test_end_frame_while_the_model_loads_ends_the_pipeline(hf_checkpoint):
    """The LLM's text is still in the aggregator when the EndFrame comes, while the model loads:
    stop() cancels the load, then Pipecat flushes that text into run_tts. run_tts must return
    (it used to raise the cancelled load's CancelledError, which hung the pipeline), wait_ready()
    must say "no conversation" (None) rather than raise, and no conversation is left behind."""
    service = await shared_service(hf_checkpoint)
    tts = _RunTtsOutcomes(backend=_SlowLoad(service, 60.0), settings=CSMTTSService.Settings(max_audio_ms=160))
    # No response end, and no clause boundary yet (nothing follows the "."): the text waits in
    # the aggregator until the EndFrame flushes it.
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there.")]
    await asyncio.wait_for(run_test(tts, frames_to_send=frames), 30)  # ends long before the load would
    assert tts.outcomes == [("returned", True)]  # run_tts ran after stop(), and returned
    assert await tts.wait_ready() is None
    await asyncio.sleep(0.2)
    assert tts._conversation_id not in service._conversations


@pytest.mark.slow  # waits out the pipeline's stop
@pytest.mark.asyncio
async def test_text_after_stop_neither_speaks_nor_reopens_the_conversation(hf_checkpoint):
    """After stop() (EndFrame) nothing more is spoken: the closed conversation is not reopened
    and no cache slot is left behind."""
    service = await shared_service(hf_checkpoint)
    tts = CSMTTSService(backend=service, settings=CSMTTSService.Settings(max_audio_ms=160))
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there, this is the end.")]  # no end: flushed at EndFrame
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), 60)
    await asyncio.sleep(0.2)  # any background close has run
    conv_id = tts._conversation_id
    assert conv_id not in service._conversations
    assert not any(s.owner == conv_id for s in service.engine.slots)
    again = [f async for f in tts.run_tts("Anyone?", "ctx-after-stop")]
    assert again == [] and conv_id not in service._conversations


class _FailingConversation:
    def __init__(self, conv):
        self._conv = conv
        self.id = conv.id

    def __getattr__(self, name):
        return getattr(self._conv, name)

    def speak(self, text, options=None, **changes):
        if text.startswith("Break"):
            raise RuntimeError("boom")  # not a CSMError: any bug in the backend
        return self._conv.speak(text, options, **changes)


class _FailingBackend:
    def __init__(self, service):
        self.service = service

    async def start(self):
        return self

    def conversation(self, conversation_id, *, voices=None):
        return _FailingConversation(self.service.conversation(conversation_id, voices=voices))

    async def close(self):
        pass


@pytest.mark.asyncio
async def test_any_exception_in_run_tts_is_an_error_frame_and_the_pipeline_goes_on(hf_checkpoint):
    """The official services catch every exception in run_tts as an ErrorFrame (not only the
    plugin's own errors) and stop their TTFB metrics; Pipecat's bookkeeping around run_tts then
    goes on as after any piece. Had the exception escaped run_tts, Pipecat would have skipped the
    rest of that frame's handling: the rest of the LLM text in it, and the end of the speak
    frame's turn (the next TTSSpeakFrame's words would never be committed to the context)."""
    tts = CSMTTSService(backend=_FailingBackend(await shared_service(hf_checkpoint)),
                        settings=CSMTTSService.Settings(max_audio_ms=160, seed=1), stop_frame_timeout_s=60)
    frames = [
        TTSSpeakFrame("Break this."),
        TTSSpeakFrame("Then speak."),
        # one LLM frame that completes two pieces (the space shows "on." ends a sentence)
        LLMFullResponseStartFrame(), LLMTextFrame("Break here, then go on. "), LLMFullResponseEndFrame(),
    ]
    # A turn whose last piece produced no audio is closed at once, not after stop_frame_timeout_s.
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), 40)
    # The piece after the failed one in the same LLM frame is spoken.
    assert [s.text for s in tts.conversation.history] == ["Then speak.", "then go on."]
    assert sum(isinstance(f, TTSAudioRawFrame) for f in down) == 4
    # The speak frame after the failed one is a turn of its own: its words are committed to the
    # assistant context once spoken (Pipecat's LLMAssistantPushAggregationFrame after its words).
    spoken_at = max(i for i, f in enumerate(down) if isinstance(f, TTSTextFrame) and f.text == "speak.")
    assert any(isinstance(f, LLMAssistantPushAggregationFrame) for f in down[spoken_at:])
    # Each failure reported once, by this service (Pipecat adds "completed with no audio").
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert [e for e in errors if "boom" in e] == ["CSM TTS error: boom"] * 2, errors


@pytest.mark.asyncio
async def test_a_failed_load_does_not_hold_each_turn(tmp_path):
    """After a failed load the service reports it once and every later turn passes at once,
    instead of waiting stop_frame_timeout_s (10 s) per turn for audio that never comes."""
    tts = CSMTTSService(settings=CSMTTSService.Settings(model=str(tmp_path / "missing")))
    frames = [TTSSpeakFrame("Hello."), TTSSpeakFrame("Anyone there?"), TTSSpeakFrame("Hello?")]
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), 20)  # 3 turns x 10 s before
    assert [f for f in up if isinstance(f, ErrorFrame)]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.asyncio
async def test_user_audio_goes_to_the_turn_it_was_captured_for(hf_checkpoint):
    """LLMContextUserTurnFrame arrives once the transcript is final, possibly after the next
    turn's audio: each turn gets the audio of its own UserStarted/StoppedSpeaking span."""
    tts = make_tts(hf_checkpoint)
    frames = [
        UserStartedSpeakingFrame(), *voice(1.0), UserStoppedSpeakingFrame(),
        UserStartedSpeakingFrame(), *voice(0.5, pitch=330.0), UserStoppedSpeakingFrame(),
        LLMContextUserTurnFrame(text="First turn.", timestamp="t0"),
        LLMContextUserTurnFrame(text="Second turn.", timestamp="t1"),
        TTSSpeakFrame("Okay."),  # a reply waits for the user turns to be recorded
    ]
    await run_test(tts, frames_to_send=frames)
    history = tts.conversation.history
    assert [s.text for s in history[:2]] == ["First turn.", "Second turn."]
    assert history[0].codes is not None and history[1].codes is not None
    assert history[0].codes.shape[0] == 13 and history[1].codes.shape[0] == 7  # 1.0 s and 0.5 s at 12.5 Hz
