"""The conversation service: prefix caching, eviction, trimming, barge-in, concurrency, errors."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from csm_plugin.engine import Engine, Sampling
from csm_plugin.errors import (
    AudioError,
    ContextTooLongError,
    ConversationBusyError,
    EngineError,
    InputError,
    WorkerCrashedError,
)
from csm_plugin.service import CSMService

REPLY_MS = 640  # 8 frames: short replies keep the tests fast


@pytest.fixture(scope="module")
def reference_engine(hf_checkpoint):
    """An independent engine: every reply is checked against a fresh prefill of the history."""
    return Engine.load(hf_checkpoint)


def fresh_codes(engine: Engine, history, speaker: int, text: str, seed: int, max_audio_ms=REPLY_MS) -> torch.Tensor:
    frames = engine.synthesize(list(history), speaker, text, Sampling(seed=seed, max_audio_ms=max_audio_ms))
    return torch.stack([f.codes for f in frames])


def run(coro):
    return asyncio.run(coro)


def voice_audio(seconds: float = 1.0, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


async def reply(conv, text, seed, speaker=0, **kw):
    """Speak to the end; return the chunks and the codes the history recorded for the reply."""
    chunks = [c async for c in conv.speak(text, speaker=speaker, seed=seed, max_audio_ms=kw.pop("max_audio_ms", REPLY_MS), **kw)]
    return chunks, conv.history[-1].codes


def test_cached_reply_equals_fresh_prefill(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            conv = service.conversation("call")
            await conv.add_segment(1, "Hi, my parcel never arrived.", audio=voice_audio(), sample_rate=16_000)
            assert conv.history[0].codes.shape == (13, 32)  # 1 s at 12.5 frames/s, rounded up
            first_chunks, first = await reply(conv, "I am sorry to hear that.", seed=1)
            before_second = conv.history
            await conv.add_segment(1, "It was a blue jacket.")
            _, second = await reply(conv, "Let me check the order for you.", seed=2)
            return first_chunks, first, before_second, conv.history

    chunks, first, before_second, history = run(main())
    assert len(chunks) == first.shape[0] == 8 and all(c.pcm.dtype == np.int16 and len(c.pcm) == 1920 for c in chunks)
    assert np.array_equal(first, fresh_codes(reference_engine, before_second[:1], 0, "I am sorry to hear that.", 1))
    assert np.array_equal(history[-1].codes, fresh_codes(reference_engine, history[:-1], 0, "Let me check the order for you.", 2))
    assert [s.speaker for s in history] == [1, 0, 1, 0]


def test_eviction_and_reprefill_equal_fresh(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=1) as service:
            a, b = service.conversation("a"), service.conversation("b")
            await a.add_segment(1, "Good morning.")
            await reply(a, "Morning! How can I help?", seed=3)
            await b.add_segment(1, "Hello there.")  # takes the only slot: a is evicted
            await reply(b, "Hi, what can I do for you?", seed=4)
            assert service.engine.cached_keys("a") == []
            await a.add_segment(1, "I want to change my address.")
            await reply(a, "Sure, what is the new address?", seed=5)
            return a.history

    history = run(main())
    assert np.array_equal(history[-1].codes, fresh_codes(reference_engine, history[:-1], 0, "Sure, what is the new address?", 5))


def test_trimming_keeps_the_voice_and_equals_fresh(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, context_budget=120) as service:
            await service.add_voice("agent", text="This is how I sound.", audio=voice_audio(0.5, seed=1), sample_rate=16_000)
            conv = service.conversation("long", voices={0: "agent"})
            for i in range(4):
                await conv.add_segment(1, f"Question number {i}, please answer it.")
                await reply(conv, f"Here is answer number {i}.", seed=10 + i)
            return conv.history

    history = run(main())
    assert history[0].text == "This is how I sound." and history[0].speaker == 0  # pinned voice stays
    assert len(history) < 9  # old turns were dropped
    assert history[-1].text == "Here is answer number 3."
    assert np.array_equal(history[-1].codes, fresh_codes(reference_engine, history[:-1], 0, "Here is answer number 3.", 13))


def test_cancel_keeps_exactly_the_delivered_frames(hf_checkpoint, reference_engine):
    text = "One two three four five six seven eight nine ten eleven twelve."

    async def main():
        async with CSMService(hf_checkpoint) as service:
            conv = service.conversation("barge-in")
            await conv.add_segment(1, "Tell me a story.")
            async with contextlib.aclosing(conv.speak(text, seed=7, max_audio_ms=2000)) as stream:
                got = []
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 3:
                        break
            assert not conv.speaking
            after_cancel = conv.history
            _, nxt = await reply(conv, "Anyway, how can I help?", seed=8)
            return got, after_cancel, conv.history

    got, after_cancel, history = run(main())
    full = fresh_codes(reference_engine, after_cancel[:1], 0, text, 7, max_audio_ms=2000)
    cut = after_cancel[-1]
    assert cut.codes.shape[0] == 3 and np.array_equal(cut.codes, full[:3])
    assert text.startswith(cut.text) and len(cut.text) < len(text)  # only the words in 240 ms
    assert np.array_equal(history[-1].codes, fresh_codes(reference_engine, history[:-1], 0, "Anyway, how can I help?", 8))


def test_interrupt_with_played_ms_and_after_the_reply(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            conv = service.conversation("talk-over")
            await conv.add_segment(1, "Hi.")
            got = []
            async for chunk in conv.speak("Hello, and thanks for calling our support line today.", seed=9, max_audio_ms=3000):
                got.append(chunk)
                if len(got) == 5:  # 400 ms delivered, the player has played 150 of them
                    await conv.interrupt(played_ms=150)
            during = conv.history[-1]
            await reply(conv, "Ok.", seed=1)
            await conv.interrupt(played_ms=100)  # the last reply was cut after it ended
            return len(got), during, conv.history

    n, during, history = run(main())
    assert n == 5 and during.codes.shape[0] == 2 and during.text == "Hello,"
    assert history[-1].codes.shape[0] == 2 and history[-1].text == "Ok."


@pytest.mark.slow
def test_twenty_conversations_at_once_match_solo_runs(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=4) as service:  # 20 replies queue for 4 slots
            ticks = 0
            done = asyncio.Event()

            async def timer():
                nonlocal ticks
                while not done.is_set():
                    await asyncio.sleep(0.005)
                    ticks += 1

            async def one(i):
                conv = service.conversation(f"c{i}")
                await conv.add_segment(1, f"Caller {i} says hello.")
                _, codes = await reply(conv, f"Hello caller {i}.", seed=100 + i, max_audio_ms=320)
                return codes

            ticker = asyncio.create_task(timer())
            results = await asyncio.gather(*(one(i) for i in range(20)))
            done.set()
            await ticker
            return results, ticks

    results, ticks = run(main())
    for i, codes in enumerate(results):
        from csm_plugin.prompt import Segment

        expected = fresh_codes(reference_engine, [Segment(1, f"Caller {i} says hello.")], 0, f"Hello caller {i}.", 100 + i, 320)
        assert np.array_equal(codes, expected), i
    assert ticks > 20  # the event loop kept running while the model worked


@pytest.mark.slow
def test_word_timings_cover_the_text(hf_checkpoint):
    text = "Thanks for waiting, your refund is on its way."

    async def main():
        async with CSMService(hf_checkpoint, chunk_frames=2) as service:
            return [c async for c in service.conversation("w").speak(text, seed=1, max_audio_ms=4000)]

    chunks = run(main())
    assert all(len(c.pcm) == 2 * 1920 for c in chunks[:-1])
    assert [w.text for c in chunks for w in c.words] == text.split()
    spans = [(c.text_start, c.text_end) for c in chunks]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert [c.start_ms for c in chunks] == [160 * i for i in range(len(chunks))]


def test_bad_input_leaves_state_unchanged(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint, max_text_tokens=50, context_budget=200) as service:
            conv = service.conversation("errors")
            await conv.add_segment(1, "Hello.")
            before = conv.history
            cases = [
                (InputError, conv.add_segment(1, "   ")),
                (InputError, conv.add_segment("1", "Hi.")),
                (AudioError, conv.add_segment(1, "Hi.", audio=np.zeros(0, np.float32), sample_rate=16_000)),
                (AudioError, conv.add_segment(1, "Hi.", audio=np.zeros((16_000, 2), np.float32), sample_rate=16_000)),
                (AudioError, conv.add_segment(1, "Hi.", audio=voice_audio(), sample_rate=1_000)),
                (AudioError, conv.add_segment(1, "Hi.", audio=voice_audio(), sample_rate=None)),
                (InputError, _drain(conv.speak(""))),
                (InputError, _drain(conv.speak("word " * 80))),
                (InputError, _drain(conv.speak("Hi.", speaker=-1))),
                (InputError, _drain(conv.speak("Hi.", top_k=0))),
                (ContextTooLongError, _drain(conv.speak("a long reply " * 12, max_audio_ms=20_000))),
            ]
            for error, call in cases:
                with pytest.raises(error):
                    await call
                assert conv.history == before and not conv.speaking
            # one reply at a time
            first = conv.speak("Hi there.", seed=1, max_audio_ms=REPLY_MS)
            await first.__anext__()
            with pytest.raises(ConversationBusyError):
                await _drain(conv.speak("Again."))
            with pytest.raises(ConversationBusyError):
                await conv.add_segment(1, "Wait.")
            await first.aclose()
            assert len(conv.history) == 2
            with pytest.raises(InputError, match="unknown voice"):
                service.conversation("x", voices={0: "nobody"})

    run(main())


async def _drain(gen):
    return [c async for c in gen]


def test_generation_failure_and_dead_worker(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            good, bad = service.conversation("good"), service.conversation("bad")
            await bad.add_segment(1, "Hello.")
            before = bad.history
            engine = service.engine
            original = engine.step_many

            def failing(streams):
                if any(s.text == "Break." for s in streams):
                    raise RuntimeError("boom")
                return original(streams)

            engine.step_many = failing
            results = await asyncio.gather(
                _drain(bad.speak("Break.", seed=1)), reply(good, "Fine.", seed=2), return_exceptions=True
            )
            assert isinstance(results[0], EngineError) and "boom" in str(results[0])
            assert results[1][1].shape[0] > 0  # the other stream went on
            assert bad.history == before
            engine.step_many = original
            _, codes = await reply(bad, "Hi.", seed=1)  # the worker and the conversation go on
            assert codes.shape[0] > 0
            service._worker.stop()
            with pytest.raises(WorkerCrashedError):
                await _drain(bad.speak("Still there?"))
            assert len(bad.history) == 2

    run(main())


def test_batched_streams_equal_solo_streams(hf_checkpoint, reference_engine):
    from csm_plugin.prompt import Segment

    engine = Engine.load(hf_checkpoint, slots=3)
    jobs = [
        ([Segment(1, "Hello there.")], "Hi! How are you?", Sampling(top_k=1, max_audio_ms=640)),
        ([], "A different reply entirely.", Sampling(seed=4, max_audio_ms=480)),
        ([Segment(1, "Question?", torch.randint(0, 2048, (5, 32)))], "Answer.", Sampling(seed=9, temperature=0.7, top_k=20, max_audio_ms=800)),
    ]
    streams = [engine.start(f"s{i}", [(object(), s) for s in ctx], 0, text, smp) for i, (ctx, text, smp) in enumerate(jobs)]
    audio: dict[int, list] = {id(s): [] for s in streams}
    while not all(s.done for s in streams):
        active = [s for s in streams if not s.done]
        for s, frame in zip(active, engine.step_many(active)):
            if frame is not None:
                audio[id(s)].append(frame.pcm)
    for (ctx, text, smp), stream in zip(jobs, streams):
        solo = list(reference_engine.synthesize(ctx, 0, text, smp))
        assert np.array_equal(torch.stack(stream.codes), torch.stack([f.codes for f in solo]))
        # one batched Mimi step per frame gives each stream the audio it gets alone
        np.testing.assert_allclose(np.concatenate(audio[id(stream)]), np.concatenate([f.pcm for f in solo]), atol=1e-5)


def test_long_prefill_is_interleaved_with_running_replies(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            engine = service.engine
            engine.prefill_chunk = 16
            events = []
            prefill, step_many = engine.generator.prefill, engine.step_many
            engine.generator.prefill = lambda slot, *a, **k: events.append(("prefill", slot)) or prefill(slot, *a, **k)
            engine.step_many = lambda streams: events.append(("frame",)) or step_many(streams)
            a, b = service.conversation("a"), service.conversation("b")
            await a.add_segment(1, "Hi.")
            chunks = 0
            async for _ in a.speak("Let me read you the whole policy, it is long.", seed=1, max_audio_ms=2400):
                chunks += 1
                if chunks == 2:  # B's long turn arrives while A speaks: ~120 rows, 8 chunks
                    await b.add_segment(1, "Here is my long question. " * 3, audio=voice_audio(5.0), sample_rate=16_000)
            return events, engine.cached_keys("b"), engine.slot_for("b")

    events, b_keys, b_slot = run(main())
    assert len(b_keys) == 1  # B's turn is in its cache already, before B's reply
    b_chunks = [i for i, e in enumerate(events) if e == ("prefill", b_slot)]
    assert len(b_chunks) >= 6
    between = [e for e in events[b_chunks[0] : b_chunks[-1]] if e[0] == "frame"]
    assert len(between) >= len(b_chunks) - 1  # A got a frame between every two of B's chunks


@pytest.mark.slow
def test_a_slow_listener_pauses_its_stream(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            service._worker.max_backlog_frames = 3
            conv = service.conversation("slow")
            stream_ref = {}
            original = service.engine.start_steps

            def spy(*args, **kwargs):
                stream = yield from original(*args, **kwargs)
                stream_ref["s"] = stream
                return stream

            service.engine.start_steps = spy
            gen = conv.speak("A long answer that takes a while to say out loud.", seed=1, max_audio_ms=4000)
            await gen.__anext__()
            await asyncio.sleep(0.5)  # the listener takes nothing for a while
            stream = stream_ref["s"]
            ahead = len(stream.codes) - stream.consumed
            rest = [c async for c in gen]
            return ahead, len(rest), stream

    ahead, rest, stream = run(main())
    assert ahead <= 3  # generation waited for the listener instead of running to the end
    assert rest + 1 == len(stream.codes) == 50  # then it went on to the end


def test_speed_options_reach_the_engine(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint, quantize="int8") as service:
            assert service.engine.checkpoint.model.quantized == "int8" and service.engine.generator.mode == "eager"
            chunks = [c async for c in service.conversation("q").speak("Hi.", seed=1, max_audio_ms=240)]
            assert len(chunks) == 3
        with pytest.raises(InputError, match="compile"):
            await CSMService(hf_checkpoint, quantize="int8", compile=True).start()

    run(main())
