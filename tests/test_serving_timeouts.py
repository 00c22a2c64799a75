"""Timeouts: a connection that does not finish its request headers (or TLS handshake) is closed
before any authentication, an idle conversation stream is closed (and the client reopens it on
its next request), and the client gives up on a server that goes silent mid-reply."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from csm_plugin.client import ConnectionLostError, RemoteBackend, ServerUnavailableError
from csm_plugin.conversation.protocol import chunk_header, dumps
from csm_plugin.conversation.types import AudioChunk
from test_server_support import KEY, Stream, running_server


def run(coro):
    return asyncio.run(coro)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) == b""
    except (asyncio.TimeoutError, ConnectionError):
        return False


def test_half_open_and_slow_header_connections_are_closed_before_auth(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, header_timeout_s=0.5) as (url, state):
            port = int(url.rsplit(":", 1)[1])
            conns = []
            for i in range(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 3 == 1:  # the request line and half the headers, then nothing
                    writer.write(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")
                elif i % 3 == 2:  # a WebSocket upgrade that never finishes its headers
                    writer.write(b"GET /v1/conversations/c/stream HTTP/1.1\r\nUpgrade: websocket\r\n")
                await writer.drain()
                conns.append((reader, writer))
            results = await asyncio.gather(*(closed_by_server(r, 10) for r, _ in conns))
            assert all(results), results
            for _, writer in conns:
                writer.close()
            # a complete request on a fresh connection is served as usual
            async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as r:
                assert r.status == 200

    run(main())


@pytest.mark.slow
def test_an_idle_stream_is_closed_but_not_while_a_reply_runs(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, stream_idle_timeout_s=0.4) as (url, state), aiohttp.ClientSession() as s:
            c = await Stream.connect(s, url, "quiet")
            await c.request(type="open")
            # a reply longer than the idle timeout, during which the client says nothing
            _, pcm, done = await c.reply(text="A reply that outlasts the idle timeout by far, said slowly.", seed=1,
                                         max_audio_ms=1600)
            assert done["reason"] == "completed" and done["frames"] == 20
            msg = await c.ws.receive(timeout=10)  # then nothing from the client: closed
            assert msg.type == aiohttp.WSMsgType.CLOSE and c.ws.close_code == 4002
            # the client reopens on its next request, and the server still has the conversation
            backend = await RemoteBackend(url, api_key=KEY).start()
            conv = backend.conversation("call")
            await conv.add_segment(1, "Hello.")
            await asyncio.sleep(1.0)  # its socket is closed meanwhile
            assert conv._ws is None or conv._ws.closed
            await conv.add_segment(1, "Still there?")
            assert conv.replays == 0 and len(conv.history) == 2  # resumed, not replayed
            await backend.close()

    run(main())


# --- a server that goes silent --------------------------------------------------------------------

def _chunk(index: int) -> AudioChunk:
    pcm = np.zeros(1920, np.int16)
    return AudioChunk(pcm, index * 80.0, 0, 1, (), codes=np.ones((1, 32), np.uint16))


async def silent_server(chunks_before_silence: int):
    """A fake csm server: answers `open`, then on `speak` sends some chunks and goes silent."""
    speaks = []

    async def stream(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            data = json.loads(msg.data)
            if data["type"] == "open":
                await ws.send_str(dumps({"type": "ready", "re": data["id"], "conversation": "c", "state": "created",
                                         "voices": [], "turns": 0}))
            elif data["type"] == "speak":
                speaks.append(data)
                for i in range(chunks_before_silence):
                    await ws.send_str(dumps(chunk_header(data["id"], _chunk(i))))
                    await ws.send_bytes(_chunk(i).data)
        return ws

    async def info(request):
        return web.json_response({"protocol": 1})

    app = web.Application()
    app.router.add_get("/v1/conversations/{cid}/stream", stream)
    app.router.add_get("/v1/info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", speaks


async def collect(conv, got: list) -> None:
    async for chunk in conv.speak("Hello?", seed=1):
        got.append(chunk)


@pytest.mark.parametrize("chunks", [0, 2])
def test_the_client_gives_up_on_a_silent_server(chunks):
    async def main():
        runner, url, speaks = await silent_server(chunks)
        try:
            backend = await RemoteBackend(url, api_key=KEY, request_timeout=0.5, read_timeout=0.3, reconnect_timeout=1.5).start()
            conv = backend.conversation("c")
            got = []
            if chunks == 0:  # nothing heard: the reply is asked again on new sockets, then a clear error
                with pytest.raises(ServerUnavailableError):
                    await asyncio.wait_for(collect(conv, got), 30)  # (bounded: without a read timeout it hangs)
                assert len(speaks) >= 2 and not got and not conv.speaking
            else:  # audio was heard: the reply ends with ConnectionLostError, the history keeps it
                with pytest.raises(ConnectionLostError):
                    await asyncio.wait_for(collect(conv, got), 30)
                assert len(got) == 2 and conv.history[-1].codes.shape[0] == 2
            await backend.close()
        finally:
            await runner.cleanup()

    run(main())
