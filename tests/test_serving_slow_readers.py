"""Slow readers slow only their own stream (issue 15). A stream whose listener falls behind is
paused; when a reply waits for a cache slot, a paused stream is suspended: it gives its slot up
(its lease writes nowhere any more) and keeps its own state; when its listener catches up it
takes a slot again and goes on with exactly the codes and audio it would have had. Through the
server, a reader that stays behind past send_timeout_s ends with `slow_consumer`, its history
exactly what was sent.

Engine and service tests run in-process on the tiny checkpoint; the server tests on loopback."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
import torch

from csm_plugin.engine import Engine, Sampling, SlotsBusyError
from csm_plugin.engine.preempt import resume, suspend
from csm_plugin.prompt import Segment
from csm_plugin.service import CSMService
from test_server_support import AUTH, KEY, Stream, metric_value, poll, running_server, scrape
from test_serving_admission import OTHER_AUTH, read_to_done, server_frames, small_buffer_session, stall

LONG = "A long answer that this listener takes in far too slowly, word by word."


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def reference_engine(hf_checkpoint):
    return Engine.load(hf_checkpoint)


def fresh(engine: Engine, history, text: str, seed: int, max_audio_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [frames, 32] and float PCM of an uninterrupted reply after `history`."""
    frames = list(engine.synthesize(list(history), 0, text, Sampling(seed=seed, max_audio_ms=max_audio_ms)))
    return torch.stack([f.codes for f in frames]).numpy(), np.concatenate([f.pcm for f in frames])


async def counts(service: CSMService) -> dict:
    """The worker's streams by state, read on the worker thread."""
    worker = service._worker
    return await asyncio.wrap_future(worker.submit(lambda engine: worker.stream_counts()))


# --- the engine primitives (csm_plugin/engine/preempt.py) ----------------------------------------

CONTEXT = [Segment(1, "Hi, my parcel never arrived."), Segment(0, "I am sorry to hear that.")]


def started(engine: Engine, owner: str, seed: int, frames: int):
    keyed = [(f"{owner}-{i}", s) for i, s in enumerate(CONTEXT)]
    stream = engine.start(owner, keyed, 0, LONG, Sampling(seed=seed, max_audio_ms=1600))
    out = [engine.step(stream) for _ in range(frames)]
    return stream, out


def run_out(engine: Engine, stream, frames: list) -> tuple[np.ndarray, np.ndarray]:
    while not stream.done:
        frame = engine.step(stream)
        if frame is not None:
            frames.append(frame)
    return torch.stack([f.codes for f in frames]).numpy(), np.concatenate([f.pcm for f in frames])


@pytest.mark.parametrize("compile", [False, "graphs"], ids=["eager", "graphs"])
@pytest.mark.parametrize("taken", [False, True], ids=["slot-kept", "slot-taken-meanwhile"])
def test_suspended_and_resumed_stream_equals_an_uninterrupted_one(hf_checkpoint, reference_engine, taken, compile):
    """Also with fixed shapes and GraphedSteps (compile="graphs"): suspend and resume copy rows
    in place, where the graphs read them, and the Mimi state's scratch row stays out of it."""
    codes_ref, pcm_ref = fresh(reference_engine, CONTEXT, LONG, seed=3, max_audio_ms=1600)
    engine = Engine.load(hf_checkpoint, slots=1, compile=compile)
    engine.warm_up()
    stream, frames = started(engine, "a", seed=3, frames=5)
    pool = engine.slot_pool
    suspended = suspend(engine, stream)
    assert not pool.holds(stream.lease)  # a suspended stream writes nowhere
    assert not pool.slots[suspended.slot].in_use  # its slot is free for another owner
    if taken:  # another conversation's reply takes the only slot: its context, frames, decoder row
        b = engine.start("b", [("b-0", Segment(1, "Something else entirely, and longer than that."))], 0, "Hello.",
                         Sampling(seed=2, max_audio_ms=240))
        [engine.step(b) for _ in range(2)]
        engine.finish(b, None, None)
        assert b.slot == suspended.slot and engine.cached_keys("a") == []
    stream = resume(engine, suspended)
    assert pool.holds(stream.lease) and pool.slots[stream.slot].streaming
    assert engine.cached_keys("a") == ["a-0", "a-1"] and engine.cached_keys("b") == []
    codes, pcm = run_out(engine, stream, frames)
    assert np.array_equal(codes, codes_ref)
    if compile:  # the same audio up to float rounding (attention over all 2048 positions, masked)
        assert np.allclose(pcm, pcm_ref, atol=1e-5, rtol=1e-4)
    else:
        assert np.array_equal(pcm, pcm_ref)
    engine.finish(stream, "a-2", Segment(0, LONG, codes))
    assert engine.cached_keys("a") == ["a-0", "a-1", "a-2"]


