"""Regression tests for faults around conversations, cache slots and the inference worker.

Each test names the defect it pins down. They go through the public API (CSMService,
Conversation, RemoteBackend, InferenceWorker) on the tiny random checkpoint, and compare
replies with the same reply (same seed, same context) spoken alone in a fresh service. Codes
are compared with np.asarray, so torch tensors and numpy arrays both work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from csm_plugin.client import RemoteBackend
from csm_plugin.engine import InferenceWorker
from csm_plugin.errors import ConversationBusyError, CSMError, InputError, WorkerCrashedError
from csm_plugin.service import CSMService
from test_server_support import KEY, free_port, running_server

REPO = Path(__file__).resolve().parents[1]


def run(coro):
    return asyncio.run(coro)


def codes_of(chunks) -> np.ndarray:
    """The codes [frames, 32] of a list of chunks, whatever type each chunk's codes have."""
    if not chunks:
        return np.zeros((0, 32), dtype=np.int64)
    return np.concatenate([np.asarray(c.codes).reshape(-1, 32) for c in chunks]).astype(np.int64)


def pcm_of(chunks) -> np.ndarray:
    return np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.int16)


def same_pcm(a: np.ndarray, b: np.ndarray) -> bool:
    """int16 audio equal up to one step of rounding."""
    return a.shape == b.shape and int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max(initial=0)) <= 1


def seg_key(segment) -> tuple:
    codes = None if segment.codes is None else np.asarray(segment.codes).astype(np.int64).tolist()
    return segment.speaker, segment.text, codes


def history_key(history) -> list[tuple]:
    return [seg_key(s) for s in history]


