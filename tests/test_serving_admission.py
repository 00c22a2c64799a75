"""Admission and fairness: replies beyond the server's places queue (bounded, with a wait limit,
then `busy` with a retry-after hint that the client honours), places go round-robin across keys,
and a reply whose reader falls behind real time gives its place to a waiting reply (and takes
one again when it catches up) and, past a limit, ends with `slow_consumer`, its history keeping
exactly the frames it sent."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from csm_plugin.client import RemoteBackend, ServerUnavailableError
from csm_plugin.conversation.protocol import ProtocolError
from csm_plugin.server.admission import Admission, Busy
from csm_plugin.server.stream import _Pacing
from test_server_support import AUTH, KEY, OTHER_KEY, Stream, metric_value, poll, running_server, scrape

OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}


def run(coro):
    return asyncio.run(coro)


async def spin(rounds: int = 10) -> None:
    """Let the event loop run the callbacks that hand places on (a few rounds, no time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- the admission queue alone ------------------------------------------------------------------

def test_admission_queues_round_robin_and_refuses_with_a_hint():
    async def main():
        gate = Admission(capacity=2, per_key=2, max_queue=3, max_queue_per_key=2, wait_s=5)
        a1, a2 = await gate.acquire("a"), await gate.acquire("a")
        waiting = [asyncio.create_task(gate.acquire(k)) for k in ("a", "a", "b")]
        await spin()
        assert gate.queued == 3 and not any(t.done() for t in waiting)
        with pytest.raises(Busy) as e:  # the queue is full
            await gate.acquire("c")
        assert e.value.code == "busy" and e.value.retry_after_s >= 1
        gate.release(a1)  # key a has waited longest, so a's first waiter gets it
        await spin()
        assert waiting[0].done() and not waiting[1].done() and not waiting[2].done()
        gate.release(a2)  # now b's turn, though a queued first: round robin across keys
        await spin()
        assert waiting[2].done() and not waiting[1].done()
        gate.release(waiting[2].result())
        await spin()
        assert waiting[1].done()
        for t in (waiting[0], waiting[1]):
            gate.release(t.result())
        assert not gate.active and gate.queued == 0

    run(main())


def test_admission_wait_limit_cancellation_per_key_cap_and_close():
    async def main():
        gate = Admission(capacity=3, per_key=1, max_queue=10, max_queue_per_key=1, wait_s=0.05)
        a = await gate.acquire("a")
        with pytest.raises(Busy, match="within"):  # a's second reply waits past the limit
            await gate.acquire("a")
        b = await gate.acquire("b")  # another key is not held up by a's cap
        pending = asyncio.create_task(gate.acquire("a"))
        await spin()
        with pytest.raises(Busy, match="waiting"):  # one waiting per key at most
            await gate.acquire("a")
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert gate.queued == 0
        gate.release(a)
        gate.release(b)
        gate.wait_s = 5
        held = await gate.acquire("a")
        waiter = asyncio.create_task(gate.acquire("a"))
        await spin()
        gate.close(ProtocolError("draining", "bye"))
        with pytest.raises(ProtocolError, match="bye"):
            await waiter
        with pytest.raises(ProtocolError, match="bye"):
            await gate.acquire("b")
        gate.release(held)
        assert not gate.active

    run(main())


def test_a_place_behind_is_handed_on_only_when_someone_waits_and_comes_back_when_it_catches_up():
    async def main():
        gate = Admission(capacity=2, per_key=4, max_queue=10, max_queue_per_key=10, wait_s=5)
        p1 = await gate.acquire("a")
        p2 = await gate.acquire("a")
        gate.set_behind(p2, True)
        gate.set_behind(p1, True)
        assert not (p1.yielded or p2.yielded) and gate.active == {p1, p2}  # nobody waits: a reply behind keeps its place
        waiter = asyncio.create_task(gate.acquire("b"))
        await spin()
        assert p2.yielded and not p1.yielded  # the one that fell behind first, and only one
        b = await waiter  # admitted at once: p2 no longer counts, though it is not released
        assert gate.active == {p1, b} and gate.yielded == {p2} and gate.behind == 2 and not p2.released
        gate.set_behind(p2, False)  # its reader caught up: it counts again, above the capacity
        assert gate.active == {p1, p2, b} and not gate.yielded and gate.behind == 1
        late = asyncio.create_task(gate.acquire("c"))
        await spin()
        assert not late.done()  # no new reply while the places are over the limit
        gate.set_behind(p1, False)
        gate.release(p2)
        await spin()
        assert not late.done()
        gate.release(b)
        assert (await late).key_id == "c"
        gate.set_behind(p1, True)  # released while handed on: the place is gone for good
        gate.release(p1)
        gate.release(p1)
        assert gate.active == {late.result()} and not gate.yielded and gate.behind == 0

    run(main())


def test_a_yielded_place_released_and_per_key_limits():
    async def main():
        gate = Admission(capacity=1, per_key=1, max_queue=10, max_queue_per_key=10, wait_s=5)
        a = await gate.acquire("a")
        gate.set_behind(a, True)
        same_key = asyncio.create_task(gate.acquire("a"))  # a's own next reply: a's place is what holds it
        await spin()
        a2 = await same_key
        assert gate.yielded == {a} and gate.active == {a2} and gate.active_per_key["a"] == 1
        gate.release(a)  # ended while handed on: counts nothing, frees nothing twice
        assert gate.active == {a2} and gate.active_per_key["a"] == 1 and not gate.yielded
        gate.set_behind(a2, True)
        other = asyncio.create_task(gate.acquire("b"))
        await spin()
        assert (await other).key_id == "b" and gate.yielded == {a2}
        gate.set_behind(a2, False)  # back, above the capacity of 1
        assert len(gate.active) == 2 and gate.active_per_key == {"a": 1, "b": 1}

    run(main())


def test_pacing_sets_deadlines_at_real_time():
    pacing = _Pacing(lag_s=0.5)
    assert pacing.due(10.0, True, 0.08) == 10.5  # the first chunk: played at once
    # chunks already waiting (generation ahead): played back to back, whenever they are sent
    assert pacing.due(10.01, False, 0.08) == pytest.approx(10.58)
    assert pacing.due(10.02, False, 0.08) == pytest.approx(10.66)
    # generation was late: the player waited for the chunk, so its deadline starts when it was ready
    assert pacing.due(20.0, True, 0.08) == pytest.approx(20.5)
    # but a chunk that was late only because the reader was slow does not reset the clock
    assert pacing.due(30.0, False, 0.08) == pytest.approx(20.58)


# --- through the server -------------------------------------------------------------------------

@pytest.mark.slow
def test_fifty_concurrent_two_turn_conversations_on_one_key_complete(hf_checkpoint):
    """Defaults (8 cache slots): the replies beyond the places queue; no turn is lost or refused."""

    async def main():
        async with running_server(hf_checkpoint) as (url, state):
            backend = await RemoteBackend(url, api_key=KEY).start()
            queued = []

            async def one(i: int) -> int:
                conv = backend.conversation(f"load-{i}")
                for t in range(2):
                    await conv.add_segment(1, f"Caller {i} asks question {t}.")
                    queued.append(state.admission.queued)
                    chunks = [c async for c in conv.speak(f"Answer {t}.", seed=i * 10 + t, max_audio_ms=160)]
                    assert sum(c.num_frames for c in chunks) == 2
                return len(conv.history)

            results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            assert results == [4] * 50  # every turn recorded
            text = await scrape(backend._http, url)
            assert metric_value(text, "csm_streams_total", {"outcome": "completed"}) == 100
            assert metric_value(text, "csm_queue_wait_seconds_count") == 100
            assert max(queued) > 0 or metric_value(text, "csm_queue_wait_seconds_sum") > 0  # they did queue
            await backend.close()

    run(main())


@pytest.mark.slow
def test_busy_has_a_retry_after_hint_and_the_client_backs_off(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, max_active_replies=1, max_queued_replies=0) as (url, state), \
                aiohttp.ClientSession() as s:
            a = await Stream.connect(s, url, "a")
            await a.request(type="open")
            await a.send(type="speak", text="A reply that holds the only place.", seed=1, max_audio_ms=1200)
            await poll(lambda: state.active_streams == 1)
            b = await Stream.connect(s, url, "b", headers=OTHER_AUTH)
            await b.request(type="open")
            err = await b.request(type="speak", text="Me too.")
            assert err["code"] == "busy" and err["retry_after_s"] >= 1
            async with s.post(url + "/v1/speech", headers=AUTH, json={"text": "And me."}) as r:
                assert r.status == 503 and r.headers["Retry-After"] and (await r.json())["error"]["code"] == "busy"
            # the client waits for the hint and asks again: its reply is served once a's is done
            backend = await RemoteBackend(url, api_key=OTHER_KEY, reconnect_timeout=60).start()
            conv = backend.conversation("c")
            chunks = [c async for c in conv.speak("Patience pays.", seed=2, max_audio_ms=160)]
            assert sum(c.num_frames for c in chunks) == 2 and len(conv.history) == 1
            wav = await backend.speech("A whole file.", seed=3, max_audio_ms=160)
            assert wav[:4] == b"RIFF"
            # a client that may not wait that long gets a clear error
            impatient = await RemoteBackend(url, api_key=OTHER_KEY, reconnect_timeout=0.2).start()
            await a.send(type="speak", text="Hold the place again, for a while.", seed=4, max_audio_ms=4000)
            await poll(lambda: state.active_streams == 1)
            with pytest.raises(ServerUnavailableError) as e:
                [c async for c in impatient.conversation("d").speak("Now?", max_audio_ms=160)]
            assert e.value.code == "busy"
            await impatient.close()
            await backend.close()

    run(main())


def test_interrupt_while_queued_ends_the_reply_before_it_starts(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, max_active_replies=1) as (url, state), aiohttp.ClientSession() as s:
            a = await Stream.connect(s, url, "a")
            await a.request(type="open")
            await a.send(type="speak", text="A reply that holds the only place for some time.", seed=1, max_audio_ms=4000)
            await poll(lambda: state.active_streams == 1)
            b = await Stream.connect(s, url, "b")
            await b.request(type="open")
            rid = await b.send(type="speak", text="Queued.", seed=2)
            await poll(lambda: state.admission.queued == 1)
            err = await b.request(type="add_segment", speaker=1, text="Meanwhile.")  # one request at a time
            assert err["code"] == "busy" and "retry_after_s" not in err
            await b.send(type="interrupt")
            answers = {m["type"]: m for m in (await b.json(), await b.json())}
            assert answers["interrupted"]["speaking"] is True
            done = answers["done"]
            assert done["re"] == rid and done["reason"] == "interrupted" and done["frames"] == 0 and done["events"] == []
            assert state.admission.queued == 0
            await a.send(type="interrupt")

    run(main())


def small_buffer_session() -> aiohttp.ClientSession:
    """A client whose sockets have a 4 KiB receive buffer (a reader the server can stall on)."""

    def factory(addr_info):
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=factory))