def test_a_suspended_stream_finished_touches_no_slot_and_resume_waits_for_one(hf_checkpoint):
    engine = Engine.load(hf_checkpoint, slots=1)
    stream, _ = started(engine, "a", seed=1, frames=3)
    suspended = suspend(engine, stream)
    b = engine.start("b", [("b-0", Segment(1, "Another caller."))], 0, "Hello.", Sampling(seed=2, max_audio_ms=240))
    with pytest.raises(SlotsBusyError):  # every slot is generating: it waits, changing nothing
        resume(engine, suspended)
    assert engine.cached_keys("b") == ["b-0"] and engine.slot_pool.holds(b.lease)
    engine.finish(stream, "a-2", Segment(0, LONG, torch.stack(stream.codes).numpy()))  # ended while suspended
    assert engine.cached_keys("b") == ["b-0"] and engine.slot_pool.holds(b.lease)  # nothing touched


# --- through the service -------------------------------------------------------------------------

async def stalled_reply(conv, seed: int, max_audio_ms: int = 1600):
    """A reply whose listener took its first chunk and then stopped listening."""
    reply = conv.speak(LONG, seed=seed, max_audio_ms=max_audio_ms)
    first = await reply.__anext__()
    return reply, first


@pytest.mark.slow  # eight replies paused, then run to their end
def test_a_waiting_reply_gets_its_first_audio_while_eight_slow_streams_are_paused(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=8) as service:
            service._worker.max_backlog_frames = 3
            slow = [await stalled_reply(service.conversation(f"slow-{i}"), seed=i) for i in range(8)]
            await poll(lambda: _paused(service, 8), timeout=60)
            other = service.conversation("other")
            started_at = time.perf_counter()
            reply = other.speak("I am served.", seed=9, max_audio_ms=240)
            first = await asyncio.wait_for(reply.__anext__(), 30)  # before: it waited for a slot forever
            first_audio_s = time.perf_counter() - started_at
            rest = [c async for c in reply]
            assert 1 + len(rest) == 3 and first.num_frames == 1
            assert (await counts(service))["suspended"] >= 1
            assert all(service.conversation(f"slow-{i}").speaking for i in range(8))
            # the slow listeners come back: every reply goes on to its end, as if never interrupted
            results = []
            for i, (r, first_chunk) in enumerate(slow):
                chunks = [first_chunk] + [c async for c in r]
                results.append((np.concatenate([c.codes for c in chunks]), service.conversation(f"slow-{i}").history[-1].codes))
            assert (await counts(service)) == {"active": 0, "paused": 0, "suspended": 0, "waiting": 0}
            return first_audio_s, results

    first_audio_s, results = run(main())
    assert first_audio_s < 30
    for i, (delivered, recorded) in enumerate(results):
        expected, _ = fresh(reference_engine, [], LONG, seed=i, max_audio_ms=1600)
        assert np.array_equal(delivered, expected) and np.array_equal(recorded, expected)


_last_counts: dict = {}


async def _paused(service: CSMService, n: int) -> bool:
    c = await counts(service)
    _last_counts.update(c)
    return c["paused"] + c["suspended"] == n