def voice_audio(seconds: float = 0.5, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


async def solo_replies(checkpoint, jobs, **service_kw) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each job (text, speak kwargs) spoken alone, one after another in its own conversation of
    a fresh service: (codes, pcm) for each."""
    out = []
    async with CSMService(checkpoint, **service_kw) as service:
        for i, (text, speak) in enumerate(jobs):
            chunks = [c async for c in service.conversation(f"solo-{i}").speak(text, **speak)]
            out.append((codes_of(chunks), pcm_of(chunks)))
    return out


# --- 1: a slot released while a cancelled reply's prefill still writes into it -------------------

LONG_VOICE_TEXT = "This is how I sound when I read a very long voice prompt aloud. " * 100  # ~1400 rows: 6 prefill chunks


def test_slot_released_during_a_cancelled_prefill_is_not_corrupted_for_the_next_conversation(hf_checkpoint):
    """Defect 1: a reply cancelled during its (chunked) prefill, then `close()`d, releases its
    cache slot while the prefill job still writes into it; the slot goes to the next
    conversation, whose reply then differs from the same reply in a fresh service. The model's
    prefill calls (engine.generator.prefill) are observed, so the cancel lands after the first
    chunk, and slowed a little, so the released slot is reused while that prefill goes on."""
    b_text, b_kw = "Hello, how can I help you today?", dict(seed=5, max_audio_ms=800)

    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=1) as service:
            await service.add_voice("long", text=LONG_VOICE_TEXT, audio=voice_audio(), sample_rate=16_000)
            a = service.conversation("a", voices={0: "long"})  # pinned voice: nothing prefilled yet
            loop = asyncio.get_running_loop()
            prefilling = asyncio.Event()
            generator = service.engine.generator
            original = generator.prefill

            def slow_prefill(*args, **kwargs):  # observes the prefill and slows each call down
                loop.call_soon_threadsafe(prefilling.set)
                time.sleep(0.02)
                return original(*args, **kwargs)

            generator.prefill = slow_prefill
            got = []

            async def listen():
                async for chunk in a.speak("Sure, let me explain everything in detail.", seed=1, max_audio_ms=800):
                    got.append(chunk)

            task = asyncio.create_task(listen())
            await asyncio.wait_for(prefilling.wait(), 30)  # a's prefill has begun, no audio yet
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert not got
            await a.close()
            b = service.conversation("b")
            chunks = await asyncio.wait_for(_collect(b.speak(b_text, **b_kw)), 60)
            generator.prefill = original
            return chunks

    chunks = run(main())
    codes, pcm = codes_of(chunks), pcm_of(chunks)
    [(ref_codes, ref_pcm)] = run(solo_replies(hf_checkpoint, [(b_text, b_kw)], max_cached_conversations=1))
    assert codes.shape == ref_codes.shape and np.array_equal(codes, ref_codes), "b's reply differs from a fresh service's"
    assert same_pcm(pcm, ref_pcm)


async def _collect(gen) -> list:
    return [c async for c in gen]


# --- 2: one consumer's dead event loop stops the shared worker -----------------------------------

def test_a_dead_consumer_loop_fails_only_its_own_stream(hf_checkpoint):
    """Defect 2: a reply whose consumer's event loop has died (its frame callback raises
    RuntimeError from call_soon_threadsafe on a closed loop) must fail alone; the shared
    inference thread goes on serving every other conversation."""
    b_text, b_kw = "I am still here.", dict(seed=2, max_audio_ms=640)

    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=2) as service:
            a, b = service.conversation("dead-loop"), service.conversation("alive")
            kept = {}

            def consume_then_die():  # another thread, its own loop, closed while the reply streams
                loop = asyncio.new_event_loop()
                gen = a.speak("A long reply that nobody will ever hear the end of, sadly.", seed=1, max_audio_ms=4000)
                kept["gen"] = gen  # never finalized: the loop it belongs to is gone
                try:
                    kept["first"] = loop.run_until_complete(gen.__anext__())
                finally:
                    loop.close()

            await asyncio.to_thread(consume_then_die)
            assert kept["first"].num_frames == 1
            reply = asyncio.create_task(_collect(b.speak(b_text, **b_kw)))
            deadline = asyncio.get_running_loop().time() + 60
            while not reply.done():  # b's reply, watching the worker meanwhile (it would never end otherwise)
                assert service.alive, "the inference worker died with another consumer's event loop"
                assert asyncio.get_running_loop().time() < deadline, "b's reply did not finish"
                await asyncio.wait({reply}, timeout=0.05)
            chunks = reply.result()
            alive_after_b = service.alive
            again = await asyncio.wait_for(_collect(b.speak("And again.", seed=3, max_audio_ms=240)), 60)
            return chunks, alive_after_b, service.alive, again

    try:
        chunks, alive_after_b, alive, again = run(main())
    finally:
        gc.collect()  # the dead loop's reply generator goes now, not during some later test
    assert alive_after_b and alive
    assert len(again) == 3
    [(ref_codes, ref_pcm)] = run(solo_replies(hf_checkpoint, [(b_text, b_kw)]))
    assert np.array_equal(codes_of(chunks), ref_codes)
    assert same_pcm(pcm_of(chunks), ref_pcm)


# --- 3: a transient failure inside a batched step is retried on changed state ---------------------

@pytest.mark.slow
def test_transient_batched_step_failure_keeps_healthy_streams_equal_to_solo(hf_checkpoint):
    """Defect 3: when a batched frame step fails part-way (after the frame was sampled and
    recorded, in the batched Mimi step), the per-stream retry must start from the state before
    the failed attempt. Otherwise healthy neighbours silently lose a frame and no longer equal
    their solo runs. Every stream either equals its solo run or failed with a CSMError (at most
    one may fail), and its delivered audio is never missing a frame."""
    jobs = [
        ("First caller, here is your answer.", dict(seed=11, max_audio_ms=960)),
        ("Second caller, one moment please.", dict(seed=12, max_audio_ms=960)),
        ("Third caller, thanks for waiting.", dict(seed=13, max_audio_ms=960, top_k=1)),
    ]

    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=3) as service:
            codec = service.engine.codec
            original = codec.decode_step
            multi_row_calls, fired = [0], []

            def flaky_decode_step(codes, state, rows=None, **kw):
                if rows is not None and len(rows) > 1:
                    multi_row_calls[0] += 1
                    if multi_row_calls[0] == 3 and not fired:  # once, in the middle of the replies
                        fired.append(len(rows))
                        raise RuntimeError("transient codec failure")
                return original(codes, state, rows=rows, **kw)

            codec.decode_step = flaky_decode_step
            delivered: list[list] = [[] for _ in jobs]

            async def one(i):
                conv = service.conversation(f"caller-{i}")
                text, kw = jobs[i]
                async for chunk in conv.speak(text, **kw):
                    delivered[i].append(chunk)

            outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(jobs))), return_exceptions=True), 120)
            codec.decode_step = original
            return delivered, outcomes, fired

    delivered, outcomes, fired = run(main())
    assert fired, "the fault was never injected: no batched Mimi step ran with more than one stream"

    refs = run(solo_replies(hf_checkpoint, jobs))
    equal, failed = 0, 0
    for i, (chunks, outcome, (ref_codes, ref_pcm)) in enumerate(zip(delivered, outcomes, refs)):
        codes = codes_of(chunks)
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, CSMError), f"stream {i} failed with {outcome!r}"
            failed += 1
            # what it delivered before failing is its solo run's beginning, no frame missing
            assert np.array_equal(codes, ref_codes[: len(codes)]), f"stream {i} lost a frame before failing"
            continue
        assert codes.shape == ref_codes.shape and np.array_equal(codes, ref_codes), f"stream {i} differs from its solo run"
        assert same_pcm(pcm_of(chunks), ref_pcm), f"stream {i}'s audio differs from its solo run"
        equal += 1
    assert failed <= 1 and equal >= len(jobs) - 1


# --- 4: break out of `async for` leaves the conversation busy ---------------------------------------

def test_break_out_of_speak_frees_the_conversation_at_once(hf_checkpoint):
    """Defect 4: `break` out of `async for chunk in conv.speak(...)` (which the README promises
    works) left the conversation speaking until the generator was garbage collected, so the next
    add_segment raised ConversationBusyError. After the break it must be idle at once, and the
    history must hold exactly the delivered frames."""
    text = "One two three four five six seven eight nine ten eleven twelve."

    async def main():
        async with CSMService(hf_checkpoint) as service:
            conv = service.conversation("breaker")
            await conv.add_segment(1, "Count for me, please.")
            got = []
            async for chunk in conv.speak(text, seed=7, max_audio_ms=1600):
                got.append(chunk)
                if len(got) == 3:
                    break
            assert not conv.speaking, "the conversation still speaks after `break`"
            try:
                await conv.add_segment(1, "Stop, that is enough.")
            except ConversationBusyError as e:
                pytest.fail(f"add_segment after break: {e!r}")
            return got, conv.turns

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        got, turns = run(main())
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()  # finalize what piled up here, not at some random later allocation
    assert len(turns) == 3
    reply, follow = turns[1], turns[2]
    assert reply.origin == "agent" and reply.segment.speaker == 0
    assert np.array_equal(np.asarray(reply.segment.codes).astype(np.int64), codes_of(got))  # exactly the 3 delivered
    assert text.startswith(reply.segment.text) and len(reply.segment.text) < len(text)
    assert follow.segment.text == "Stop, that is enough."


# --- 5: InferenceWorker.submit races stop() -----------------------------------------------------------

class _PausingQueue:
    """Wraps the worker's job queue: a put from `thread` waits, between submit()'s check and its
    put, until `release` is set."""

    def __init__(self, inner, thread_name: str):
        self.inner, self.thread_name = inner, thread_name
        self.paused, self.release = threading.Event(), threading.Event()

    def put(self, item, *args, **kwargs):
        if item is not None and threading.current_thread().name == self.thread_name:
            self.paused.set()
            self.release.wait(10)
        return self.inner.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _check_settled(futures, what: str) -> None:
    _, pending = concurrent.futures.wait(futures, timeout=5)
    assert not pending, f"{what}: {len(pending)} of {len(futures)} futures never resolved after stop()"
    for f in futures:
        error = f.exception()
        assert error is None or isinstance(error, WorkerCrashedError), repr(error)


def test_submit_racing_stop_never_leaves_a_future_pending():
    """Defect 5: submit() checks "not stopping" and then puts the job; stop() and the worker's
    final drain can run in between, leaving a future that never resolves. Every future submit()
    returns must settle (a result, or WorkerCrashedError) even when it races stop().

    First deterministically: the submitting thread is paused between the check and the put
    (through the worker's job queue) while stop() runs. Then a short stress run of real races
    (on the old code about one trial in ten lost a future)."""
    worker = InferenceWorker(lambda: object())  # no model needed: jobs only
    worker.ready.result(10)
    assert hasattr(worker, "_jobs"), "the test pauses submit() through the worker's job queue `_jobs`"
    queue = worker._jobs = _PausingQueue(worker._jobs, "csm-test-submitter")
    submitted: list[concurrent.futures.Future] = []
    submitter = threading.Thread(target=lambda: submitted.append(worker.submit(lambda engine: "ran")),
                                 name="csm-test-submitter", daemon=True)
    submitter.start()
    assert queue.paused.wait(10), "submit() never reached the queue"
    stopper = threading.Thread(target=worker.stop, daemon=True)
    stopper.start()
    stopper.join(1.0)  # the old code stops (and drains) right away; a fix may make stop() wait for the put
    queue.release.set()
    submitter.join(10)
    stopper.join(10)
    assert len(submitted) == 1
    _check_settled(submitted, "paused between check and put")

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race window is a few bytecodes
    try:
        for trial in range(40):
            worker = InferenceWorker(lambda: object())
            worker.ready.result(10)
            futures: list[concurrent.futures.Future] = []
            halt = threading.Event()

            def submit_until_halted():
                while not halt.is_set():
                    futures.append(worker.submit(lambda engine: None))

            thread = threading.Thread(target=submit_until_halted, daemon=True)
            thread.start()
            time.sleep(0.001)
            worker.stop()
            halt.set()
            thread.join(10)
            _check_settled(futures, f"stress trial {trial}")
    finally:
        sys.setswitchinterval(previous)


# --- 6: interrupt(played_ms) validation ---------------------------------------------------------------

BAD_PLAYED_MS = [-5, math.nan, math.inf, "10", True]


async def _expect_input_error(conv, played_ms, when: str) -> None:
    try:
        await conv.interrupt(played_ms)
    except InputError:
        return
    except Exception as e:  # noqa: BLE001 - reported as the failure
        pytest.fail(f"interrupt({played_ms!r}) {when} raised {e!r}, not InputError")
    pytest.fail(f"interrupt({played_ms!r}) {when} was accepted")


def test_interrupt_rejects_bad_played_ms_and_keeps_the_history(hf_checkpoint):
    """Defect 6: interrupt(played_ms) took -5 (silently deleting the last reply), True (trimming
    it to one frame), and raised a bare ValueError/OverflowError/TypeError for nan, inf and "10".
    Each must raise InputError and leave the history as it was, during a reply and after it."""
    text = "Hello, and thanks for calling our support line today."

    async def main():
        async with CSMService(hf_checkpoint) as service:
            conv = service.conversation("validate")
            await conv.add_segment(1, "Hi.")
            got = []
            async for chunk in conv.speak(text, seed=9, max_audio_ms=800):
                got.append(chunk)
                if len(got) == 2:  # during the reply: each bad value is refused, the reply goes on
                    for bad in BAD_PLAYED_MS:
                        await _expect_input_error(conv, bad, "during the reply")
                    assert conv.speaking
            assert len(got) == 10  # not cut short
            reply = conv.history[-1]
            assert reply.text == text and np.array_equal(np.asarray(reply.codes).astype(np.int64), codes_of(got))
            before = history_key(conv.history)
            for bad in BAD_PLAYED_MS:  # after the reply
                await _expect_input_error(conv, bad, "after the reply")
                assert history_key(conv.history) == before, f"interrupt({bad!r}) changed the history"

    run(main())


# --- 7: history bounded by the context budget -----------------------------------------------------------

def _rows(tokenizer, segment) -> int:
    codes = segment.codes
    return len(tokenizer.encode_segment_text(segment.speaker, segment.text)) + (0 if codes is None else np.asarray(codes).shape[0] + 1)


def _turn_text(i: int) -> str:
    return f"Turn number {i}: here is a fairly long sentence about my order, my address and my refund."


def test_history_is_bounded_by_the_context_budget(hf_checkpoint):
    """Defect 7a: add_segment grew the history without bound (300 long turns accepted). Rule: a
    turn is dropped from the history once the newer turns and the pinned voice prompts alone fill
    the conversation's context budget (no later reply could be conditioned on it). So the rows
    kept stay within the budget plus one turn, the newest turns are kept in order, and pinned
    voices are never dropped."""
    budget = 256

    async def main():
        async with CSMService(hf_checkpoint, context_budget=budget) as service:
            voice = await service.add_voice("agent", text="This is how I sound.", audio=voice_audio(), sample_rate=16_000)
            conv = service.conversation("long-call", voices={0: "agent"})
            for i in range(300):
                speaker = 1 if i % 2 == 0 else 0
                await conv.add_segment(speaker, _turn_text(i), origin="user" if speaker else "agent")
            turns, tokenizer = conv.turns, service.engine.tokenizer
            chunks = await asyncio.wait_for(_collect(conv.speak("Anything else?", seed=1, max_audio_ms=240)), 60)
            return voice, turns, [_rows(tokenizer, t.segment) for t in turns], len(chunks)

    voice, turns, rows, n_chunks = run(main())
    assert turns[0].origin == "voice" and turns[0].segment.text == voice.text and turns[0].segment.speaker == 0
    assert np.array_equal(np.asarray(turns[0].segment.codes), np.asarray(voice.codes))
    kept = turns[1:]
    assert 1 <= len(kept) < 300, f"{len(kept)} of 300 turns kept with a context budget of {budget}"
    assert all(t.origin != "voice" for t in kept)
    first = 300 - len(kept)
    assert [t.segment.text for t in kept] == [_turn_text(i) for i in range(first, 300)]  # the newest, in order
    total = sum(rows)
    # kept exactly while it could still condition a reply: budget <= rows < budget + the oldest kept turn
    assert total <= budget + rows[1], f"{total} rows kept, budget {budget}"
    assert total - rows[1] < budget <= total
    assert n_chunks == 3


def _server_history(state, conversation_id):
    key_id = state.keys.authenticate(f"Bearer {KEY}").key_id
    return state.sessions.get(key_id, conversation_id).conv.history


def test_long_remote_conversation_is_replayed_after_the_server_forgets_it(hf_checkpoint):
    """Defect 7b: the unbounded history made long conversations impossible to restore (a restore
    carries at most 1000 segments / 4 MiB). With the history bounded by the context budget, a
    conversation of 1100 turns whose server restarted is replayed, the client's history equals
    the server's, and the next reply works."""
    port = free_port()
    n_turns = 1100
    overrides = dict(context_positions=256)

    async def main():
        first_server = contextlib.AsyncExitStack()
        url, state = await first_server.enter_async_context(running_server(hf_checkpoint, port=port, **overrides))
        backend = await RemoteBackend(url, api_key=KEY, reconnect_timeout=10).start()
        try:
            conv = backend.conversation("very-long-call")
            for i in range(n_turns):
                await conv.add_segment(1 if i % 2 == 0 else 0, _turn_text(i))
            assert history_key(conv.history) == history_key(_server_history(state, "very-long-call"))
            await first_server.aclose()  # the server goes away and forgets the conversation
            async with running_server(hf_checkpoint, port=port, **overrides) as (url, state):
                assert len(state.sessions) == 0
                await conv.add_segment(1, "Hello again, are you still there?")  # replays the history
                assert conv.replays == 1
                assert history_key(conv.history) == history_key(_server_history(state, "very-long-call"))
                assert conv.history[-1].text == "Hello again, are you still there?"
                chunks = await asyncio.wait_for(_collect(conv.speak("Yes, I am here.", seed=4, max_audio_ms=240)), 60)
                assert len(chunks) == 3
                assert history_key(conv.history) == history_key(_server_history(state, "very-long-call"))
        finally:
            await backend.close()
            await first_server.aclose()

    run(main())


# --- 8: RemoteBackend chunks and the client's imports ------------------------------------------------------

def test_remote_chunks_carry_the_servers_codes(hf_checkpoint):
    """Defect 8: chunks from RemoteConversation.speak carried codes == 24000 (the sample rate
    landed in the codes field). Each chunk's codes must be [frames, 32], together equal to the
    codes the server generated, and its sample_rate 24000."""

    async def main():
        async with running_server(hf_checkpoint) as (url, state), RemoteBackend(url, api_key=KEY) as backend:
            conv = backend.conversation("codes")
            await conv.add_segment(1, "Hi, my parcel never arrived.")
            chunks = [c async for c in conv.speak("I am sorry to hear that.", seed=1, max_audio_ms=480, chunk_frames=2)]
            return chunks, _server_history(state, "codes")[-1]

    chunks, recorded = run(main())
    assert len(chunks) == 3
    for chunk in chunks:
        assert chunk.sample_rate == 24_000
        assert chunk.codes is not None
        codes = np.asarray(chunk.codes)
        assert codes.shape == (2, 32), f"chunk codes {chunk.codes!r}"
    assert np.array_equal(codes_of(chunks), np.asarray(recorded.codes).astype(np.int64))


def test_client_import_does_not_load_torch():
    """Defect 8: `import csm_plugin.client` pulled in torch; a remote client must not need it."""
    result = subprocess.run(
        [sys.executable, "-c", "import csm_plugin.client, sys; assert 'torch' not in sys.modules, 'torch was imported'"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
