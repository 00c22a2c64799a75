"""Input at the edge of the server and the client: every client mistake gets a typed error (never
an HTTP 500 or an `internal`), and a superseded socket's running reply still gets its `done`."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from csm_plugin.client import RemoteBackend
from csm_plugin.conversation.history import History
from csm_plugin.conversation.options import MAX_TOP_K
from csm_plugin.conversation.protocol import ProtocolError, parse_client_message, parse_json, valid_conversation_id
from csm_plugin.errors import AudioError, InputError
from test_server_support import AUTH, KEY, Stream, metric_value, running_server, scrape


def run(coro):
    return asyncio.run(coro)


DEEP = "[" * 100_000 + "]" * 100_000
SURROGATE_SPEAK = '{"type": "speak", "id": 7, "text": "Hi \\ud800 there"}'


def test_parse_refuses_deep_json_and_lone_surrogates_with_bad_message():
    for raw in (DEEP, '{"type": "speak", "text": ' + "[" * 50_000 + "]" * 50_000 + "}", SURROGATE_SPEAK,
                '{"type": "open", "voices": {"0": "\\udfff"}}', '{"\\ud800": 1, "type": "close"}'):
        with pytest.raises(ProtocolError) as e:
            parse_client_message(raw)
        assert e.value.code == "bad_message"
    with pytest.raises(ProtocolError):
        parse_json(b"\xff\xfe{}")
    # a surrogate *pair* is one valid character (an emoji escaped by json.dumps)
    assert parse_client_message(json.dumps({"type": "speak", "text": "ok \U0001F600"})).text == "ok \U0001F600"
    with pytest.raises(ProtocolError) as e:
        parse_client_message(json.dumps({"type": "speak", "text": "hi", "top_k": 10**30}))
    assert e.value.code == "bad_message" and "top_k" in e.value.message


def test_conversation_id_with_a_trailing_newline_is_refused():
    assert valid_conversation_id("call-1") and not valid_conversation_id("call-1\n") and not valid_conversation_id("\ncall")


def test_bad_input_over_http_and_websocket_gets_typed_errors(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            # HTTP: deep JSON, lone surrogates, a huge top_k, invalid UTF-8: 400 bad_message, never 500
            bodies = [DEEP.encode(), b'{"text": "Hi \\ud800"}', json.dumps({"text": "Hi.", "top_k": 10**30}).encode(),
                      b'{"text": "\xff\xfe"}', b'{"text": "Hi.", "context": [{"speaker": 1, "text": "\\udc00"}]}']
            for body in bodies:
                async with s.post(url + "/v1/speech", headers={**AUTH, "Content-Type": "application/json"}, data=body) as r:
                    assert r.status == 400, (body[:40], r.status, await r.text())
                    assert (await r.json())["error"]["code"] == "bad_message"
            # a conversation id with a trailing newline (percent-encoded in the path)
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(url + "/v1/conversations/c1%0A/stream", headers=AUTH)
            assert e.value.status == 400
            # WebSocket: the same inputs are `bad_message` errors and the socket goes on
            c = await Stream.connect(s, url)
            await c.ws.send_str(DEEP)
            assert (await c.json())["code"] == "bad_message"
            await c.ws.send_str(SURROGATE_SPEAK)
            err = await c.json()
            assert err["code"] == "bad_message" and err["re"] == 7
            assert (await c.request(type="open"))["type"] == "ready"
            await c.ws.send_str('{"type": "add_segment", "id": 9, "speaker": 1, "text": "\\ud83d"}')
            assert (await c.json())["code"] == "bad_message"
            err = await c.request(type="speak", text="Hello.", top_k=10**30)
            assert err["code"] == "bad_message" and "top_k" in err["message"]
            # the largest top_k allowed is served (the engine caps it at the vocabulary)
            _, pcm, done = await c.reply(text="Any code will do.", top_k=MAX_TOP_K, seed=1, max_audio_ms=240)
            assert done["reason"] == "completed" and done["frames"] == 3 and len(b"".join(pcm)) == 3 * 3840
            text = await scrape(s, url)
            assert metric_value(text, "csm_errors_total", {"code": "internal"}) == 0
            assert metric_value(text, "csm_http_requests_total", {"endpoint": "/v1/speech", "status": "500"}) == 0

    run(main())


def test_audio_that_is_not_samples_is_an_audio_error(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state):
            conv = state.service.conversation("local")
            with pytest.raises(AudioError):
                await conv.add_segment(1, "Hi.", audio=["a", "b"], sample_rate=16_000)
            backend = await RemoteBackend(url, api_key=KEY).start()
            remote = backend.conversation("remote")
            for audio in (["a", "b"], [[0.1, 0.2], [0.3]], {"x": 1}):
                with pytest.raises(AudioError):
                    await remote.add_segment(1, "Hi.", audio=audio, sample_rate=16_000)
            with pytest.raises(InputError):
                backend.conversation("call\n")
            await backend.close()

    run(main())


def test_a_superseded_socket_gets_done_for_its_running_reply(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            a = await Stream.connect(s, url, "taken")
            await a.request(type="open")
            rid = await a.send(type="speak", text="A long reply that another socket will take over.", seed=2, max_audio_ms=8000)
            msg = await a.ws.receive(timeout=30)
            while msg.type != aiohttp.WSMsgType.BINARY:
                msg = await a.ws.receive(timeout=30)
            b = await Stream.connect(s, url, "taken")
            # b presents the state before the reply (no turns): it matched when b connected
            opened = asyncio.create_task(b.request(type="open", turns=0, digest=History().digest({})))
            # socket a: the rest of its chunks, then exactly one `done` for its reply, then close 4000
            dones, frames = [], 1
            while True:
                msg = await a.ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frames += len(msg.data) // 3840
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data["type"] == "done":
                        dones.append(data)
                    else:
                        assert data["type"] == "chunk", data
                else:
                    break
            assert a.ws.close_code == 4000
            (done,) = dones
            assert done["re"] == rid and done["reason"] == "interrupted" and done["error"]["code"] == "superseded"
            assert done["frames"] == frames
            (event,) = done["events"]
            assert event["op"] == "recorded" and event["segment"]["codes"]["frames"] == frames
            # the reply was recorded before b's state was compared: b's copy (no turns) is not the
            # server's any more, so b is asked to restore
            answer = await opened
            assert answer["type"] == "error" and answer["code"] == "unknown_conversation"
            assert (await b.request(type="restore", history=[]))["state"] == "restored"

    run(main())