def test_a_suspended_reply_resumes_with_the_same_codes_and_audio(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=1) as service:
            service._worker.max_backlog_frames = 3
            a = service.conversation("a")
            await a.add_segment(1, "Hi, my parcel never arrived.")
            reply, first = await stalled_reply(a, seed=4)
            await poll(lambda: _paused(service, 1), timeout=60)
            b = service.conversation("b")  # takes the only slot: a is suspended, its slot reused
            await b.add_segment(1, "A different caller, with a different question altogether.")
            b_chunks = await asyncio.wait_for(_collect(b.speak("Me first.", seed=5, max_audio_ms=240)), 30)
            assert len(b_chunks) == 3 and (await counts(service))["suspended"] == 1
            chunks = [first] + [c async for c in reply]  # the listener is back: a resumes
            history = a.history
            # a's next turn is conditioned on the cache the resumed reply left
            await a.add_segment(1, "Thanks.")
            next_codes = np.concatenate([c.codes async for c in a.speak("You are welcome.", seed=6, max_audio_ms=480)])
            return chunks, history, a.history, next_codes

    chunks, history, later, next_codes = run(main())
    codes_ref, pcm_ref = fresh(reference_engine, history[:-1], LONG, seed=4, max_audio_ms=1600)
    codes = np.concatenate([c.codes for c in chunks])
    assert np.array_equal(codes, codes_ref) and np.array_equal(history[-1].codes, codes_ref)
    pcm = np.concatenate([c.pcm for c in chunks])
    assert np.array_equal(pcm, _int16(pcm_ref))
    expected_next, _ = fresh(reference_engine, later[:-1], "You are welcome.", seed=6, max_audio_ms=480)
    assert np.array_equal(next_codes, expected_next)


def test_a_suspended_reply_that_ends_keeps_exactly_what_was_delivered(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=1) as service:
            service._worker.max_backlog_frames = 3
            a = service.conversation("a")
            reply, first = await stalled_reply(a, seed=7)
            second = await reply.__anext__()
            await poll(lambda: _paused(service, 1), timeout=60)
            b = service.conversation("b")
            await asyncio.wait_for(_collect(b.speak("Me first.", seed=5, max_audio_ms=240)), 30)
            assert (await counts(service))["suspended"] == 1
            await reply.aclose()  # the listener is gone for good (the server's slow_consumer does this)
            assert (await counts(service)) == {"active": 0, "paused": 0, "suspended": 0, "waiting": 0}
            recorded = a.history[-1].codes
            engine = service.engine
            assert not any(s.in_use for s in engine.slot_pool.slots)
            await a.add_segment(1, "Hello?")
            next_codes = np.concatenate([c.codes async for c in a.speak("Sorry, where were we.", seed=8, max_audio_ms=480)])
            return np.concatenate([first.codes, second.codes]), recorded, a.history, next_codes

    delivered, recorded, history, next_codes = run(main())
    assert delivered.shape[0] == 2 and np.array_equal(recorded, delivered)
    expected_next, _ = fresh(reference_engine, history[:-1], "Sorry, where were we.", seed=8, max_audio_ms=480)
    assert np.array_equal(next_codes, expected_next)


def test_suspended_copies_are_bounded_beyond_it_a_waiting_reply_waits(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=1) as service:
            worker = service._worker
            worker.max_backlog_frames = 3
            worker.max_suspended_bytes = 0  # no room for any copy
            reply, _ = await stalled_reply(service.conversation("a"), seed=1)
            await poll(lambda: _paused(service, 1), timeout=60)
            waiting = asyncio.ensure_future(_collect(service.conversation("b").speak("Me first.", seed=5, max_audio_ms=240)))
            await poll(lambda: _waiting(service, 1), timeout=30)
            assert (await counts(service)) == {"active": 0, "paused": 1, "suspended": 0, "waiting": 1}
            assert not waiting.done()
            worker.max_suspended_bytes = 2**30  # room again: the paused stream gives its slot up
            assert len(await asyncio.wait_for(waiting, 30)) == 3
            assert (await counts(service))["suspended"] == 1
            await reply.aclose()

    run(main())


async def _waiting(service: CSMService, n: int) -> bool:
    return (await counts(service))["waiting"] == n


async def _collect(reply) -> list:
    return [c async for c in reply]


def _int16(pcm: np.ndarray) -> np.ndarray:
    from csm_plugin.audio import float_to_int16

    return float_to_int16(pcm)


# --- through the server ----------------------------------------------------------------------------

async def slow_readers(slow, url: str, n: int, max_audio_ms: int) -> list[Stream]:
    readers = []
    for i in range(n):
        c = await Stream.connect(slow, url, f"stalled-{i}")
        await c.request(type="open")
        await c.send(type="speak", text=LONG, seed=i, max_audio_ms=max_audio_ms)
        stall(c)
        readers.append(c)
    return readers


def behind(state) -> int:
    return state.admission.behind


