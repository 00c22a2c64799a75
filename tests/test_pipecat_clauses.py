"""CSMTTSService cuts LLM text into clauses (split="clause", the default) or sentences: the first
audio follows the first clause, later clauses continue the same turn as replies conditioned on the
earlier ones, a barge-in trims across them, and a reply's style tag reaches every piece. Offline,
on the small random checkpoint, in real Pipecat pipelines."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    AggregatedTextFrame,
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.services.tts_service import TextAggregationMode  # noqa: E402
from pipecat.tests.utils import run_test  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from test_pipecat import Collector, audio_of  # noqa: E402

import pipecat_csm.tts as csm_tts  # noqa: E402
from csm_plugin.backend import shared_service  # noqa: E402
from csm_plugin.conversation.clauses import split_text  # noqa: E402
from csm_plugin.conversation.styles import split_style_tag  # noqa: E402
from csm_plugin.errors import InputError  # noqa: E402
from pipecat_csm import ClauseTextAggregator, CSMTTSService  # noqa: E402

PIECE_MS = 400  # 5 frames per piece: short pieces keep the tests fast


def make_tts(checkpoint, *, max_audio_ms=PIECE_MS, **settings) -> CSMTTSService:
    return CSMTTSService(settings=CSMTTSService.Settings(model=str(checkpoint), max_audio_ms=max_audio_ms, **settings))


def response(*tokens: str) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


def pieces_announced(frames) -> list[str]:
    """The text of each run_tts call, as Pipecat announces it (`will_be_spoken`) before its audio."""
    return [f.text for f in frames if type(f) is AggregatedTextFrame and f.will_be_spoken]


class Running:
    """A pipeline [tts, Collector] run by a WorkerRunner, fed frame by frame by the test."""

    def __init__(self, tts: CSMTTSService, **params):
        self.sink = Collector()
        self.worker = PipelineWorker(Pipeline([tts, self.sink]), params=PipelineParams(**params), cancel_on_idle_timeout=False)
        self.run: asyncio.Task | None = None

    async def __aenter__(self) -> Running:
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self.run = asyncio.create_task(runner.run())
        return self

    async def end(self) -> None:
        await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(asyncio.shield(self.run), 60)

    async def __aexit__(self, *exc) -> None:
        if not self.run.done():
            await self.worker.cancel()
            await asyncio.wait_for(self.run, 30)


# --- the aggregator ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_clause_aggregator_cuts_streamed_text_with_the_projects_clause_rule():
    text = "Sure thing, let me check that for you. It left the depot: it is on its way, and it should arrive today."
    tokens = [text[i : i + 3] for i in range(0, len(text), 3)]  # LLM-sized tokens, cut anywhere
    aggregator = ClauseTextAggregator(min_words=2, max_words=12)
    pieces = [a.text for t in tokens async for a in aggregator.aggregate(t)]
    rest = await aggregator.flush()
    pieces.append(rest.text)
    assert pieces == split_text(text) == [
        "Sure thing,", "let me check that for you.", "It left the depot:", "it is on its way,", "and it should arrive today.",
    ]
    # a boundary is known once the next character shows it is one ("1,000" is no boundary)
    assert [a.text async for a in aggregator.aggregate("It costs 1,000")] == []
    assert aggregator.text.text == "It costs 1,000"
    await aggregator.handle_interruption()  # an interrupted reply's text is dropped
    assert aggregator.text.text == "" and await aggregator.flush() is None


# --- first audio at the first clause -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_first_audio_comes_at_the_first_clause_before_the_sentence_ends(hf_checkpoint):
    tts = make_tts(hf_checkpoint, seed=1)
    async with Running(tts) as p:
        await p.worker.queue_frames([LLMFullResponseStartFrame(), LLMTextFrame("Sure thing,"), LLMTextFrame(" let")])
        # The rest of the sentence has not even been sent: audio can only come from the clause.
        # (Whole sentences would wait here for the sentence end, and time out.)
        await p.sink.wait_for(lambda fs: audio_of(fs), timeout=60)
        assert pieces_announced(p.sink.frames) == ["Sure thing,"]
        await p.worker.queue_frames([LLMTextFrame(" me check"), LLMTextFrame(" that for you."), LLMFullResponseEndFrame()])
        await p.end()
    frames = p.sink.frames
    assert pieces_announced(frames) == ["Sure thing,", "let me check that for you."]
    assert [(s.speaker, s.text) for s in tts.conversation.history] == [(0, "Sure thing,"), (0, "let me check that for you.")]

    # One turn for Pipecat: one Started/Stopped pair around all the audio, one context id.
    names = [type(f).__name__ for f in frames]
    assert names.count("TTSStartedFrame") == names.count("TTSStoppedFrame") == 1
    audio_at = [i for i, f in enumerate(frames) if isinstance(f, TTSAudioRawFrame)]
    assert names.index("TTSStartedFrame") < audio_at[0] and audio_at[-1] < names.index("TTSStoppedFrame")
    started = next(f for f in frames if isinstance(f, TTSStartedFrame))
    assert {f.context_id for f in audio_of(frames)} == {started.context_id}
    assert len(audio_of(frames)) == 2 * PIECE_MS // 80  # every frame of both clauses, none lost

    # One word timeline: the second clause's words come after the first clause's audio.
    words = [f for f in frames if isinstance(f, TTSTextFrame)]
    assert " ".join(w.text for w in words) == "Sure thing, let me check that for you."
    pts = [w.pts for w in words]
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert (pts[2] - pts[0]) / 1e9 >= PIECE_MS / 1000 - 1e-3  # "let" starts where clause 1's audio ends


@pytest.mark.asyncio
async def test_sentence_mode_speaks_whole_sentences(hf_checkpoint):
    tts = CSMTTSService(split="sentence", settings=CSMTTSService.Settings(model=str(hf_checkpoint), max_audio_ms=PIECE_MS))
    down, up = await run_test(tts, frames_to_send=response("Sure thing,", " let me check", " that for you.", " Done."))
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert pieces_announced(down) == ["Sure thing, let me check that for you.", "Done."]
    assert [s.text for s in tts.conversation.history] == ["Sure thing, let me check that for you.", "Done."]


@pytest.mark.asyncio
async def test_split_settings_change_from_the_next_response(hf_checkpoint):
    tts = make_tts(hf_checkpoint, max_audio_ms=160)
    text = "One two, three four, five six."
    frames = [
        *response(text),
        TTSUpdateSettingsFrame(delta=CSMTTSService.Settings(split="sentence")),
        *response(text),
        TTSUpdateSettingsFrame(delta=CSMTTSService.Settings(split="clause", clause_min_words=3)),
        *response(text),
    ]
    down, up = await run_test(tts, frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert pieces_announced(down) == ["One two,", "three four,", "five six.", text, "One two, three four,", "five six."]


@pytest.mark.asyncio
async def test_bad_split_settings_are_refused(hf_checkpoint):
    with pytest.raises(InputError, match="split mode"):
        CSMTTSService(split="word")
    with pytest.raises(InputError, match="max_words"):
        CSMTTSService(settings=CSMTTSService.Settings(clause_min_words=5, clause_max_words=3))
    with pytest.raises(InputError, match="not tokens"):  # every token would be a reply of its own
        CSMTTSService(text_aggregation_mode=TextAggregationMode.TOKEN)
    with pytest.raises(InputError, match="reuse_context_id_within_turn"):
        CSMTTSService(reuse_context_id_within_turn=False)
    # At runtime: an ErrorFrame, and the settings that worked stay.
    tts = make_tts(hf_checkpoint, max_audio_ms=160)
    frames = [TTSUpdateSettingsFrame(delta=CSMTTSService.Settings(clause_max_words=0, temperature=0.5)), *response("One two, three four.")]
    down, up = await run_test(tts, frames_to_send=frames)
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "max_words must be an int >= 1" in errors[0]
    assert (tts._settings.clause_max_words, tts._settings.temperature) == (12, 0.9)
    assert pieces_announced(down) == ["One two,", "three four."]


# --- clauses are consecutive replies -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_clause_output_equals_speaking_the_clauses_as_consecutive_turns(hf_checkpoint):
    text = "Of course, I can help with that. Let me look."
    pieces = split_text(text)
    assert pieces == ["Of course,", "I can help with that.", "Let me look."]
    tts = make_tts(hf_checkpoint, seed=4)
    down, up = await run_test(tts, frames_to_send=response("Of", " course,", " I can", " help with that.", " Let me look."))
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    history = tts.conversation.history
    assert [(s.speaker, s.text) for s in history] == [(0, p) for p in pieces]

    # The same service, another conversation: each clause spoken as a reply after the previous
    # ones, with the seeds the service gives its n-th reply (seed + n).
    service = await shared_service(hf_checkpoint)
    reference = service.conversation("reference-consecutive-turns")
    pcm, codes = [], []
    for n, piece in enumerate(pieces):
        chunks = [c async for c in reference.speak(piece, speaker=0, seed=4 + n, max_audio_ms=PIECE_MS)]
        pcm += [c.pcm for c in chunks]
        codes.append(np.concatenate([c.codes for c in chunks]))
    await reference.close()
    for segment, expected in zip(history, codes):
        assert np.array_equal(segment.codes, expected)
    # and the pipeline's audio is exactly that audio, clause after clause, with no gap or overlap
    assert b"".join(f.audio for f in audio_of(down)) == np.concatenate(pcm).astype(np.int16).tobytes()


@pytest.mark.asyncio
async def test_clauses_at_phone_rate_keep_exact_lengths(hf_checkpoint):
    tts = make_tts(hf_checkpoint, seed=6)
    down, up = await run_test(tts, frames_to_send=response("Of course, I can help with that."),
                              pipeline_params=PipelineParams(audio_out_sample_rate=8000))
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    frames = sum(s.codes.shape[0] for s in tts.conversation.history)
    assert len(tts.conversation.history) == 2
    # each clause's resampler is flushed at its end: 640 samples per 80 ms frame, both clauses
    assert sum(len(f.audio) for f in audio_of(down)) == 2 * 640 * frames


# --- barge-in across clauses -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "heard_ms, kept_frames",
    [
        (550, [5, 2]),  # all of the first clause and 150 ms of the second (2 frames had started)
        (200, [3]),  # 200 ms of the first clause; the second was generated but never heard
    ],
)
async def test_barge_in_trims_across_the_clauses_of_a_turn(hf_checkpoint, monkeypatch, heard_ms, kept_frames):
    now = [1000.0]
    monkeypatch.setattr(csm_tts, "_clock", lambda: now[0])  # playback time, driven by the test
    tts = make_tts(hf_checkpoint, seed=8)
    async with Running(tts) as p:
        await p.worker.queue_frames(response("One two three four,", " five six seven eight."))
        await p.sink.wait_for(lambda fs: any(isinstance(f, TTSStoppedFrame) for f in fs))
        conv = tts.conversation
        generated = [s.codes for s in conv.history]
        assert [s.text for s in conv.history] == ["One two three four,", "five six seven eight."]
        assert [c.shape[0] for c in generated] == [5, 5]
        now[0] += heard_ms / 1000  # the transport has played this much of the turn
        await p.worker.queue_frame(InterruptionFrame())
        await p.sink.wait_for(lambda fs: any(isinstance(f, InterruptionFrame) for f in fs))
        await p.end()
    history = tts.conversation.history
    # Both clauses were one turn played back to back: trimmed together, newest first.
    assert [s.codes.shape[0] for s in history] == kept_frames
    for segment, codes, frames in zip(history, generated, kept_frames):
        assert np.array_equal(segment.codes, codes[:frames])
    assert history[0].text.startswith("One")


# --- style tags --------------------------------------------------------------------------------------------


class _StyleRecordingConversation:
    """A conversation that records what the adapter asks it to say, then says it without the tag
    (as the service does once it applies the tag's style)."""

    def __init__(self, conv, said):
        self._conv, self._said = conv, said
        self.id = conv.id

    def __getattr__(self, name):
        return getattr(self._conv, name)

    def speak(self, text, options=None, **changes):
        self._said.append((text, options.style))
        _, words = split_style_tag(text)
        return self._conv.speak(words, dataclasses.replace(options, style=None), **changes)


class _StyleRecordingBackend:
    def __init__(self, service):
        self.service, self.said = service, []

    async def start(self):
        return self

    def conversation(self, conversation_id, *, voices=None):
        return _StyleRecordingConversation(self.service.conversation(conversation_id, voices=voices), self.said)

    async def close(self):
        pass


@pytest.mark.asyncio
async def test_every_piece_of_a_reply_carries_its_style_tag(hf_checkpoint):
    backend = _StyleRecordingBackend(await shared_service(hf_checkpoint))
    tts = CSMTTSService(backend=backend, settings=CSMTTSService.Settings(max_audio_ms=160))
    frames = [
        LLMFullResponseStartFrame(),
        LLMTextFrame("[calm] Sure"), LLMTextFrame(" thing, let me"), LLMTextFrame(" check."),
        TTSSpeakFrame("Please hold on."),  # spoken in the middle of the reply: a turn of its own
        LLMTextFrame(" It is on its way."),
        LLMFullResponseEndFrame(),
        *response("Anything else, maybe?"),  # the next reply has no tag: nothing is carried over
        *response("[warm] Bye now, take care."),
    ]
    down, up = await run_test(tts, frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert backend.said == [
        ("[calm] Sure thing,", None),
        ("Please hold on.", None),
        ("[calm] let me check.", None),
        ("[calm] It is on its way.", None),
        ("Anything else,", None),
        ("maybe?", None),
        ("[warm] Bye now,", None),
        ("[warm] take care.", None),
    ]
    # The carried tags are for the speech alone: the words (what the assistant context gets)
    # are the LLM's words.
    words = " ".join(f.text for f in down if isinstance(f, TTSTextFrame))
    assert "let me check." in words and "[calm] let" not in words


@pytest.mark.asyncio
async def test_style_setting_and_sentence_mode_carry(hf_checkpoint):
    backend = _StyleRecordingBackend(await shared_service(hf_checkpoint))
    tts = CSMTTSService(backend=backend, split="sentence", style="cheerful", settings=CSMTTSService.Settings(max_audio_ms=160))
    frames = [*response("[calm] First one. Second one."),
              TTSUpdateSettingsFrame(delta=CSMTTSService.Settings(style=None)), *response("Third one.")]
    down, up = await run_test(tts, frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert backend.said == [("[calm] First one.", "cheerful"), ("[calm] Second one.", "cheerful"), ("Third one.", None)]
    with pytest.raises(InputError, match="style name"):
        CSMTTSService(style="not a name!")


@pytest.mark.asyncio
async def test_an_interrupted_reply_does_not_pass_its_tag_on(hf_checkpoint):
    backend = _StyleRecordingBackend(await shared_service(hf_checkpoint))
    tts = CSMTTSService(backend=backend, settings=CSMTTSService.Settings(max_audio_ms=160))
    async with Running(tts) as p:
        await p.worker.queue_frames([LLMFullResponseStartFrame(), LLMTextFrame("[calm] One two, three")])
        await p.sink.wait_for(lambda fs: audio_of(fs))
        await p.worker.queue_frame(InterruptionFrame())
        await p.sink.wait_for(lambda fs: any(isinstance(f, InterruptionFrame) for f in fs))
        await p.worker.queue_frames(response("Four five, six."))
        await p.end()
    assert backend.said == [("[calm] One two,", None), ("Four five,", None), ("six.", None)]