def stall(c: Stream, stalled: bool = True) -> None:
    """Stop (or resume) reading the socket at all: aiohttp would otherwise buffer up to 512 KiB."""
    transport = c.ws._response.connection.transport
    transport.pause_reading() if stalled else transport.resume_reading()


async def read_to_done(c: Stream) -> tuple[int, dict]:
    """Read a stalled stream's backlog: (audio frames received, its `done`)."""
    frames = 0
    while True:
        msg = await c.ws.receive(timeout=60)
        if msg.type == aiohttp.WSMsgType.BINARY:
            frames += len(msg.data) // (2 * 1920)
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] == "done":
            return frames, data
        assert data["type"] == "chunk", data


def server_frames(state, key: str, conversation: str) -> int:
    session = state.sessions.get(state.keys.authenticate(f"Bearer {key}").key_id, conversation)
    return session.conv.history[-1].codes.shape[0]


@pytest.mark.slow
def test_a_reader_that_falls_behind_gives_its_place_to_a_waiting_reply(hf_checkpoint):
    async def main():
        async with running_server(
            hf_checkpoint, max_cached_conversations=2, reader_lag_s=0.3, send_timeout_s=600, send_buffer_bytes=4096
        ) as (url, state), small_buffer_session() as slow, aiohttp.ClientSession() as s:
            stalled = []
            for i in range(2):  # two readers that read nothing hold both places
                c = await Stream.connect(slow, url, f"stalled-{i}")
                await c.request(type="open")
                await c.send(type="speak", text="A long reply that nobody reads for a while. " * 2, seed=i, max_audio_ms=12_000)
                stall(c)  # (the client still takes ~65 frames into its buffers before the server waits)
                stalled.append(c)
            await poll(lambda: state.admission.behind == 2, timeout=60)
            # another key's reply gets a place at once, not after send_timeout_s
            other = await Stream.connect(s, url, "other", headers=OTHER_AUTH)
            await other.request(type="open")
            _, pcm, done = await asyncio.wait_for(other.reply(text="I am served.", seed=5, max_audio_ms=240), 60)
            assert done["reason"] == "completed" and done["frames"] == 3 and len(b"".join(pcm)) == 3 * 3840
            # one stalled reply gave its place up, and nobody was cut: it is suspended, not ended
            assert len(state.admission.yielded) == 1 and state.active_streams == 2
            assert metric_value(await scrape(s, url), "csm_streams_total", {"outcome": "slow_consumer"}) == 0
            # both readers read on: both replies end complete, every frame sent and recorded
            for i, c in enumerate(stalled):
                stall(c, False)
                frames, done = await read_to_done(c)
                assert done["reason"] == "completed" and done["frames"] == frames == 150
                (event,) = done["events"]
                assert event["op"] == "recorded" and event["segment"]["codes"]["frames"] == frames
                assert server_frames(state, KEY, f"stalled-{i}") == frames
            assert not state.admission.active and not state.admission.yielded
            # the socket is still good for the next turn
            _, pcm, done = await stalled[0].reply(text="Now I listen.", seed=6, max_audio_ms=160)
            assert done["reason"] == "completed" and done["frames"] == 2 and len(b"".join(pcm)) == 2 * 3840

    run(main())


@pytest.mark.slow
def test_a_reader_behind_past_the_limit_ends_with_slow_consumer(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, reader_lag_s=0.2, send_timeout_s=0.5, send_buffer_bytes=4096) as (url, state), \
                small_buffer_session() as slow:
            c = await Stream.connect(slow, url, "stalled")
            await c.request(type="open")
            await c.send(type="speak", text="A very long reply that nobody reads. " * 4, seed=1, max_audio_ms=60_000)
            stall(c)
            await poll(lambda: state.active_streams == 1, timeout=60)
            await poll(lambda: state.active_streams == 0, timeout=60)  # nobody waited: it ended at the limit
            stall(c, False)
            frames, done = await read_to_done(c)
            assert done["reason"] == "error" and done["error"]["code"] == "slow_consumer", (done, frames)
            assert done["frames"] == frames > 0 and done["events"][0]["segment"]["codes"]["frames"] == frames
            assert server_frames(state, KEY, "stalled") == frames

    run(main())