@pytest.mark.slow
def test_eight_slow_readers_on_one_key_leave_another_keys_first_audio_alone(hf_checkpoint, reference_engine):
    async def main():
        async with running_server(
            hf_checkpoint, reader_lag_s=0.3, send_timeout_s=120, send_buffer_bytes=4096
        ) as (url, state), small_buffer_session() as slow, aiohttp.ClientSession() as s:
            readers = await slow_readers(slow, url, 8, max_audio_ms=12_000)  # (~65 frames fill the buffers)
            await poll(lambda: behind(state) == 8, timeout=90)
            other = await Stream.connect(s, url, "other", headers=OTHER_AUTH)
            await other.request(type="open")
            started_at = time.perf_counter()
            heard = asyncio.Event()
            task = asyncio.create_task(other.reply(heard))  # reads the reply the next line asks for
            await other.send(type="speak", text="I am served.", seed=5, max_audio_ms=240)
            await asyncio.wait_for(heard.wait(), 30)
            first_audio_s = time.perf_counter() - started_at
            _, pcm, done = await asyncio.wait_for(task, 30)
            assert done["reason"] == "completed" and done["frames"] == 3 and len(b"".join(pcm)) == 3 * 3840
            # nobody was cut: the slow replies were suspended, not ended
            assert (await counts(state.service))["suspended"] >= 1
            assert metric_value(await scrape(s, url), "csm_streams_total", {"outcome": "slow_consumer"}) == 0
            assert state.active_streams == 8
            # a slow reader that reads on gets the whole reply, exactly as if it had kept up
            stall(readers[0], False)
            frames, done = await read_to_done(readers[0])
            assert done["reason"] == "completed" and done["frames"] == frames == 150
            return first_audio_s, state.sessions.get(state.keys.authenticate(AUTH["Authorization"]).key_id, "stalled-0").conv.history

    first_audio_s, history = run(main())
    assert first_audio_s < 10  # bounded: before, it waited for a slow reply to end (send_timeout_s 120 here)
    expected, _ = fresh(reference_engine, [], LONG, seed=0, max_audio_ms=12_000)
    assert np.array_equal(history[-1].codes, expected)


@pytest.mark.slow
def test_a_suspended_reader_behind_past_the_limit_ends_with_slow_consumer(hf_checkpoint, reference_engine):
    async def main():
        async with running_server(
            hf_checkpoint, max_cached_conversations=1, reader_lag_s=0.2, send_timeout_s=2, send_buffer_bytes=4096
        ) as (url, state), small_buffer_session() as slow, aiohttp.ClientSession() as s:
            (c,) = await slow_readers(slow, url, 1, max_audio_ms=60_000)
            await poll(lambda: behind(state) == 1, timeout=60)
            other = await Stream.connect(s, url, "other", headers=OTHER_AUTH)
            await other.request(type="open")
            _, _, done = await asyncio.wait_for(other.reply(text="I am served.", seed=5, max_audio_ms=240), 30)
            assert done["reason"] == "completed"
            assert (await counts(state.service))["suspended"] == 1  # it gave its slot up and waits
            metrics = await scrape(s, url)
            assert metric_value(metrics, "csm_suspended_streams") == 1 and metric_value(metrics, "csm_stream_suspensions_total") >= 1
            await poll(lambda: state.active_streams == 0, timeout=30)  # then stayed behind past the limit
            stall(c, False)
            frames, done = await read_to_done(c)
            assert done["reason"] == "error" and done["error"]["code"] == "slow_consumer", (done, frames)
            assert done["frames"] == frames > 0 and done["events"][0]["segment"]["codes"]["frames"] == frames
            assert server_frames(state, KEY, "stalled-0") == frames
            # the socket and the conversation go on: the next turn is conditioned on what was heard
            _, pcm, done = await c.reply(text="Now I listen.", seed=6, max_audio_ms=160)
            assert done["reason"] == "completed" and done["frames"] == 2
            assert metric_value(await scrape(s, url), "csm_streams_total", {"outcome": "slow_consumer"}) == 1
            conv = state.sessions.get(state.keys.authenticate(AUTH["Authorization"]).key_id, "stalled-0").conv
            return frames, conv.history

    frames, history = run(main())
    expected, _ = fresh(reference_engine, [], LONG, seed=0, max_audio_ms=frames * 80)  # (the codes do not depend on the cap)
    assert np.array_equal(history[0].codes, expected)  # exactly the frames sent
    expected_next, _ = fresh(reference_engine, history[:-1], "Now I listen.", seed=6, max_audio_ms=160)
    assert np.array_equal(history[-1].codes, expected_next)
