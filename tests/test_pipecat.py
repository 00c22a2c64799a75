"""Pipecat adapter: CSMTTSService in real Pipecat pipelines (pipecat.tests.utils.run_test and a
hand-driven PipelineWorker), on the small random checkpoint. No network, no GPU."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import run_test  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

import pipecat_csm.tts as csm_tts  # noqa: E402
from csm_plugin.engine import Engine, Sampling  # noqa: E402
from csm_plugin.service import spoken_text  # noqa: E402
from pipecat_csm import CSMTTSService  # noqa: E402

REPLY_MS = 640  # 8 frames of 80 ms: short replies keep the tests fast
FRAME_SAMPLES_24K = 1920


@pytest.fixture(scope="module")
def reference_engine(hf_checkpoint):
    """An independent engine: a reply must equal a fresh prefill of the history it followed."""
    return Engine.load(hf_checkpoint)


def make_tts(checkpoint, **settings) -> CSMTTSService:
    settings.setdefault("max_audio_ms", REPLY_MS)
    return CSMTTSService(settings=CSMTTSService.Settings(model=str(checkpoint), **settings))


def fresh_codes(engine, history, text, seed, max_audio_ms=REPLY_MS, speaker=0) -> torch.Tensor:
    frames = engine.synthesize(list(history), speaker, text, Sampling(seed=seed, max_audio_ms=max_audio_ms))
    return torch.stack([f.codes for f in frames])


def user_voice(seconds=1.0, rate=16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(t.shape)
    return ((0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise) * 32767).astype(np.int16).tobytes()


def audio_of(frames):
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


class Probe(FrameProcessor):
    """Passes frames on; notes, for each audio frame, whether the reply was still being generated."""

    def __init__(self, tts: CSMTTSService):
        super().__init__()
        self.tts = tts
        self.speaking_at_audio: list[bool] = []
        self.cache_rows: list[tuple[str, list[int] | None]] = []  # (context id, cached rows)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            conv = self.tts.conversation
            self.speaking_at_audio.append(conv.speaking)
            slots = [s for s in self.tts._backend.engine.slots if s.owner == conv.id]
            self.cache_rows.append((frame.context_id, [c.rows for c in slots[0].segments] if slots else None))
        await self.push_frame(frame, direction)


@pytest.mark.asyncio
async def test_frames_in_order_stream_before_the_reply_ends(hf_checkpoint):
    tts = make_tts(hf_checkpoint, seed=1)
    probe = Probe(tts)
    text = "Hello there, how are you today?"
    down, up = await run_test(
        Pipeline([tts, probe]),
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    names = [type(f).__name__ for f in down]
    started, stopped = names.index("TTSStartedFrame"), names.index("TTSStoppedFrame")
    audio_at = [i for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame)]
    assert started < audio_at[0] and audio_at[-1] < stopped
    assert names.count("TTSStartedFrame") == names.count("TTSStoppedFrame") == 1

    reply = tts.conversation.history[-1]
    frames = reply.codes.shape[0]
    assert (reply.speaker, reply.text) == (0, text) and frames == REPLY_MS // 80
    audio = audio_of(down)
    # One Pipecat frame per CSM frame, at the pipeline's rate (24 kHz by default).
    assert len(audio) == frames and all(len(f.audio) == 2 * FRAME_SAMPLES_24K for f in audio)
    assert {(f.sample_rate, f.num_channels) for f in audio} == {(24_000, 1)}
    assert {f.context_id for f in audio} == {down[started].context_id}
    # The first audio frame went downstream while the reply was still being generated.
    assert probe.speaking_at_audio[0] is True

    # Word timestamps: one TTSTextFrame per word, timed, the whole text in order.
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert " ".join(w.text for w in words) == text
    assert all(w.pts is not None for w in words) and [w.pts for w in words] == sorted(w.pts for w in words)

    metrics = {type(d).__name__ for f in down if type(f).__name__ == "MetricsFrame" for d in f.data}
    assert {"TTFBMetricsData", "TTSUsageMetricsData"} <= metrics


@pytest.mark.asyncio
async def test_phone_rate_output_length(hf_checkpoint):
    tts = make_tts(hf_checkpoint, seed=2)
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame("Thanks for calling, how can I help?")],
        pipeline_params=PipelineParams(audio_out_sample_rate=8000),
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    audio = audio_of(down)
    assert tts.sample_rate == 8000 and {f.sample_rate for f in audio} == {8000}
    frames = tts.conversation.history[-1].codes.shape[0]
    # The streaming resampler is flushed at the end: exactly 640 samples per 80 ms frame.
    assert sum(len(f.audio) for f in audio) == 2 * 640 * frames
    assert len(audio) >= frames - 1  # still streamed frame by frame, not in one block


@pytest.mark.asyncio
async def test_two_turns_condition_on_the_user_and_the_first_reply(hf_checkpoint, reference_engine):
    tts = make_tts(hf_checkpoint, seed=10)
    probe = Probe(tts)
    voice = user_voice()
    user_audio = [InputAudioRawFrame(voice[i : i + 640], 16_000, 1) for i in range(0, len(voice), 640)]  # 20 ms
    first, second = "I am sorry to hear that.", "Let me check the order for you."
    frames = [
        UserStartedSpeakingFrame(),
        *user_audio,
        UserStoppedSpeakingFrame(),
        LLMContextUserTurnFrame(text="Hi, my parcel never arrived.", timestamp="t0"),
        LLMFullResponseStartFrame(),
        LLMTextFrame(first),
        LLMFullResponseEndFrame(),
        TTSUpdateSettingsFrame(delta=CSMTTSService.Settings(temperature=0.7, top_k=20)),
        LLMContextUserTurnFrame(text="It was a blue jacket.", timestamp="t1"),  # typed: no audio
        LLMFullResponseStartFrame(),
        LLMTextFrame(second),
        LLMFullResponseEndFrame(),
    ]
    down, up = await run_test(Pipeline([tts, probe]), frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    history = tts.conversation.history
    assert [(s.speaker, s.text) for s in history] == [
        (1, "Hi, my parcel never arrived."),
        (0, first),
        (1, "It was a blue jacket."),
        (0, second),
    ]
    assert history[0].codes.shape == (13, 32)  # the user's 1 s of voice, Mimi-encoded
    assert history[2].codes is None
    # Each reply is exactly what a fresh prefill of the history before it produces: the second
    # reply's prompt held the user's voiced turn, the first reply as recorded, and the typed turn.
    assert np.array_equal(history[1].codes, fresh_codes(reference_engine, history[:1], first, seed=10))
    frames2 = reference_engine.synthesize(list(history[:3]), 0, second, Sampling(0.7, 20, 11, REPLY_MS))
    assert np.array_equal(history[3].codes, torch.stack([f.codes for f in frames2]))
    # Token counts: while the second reply streamed, the conversation's cache slot held exactly the
    # rows of the three earlier segments (text tokens, plus audio frames and an end row if voiced).
    tokenizer = tts._backend.engine.tokenizer
    expected = [
        len(tokenizer.encode_segment_text(s.speaker, s.text)) + (0 if s.codes is None else s.codes.shape[0] + 1)
        for s in history[:3]
    ]
    second_context = [f for f in down if isinstance(f, TTSStartedFrame)][1].context_id
    during_second = [rows for cid, rows in probe.cache_rows if cid == second_context]
    # (the first sample: by the last audio frame downstream, the finished reply may be cached too)
    assert during_second and during_second[0] == expected
    assert expected[0] > 14  # the user's 13 audio frames are in the prompt, not just the text


class Collector(FrameProcessor):
    """Stands in for an output transport: collects frames, and says upstream when the bot starts
    speaking, as a transport does (so the TTS knows its audio is played in real time)."""

    def __init__(self):
        super().__init__()
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and not audio_of(self.frames):
            await self.push_frame(BotStartedSpeakingFrame(), FrameDirection.UPSTREAM)
        self.frames.append(frame)
        self.changed.set()
        await self.push_frame(frame, direction)

    async def wait_for(self, predicate, timeout=60.0):
        async def loop():
            while not predicate(self.frames):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


@pytest.mark.asyncio
@pytest.mark.slow
async def test_barge_in_stops_within_a_frame_and_keeps_what_was_played(hf_checkpoint, reference_engine, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(csm_tts, "_clock", lambda: now[0])  # playback time, driven by the test
    tts = make_tts(hf_checkpoint, seed=5, max_audio_ms=4000)
    sink = Collector()
    worker = PipelineWorker(Pipeline([tts, sink]), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        text = "One two three four five six seven eight nine ten eleven."  # one piece: under clause_max_words
        await worker.queue_frames([LLMFullResponseStartFrame(), LLMTextFrame(text), LLMFullResponseEndFrame()])
        await sink.wait_for(lambda fs: len(audio_of(fs)) >= 6)
        now[0] += 0.2  # the listener has heard 200 ms, i.e. 3 frames have started playing
        await worker.queue_frame(InterruptionFrame())
        await sink.wait_for(lambda fs: any(isinstance(f, InterruptionFrame) for f in fs))
        interrupted_at = next(i for i, f in enumerate(sink.frames) if isinstance(f, InterruptionFrame))
        await asyncio.sleep(0.5)  # many frame times: nothing more may come out
        conv = tts.conversation
        assert not conv.speaking
        assert not audio_of(sink.frames[interrupted_at:])
        reply = conv.history[-1]
        assert reply.codes.shape[0] == 3 and reply.text == spoken_text(text, 3 * 80)
        assert len(audio_of(sink.frames)) > 3  # more had been generated than was kept
        assert np.array_equal(reply.codes, fresh_codes(reference_engine, [], text, seed=5, max_audio_ms=3 * 80))

        # The conversation goes on from the trimmed history.
        await worker.queue_frames([TTSSpeakFrame("Sorry, go ahead."), EndFrame()])
        await asyncio.wait_for(asyncio.shield(run), 60)
        assert [s.text for s in conv.history] == [spoken_text(text, 240), "Sorry, go ahead."]
    finally:
        if not run.done():
            await worker.cancel()
            await asyncio.wait_for(run, 30)


@pytest.mark.asyncio
async def test_one_engine_per_process(hf_checkpoint):
    a, b = make_tts(hf_checkpoint), make_tts(hf_checkpoint)
    conv_a, conv_b = await a.wait_ready(), await b.wait_ready()
    assert a._backend is b._backend  # loaded once, shared by every pipeline of the process
    assert conv_a.id != conv_b.id


@pytest.mark.slow
@pytest.mark.asyncio
async def test_model_that_fails_to_load_reports_an_error_and_does_not_hang(tmp_path):
    tts = CSMTTSService(settings=CSMTTSService.Settings(model=str(tmp_path / "missing")))
    down, up = await asyncio.wait_for(
        run_test(tts, frames_to_send=[TTSSpeakFrame("Hello."), TTSSpeakFrame("Anyone there?")]), 60
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "could not load" in errors[0].error
    assert not audio_of(down)
    assert not tts.is_usable
