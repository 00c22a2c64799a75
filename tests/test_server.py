"""The server in-process on loopback: auth, the stream protocol, limits, fuzzed and oversized
messages, disconnects, the WAV endpoint, metrics, configuration."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave

import aiohttp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csm_plugin.cli import build_parser
from csm_plugin.server.config import ConfigError, ServerConfig
from csm_plugin.conversation.history import History
from csm_plugin.conversation.protocol import encode_codes
from test_server_support import AUTH, KEY, OTHER_KEY, Stream, metric_value, poll, running_server, scrape

KNOWN_CODES = {
    "bad_message", "not_open", "text_too_long", "audio_too_long", "invalid_input", "invalid_audio",
    "unknown_voice", "unknown_style", "busy", "history_too_long", "context_too_long",
}


def run(coro):
    return asyncio.run(coro)


def pcm16(seconds: float, rate: int = 16_000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    return base64.b64encode((8000 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()).decode()


def test_no_key_or_wrong_key_is_401_and_nothing_is_generated(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": "Bearer"}):
                async with s.get(url + "/v1/info", headers=headers) as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                async with s.post(url + "/v1/speech", headers=headers, json={"text": "Hello there."}) as r:
                    assert r.status == 401
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(url + "/v1/conversations/c1/stream", headers=headers)
                assert e.value.status == 401
            text = await scrape(s, url)
            assert metric_value(text, "csm_errors_total", {"code": "unauthorized"}) == 12
            assert metric_value(text, "csm_audio_seconds_total") == 0
            assert len(state.sessions) == 0 and state.active_streams == 0
            async with s.get(url + "/v1/info", headers=AUTH) as r:  # the right key works
                assert r.status == 200 and (await r.json())["sample_rate"] == 24_000

    run(main())


def test_stream_protocol_round_trip(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            c = await Stream.connect(s, url)
            assert (await c.request(type="speak", text="Too early."))["code"] == "not_open"
            ready = await c.request(type="open")
            assert ready["type"] == "ready" and ready["state"] == "created" and ready["turns"] == 0
            added = await c.request(type="add_segment", speaker=1, text="Hi, my parcel is late.",
                                    audio={"sample_rate": 16_000, "data": pcm16(1.0)})
            assert added["type"] == "added" and added["turns"] == 1
            assert [e["op"] for e in added["events"]] == ["recorded"] and added["events"][0]["segment"]["codes"]["frames"] == 13
            headers, pcm, done = await c.reply(text="Sorry to hear that.", seed=1, max_audio_ms=480)
            assert done["reason"] == "completed" and done["error"] is None and done["turns"] == 2
            assert done["frames"] == len(pcm) == len(headers) == 6 and all(len(p) == 2 * 1920 for p in pcm)
            assert [h["start_ms"] for h in headers] == [80 * i for i in range(6)]
            session = state.sessions.get(state.keys.authenticate(AUTH["Authorization"]).key_id, "c1")
            recorded = session.conv.history[-1]
            (event,) = done["events"]
            assert event["op"] == "recorded" and event["segment"]["codes"] == encode_codes(recorded.codes)
            assert event["segment"]["origin"] == "agent"
            # barge-in after the reply: trimmed to the frames played, on both sides
            trimmed = await c.request(type="interrupt", played_ms=170)
            (event,) = trimmed["events"]
            assert event["op"] == "trimmed" and event["index"] == 1
            assert event["segment"]["codes"]["frames"] == 3 and event["segment"]["text"] == "Sorry"
            assert session.conv.history[-1].codes.shape[0] == 3
            # the same stream goes on with another turn; chunk_frames groups frames
            headers, pcm, done = await c.reply(text="Let me check.", seed=2, max_audio_ms=480, chunk_frames=2)
            assert done["frames"] == 6 and len(pcm) == 3 and done["turns"] == 3
            closed = await c.request(type="close")
            assert closed["type"] == "closed"
            assert (await c.ws.receive()).type == aiohttp.WSMsgType.CLOSE
            assert len(state.sessions) == 0

    run(main())


def test_reconnect_resumes_or_asks_for_a_restore(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            c = await Stream.connect(s, url)
            await c.request(type="open")
            added = await c.request(type="add_segment", speaker=1, text="Hello.")
            await c.ws.close()
            segment = added["events"][0]["segment"]
            turns = [(_segment(segment), "user")]
            # same state: resumed; a different digest: the server drops its copy and says so
            c = await Stream.connect(s, url)
            resumed = await c.request(type="open", turns=1, digest=history_digest({}, turns))
            assert resumed["state"] == "resumed" and resumed["turns"] == 1
            await c.ws.close()
            c = await Stream.connect(s, url)
            stale = await c.request(type="open", turns=1, digest="0" * 32)
            assert stale["type"] == "error" and stale["code"] == "unknown_conversation"
            restored = await c.request(type="restore", history=[segment, {"speaker": 0, "text": "Hi!", "origin": "agent"}])
            assert restored["state"] == "restored" and restored["turns"] == 2
            # another key never sees this key's conversation
            other = await Stream.connect(s, url, headers={"Authorization": f"Bearer {OTHER_KEY}"})
            unknown = await other.request(type="open", turns=2, digest=history_digest({}, turns))
            assert unknown["code"] == "unknown_conversation"
            # a second socket for the same conversation takes it over
            c2 = await Stream.connect(s, url)
            assert (await c2.request(type="open", turns=2, digest=state.sessions.sessions()[0].digest()))["state"] == "resumed"
            assert (await c.ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE and c.ws.close_code == 4000

    run(main())


def history_digest(voices, turns) -> str:
    history = History()
    for segment, origin in turns:
        history.record(segment, origin)
    return history.digest(voices)


def _segment(data):
    from csm_plugin.conversation.protocol import segment_in

    return segment_in(data)[0]


def test_limits_have_clear_errors(hf_checkpoint):
    async def main():
        async with running_server(
            hf_checkpoint, max_text_chars=50, max_audio_seconds=1.0, max_streams_per_key=1, max_conversations_per_key=2,
            max_history_segments=2, max_queued_per_key=0,
        ) as (url, state), aiohttp.ClientSession() as s:
            a = await Stream.connect(s, url, "a")
            await a.request(type="open")
            err = await a.request(type="speak", text="x" * 51)
            assert err["code"] == "text_too_long" and "at most 50" in err["message"]
            err = await a.request(type="add_segment", speaker=1, text="hi", audio={"sample_rate": 16_000, "data": pcm16(1.5)})
            assert err["code"] == "audio_too_long"
            err = await a.request(type="add_segment", speaker=1, text="hi", audio={"sample_rate": 16_000, "data": "%%%"})
            assert err["code"] == "bad_message" and "base64" in err["message"]
            err = await a.request(type="add_segment", speaker=1, text="hi", audio={"sample_rate": 3, "data": pcm16(0.001)})
            assert err["code"] == "invalid_audio"
            err = await a.request(type="add_segment", speaker=1, text="hi", codes={"frames": 2, "data": base64.b64encode(b"\xff" * 128).decode()})
            assert err["code"] == "bad_message" and "below" in err["message"]
            err = await a.request(type="speak", text="Hello.", temperature=-1)  # refused before it starts
            assert err["type"] == "error" and err["code"] == "bad_message" and "temperature" in err["message"]
            err = await a.request(type="restore", history=[{"speaker": 1, "text": "a"}] * 3)
            assert err["code"] == "history_too_long"
            err = await a.request(type="open", voices={"0": "nobody"})
            assert err["code"] in ("unknown_voice", "bad_message")
            # one reply at a time per key and no queue for it: b's speak is refused with busy and a
            # retry-after hint while a's runs
            b = await Stream.connect(s, url, "b")
            await b.request(type="open")
            await a.send(type="speak", text="A long enough reply to overlap.", seed=1, max_audio_ms=4000)
            await poll(lambda: state.active_streams == 1)
            err = await b.request(type="speak", text="Me too.")
            assert err["code"] == "busy" and err["retry_after_s"] >= 1
            err = await a.request(type="add_segment", speaker=1, text="Wait.")
            assert err["code"] == "busy"
            # open conversations per key
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(url + "/v1/conversations/c/stream", headers=AUTH)
            assert e.value.status == 429
            await a.send(type="interrupt")
            while (await a.json())["type"] != "done":
                pass

    run(main())


# --- fuzzing ------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(["text", "speaker", "seed", "temperature", "top_k", "played_ms", "audio", "codes", "history",
                           "voices", "max_audio_ms", "chunk_frames", "id", "sample_rate", "data"])
# Never open/restore/close: on a socket that is not open every message must be answered with an error.
_typed = st.fixed_dictionaries(
    {"type": st.sampled_from(["speak", "add_segment", "interrupt", "bogus", "", 7, None])},
    optional={"id": st.integers(-5, 2**40)},
).flatmap(lambda base: st.dictionaries(_fields, _json, max_size=4).map(lambda extra: {**extra, **base}))
_messages = st.one_of(
    st.text(max_size=200).map(lambda t: ("text", t)),
    _json.map(lambda j: ("text", json.dumps(j))),
    _typed.map(lambda d: ("text", json.dumps(d))),
    st.binary(max_size=300).map(lambda b: ("binary", b)),
)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(_messages, min_size=15, max_size=40))
def test_fuzzed_messages_get_errors_and_other_streams_keep_going(hf_checkpoint, messages):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            talker = await Stream.connect(s, url, "talker")
            await talker.request(type="open")
            first = asyncio.Event()
            await talker.send(type="speak", text="Keep talking while the other socket misbehaves.", seed=3, max_audio_ms=1600)
            reply = asyncio.create_task(talker.reply(first_chunk=first))
            await asyncio.wait_for(first.wait(), 30)
            fuzz = await Stream.connect(s, url, "fuzz")
            for kind, payload in messages:
                await (fuzz.ws.send_str(payload) if kind == "text" else fuzz.ws.send_bytes(payload))
                answer = await fuzz.json()
                assert answer["type"] == "error" and answer["code"] in KNOWN_CODES, answer
            headers, pcm, done = await reply
            assert done["reason"] == "completed" and done["frames"] == len(pcm) == 20
            # the fuzzed socket still works
            assert (await fuzz.request(type="open"))["type"] == "ready"
            _, pcm, done = await fuzz.reply(text="Still fine.", seed=4, max_audio_ms=240)
            assert done["frames"] == len(pcm) == 3

    run(main())


def test_oversized_message_closes_only_its_stream(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, max_message_bytes=64 * 1024) as (url, state), aiohttp.ClientSession() as s:
            talker = await Stream.connect(s, url, "talker")
            await talker.request(type="open")
            first = asyncio.Event()
            await talker.send(type="speak", text="Keep talking while the other one shouts.", seed=3, max_audio_ms=1200)
            reply = asyncio.create_task(talker.reply(first_chunk=first))
            await asyncio.wait_for(first.wait(), 30)
            big = await Stream.connect(s, url, "big")
            await big.ws.send_str(json.dumps({"type": "add_segment", "speaker": 1, "text": "x", "audio": {"sample_rate": 16000, "data": "A" * 100_000}}))
            msg = await big.ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and big.ws.close_code == 1009  # "message too big"
            _, pcm, done = await reply
            assert done["reason"] == "completed" and done["frames"] == len(pcm) == 15
            assert metric_value(await scrape(s, url), "csm_errors_total", {"code": "message_too_big"}) == 1
            async with s.post(url + "/v1/speech", headers=AUTH, data=b"{" + b" " * 100_000 + b"}") as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "message_too_big"

    run(main())


# --- disconnects --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["close", "abort"])
def test_disconnect_mid_reply_stops_the_stream(hf_checkpoint, how):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            c = await Stream.connect(s, url, "leaver")
            await c.request(type="open")
            await c.send(type="speak", text="This reply is long and nobody will hear the end of it.", seed=5, max_audio_ms=8000)
            while (await c.ws.receive(timeout=30)).type != aiohttp.WSMsgType.BINARY:
                pass
            assert metric_value(await scrape(s, url), "csm_active_streams") == 1
            if how == "close":
                await c.ws.close()
            else:
                c.ws._response.connection.transport.abort()

            async def stopped():
                return metric_value(await scrape(s, url), "csm_active_streams") == 0

            elapsed = await poll(stopped, timeout=10)
            print(f"active streams back to 0 {1000 * elapsed:.0f} ms after the client left ({how})")
            text = await scrape(s, url)
            assert metric_value(text, "csm_streams_total", {"outcome": "cancelled"}) == 1
            assert metric_value(text, "csm_audio_seconds_total") < 8.0  # far from the whole reply
            await poll(lambda: not state.service._worker._streams, timeout=10)  # the engine stopped too

    run(main())


# --- HTTP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("compile", [False, "graphs"])
def test_wav_endpoint(hf_checkpoint, compile):
    """Also from a server with fixed shapes and GraphedSteps (CSM_COMPILE=graphs)."""
    async def main():
        async with running_server(hf_checkpoint, compile=compile) as (url, state), aiohttp.ClientSession() as s:
            assert state.service.engine.generator.mode == {False: "eager", "graphs": "graphs"}[compile]
            codes = encode_codes(torch.randint(0, 2048, (4, 32)))
            body = {"text": "Here you go.", "seed": 1, "max_audio_ms": 400,
                    "context": [{"speaker": 1, "text": "Can I have it?", "audio": {"sample_rate": 16000, "data": pcm16(0.5)}},
                                {"speaker": 0, "text": "Sure.", "origin": "agent", "codes": codes}]}
            async with s.post(url + "/v1/speech", headers=AUTH, json=body) as r:
                assert r.status == 200 and r.content_type == "audio/wav" and r.headers["X-CSM-Frames"] == "5"
                with wave.open(io.BytesIO(await r.read())) as w:
                    assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24_000, 1, 2, 5 * 1920)
            for bad, code in (({"text": ""}, "invalid_input"), ({"txt": "hi"}, "bad_message"), ({"text": 5}, "bad_message")):
                async with s.post(url + "/v1/speech", headers=AUTH, json=bad) as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == code
            async with s.post(url + "/v1/speech", headers=AUTH, data=b"not json") as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "bad_message"
            assert len(state.sessions) == 0 and not state.service._conversations  # nothing left behind

    run(main())


def test_health_readiness_and_metrics(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint) as (url, state), aiohttp.ClientSession() as s:
            async with s.get(url + "/healthz") as r:
                assert r.status == 200
            async with s.get(url + "/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"]
            c = await Stream.connect(s, url)
            await c.request(type="open")
            await c.reply(text="Measure me.", seed=1, max_audio_ms=400)
            text = await scrape(s, url)
            for name in ("csm_time_to_first_audio_seconds_count", "csm_frame_interval_seconds_count", "csm_real_time_factor_count"):
                assert metric_value(text, name) >= 1, name
            assert metric_value(text, "csm_streams_total", {"outcome": "completed"}) == 1
            assert metric_value(text, "csm_open_connections") == 1 and metric_value(text, "csm_ready") == 1
            state.draining = True
            async with s.get(url + "/readyz") as r:
                assert r.status == 503
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(url + "/v1/conversations/late/stream", headers=AUTH)
            assert e.value.status == 503
            assert (await c.request(type="speak", text="More?"))["code"] == "draining"

    run(main())


# --- configuration ------------------------------------------------------------------------------

def test_config_sources_and_safety(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\n" + KEY + "\n\n")
    env = {"CSM_API_KEYS_FILE": str(keys), "CSM_PORT": "9000", "CSM_LIMIT_MAX_TEXT_CHARS": "77"}
    config = ServerConfig.load(environ=env)
    assert config.host == "127.0.0.1" and config.binds_loopback_only and config.port == 9000
    assert config.keys() == [KEY] and config.limits.max_text_chars == 77
    file = tmp_path / "server.json"
    file.write_text(json.dumps({"port": 9100, "limits": {"max_streams_per_key": 3}}))
    config = ServerConfig.load(file, environ={"CSM_API_KEYS": f"{KEY},{OTHER_KEY}"}, port=9200)
    assert config.port == 9200 and config.limits.max_streams_per_key == 3 and config.keys() == [KEY, OTHER_KEY]
    with pytest.raises(ConfigError, match="no API keys"):
        ServerConfig.load(environ={}).keys()
    with pytest.raises(ConfigError, match="at least 16"):
        ServerConfig.load(environ={"CSM_API_KEYS": "short"}).keys()
    with pytest.raises(ConfigError):
        ServerConfig.load(environ={}, max_text_chars=0)
    assert ServerConfig.load(environ={}, allow_no_auth=True).keys() == []
    assert not ServerConfig.load(environ={}, host="0.0.0.0").binds_loopback_only
    speed = ServerConfig.load(environ={"CSM_QUANTIZE": "int8", "CSM_COMPILE": "true"})
    assert speed.quantize == "int8" and speed.compile is True
    assert ServerConfig.load(environ={}).compile is None  # the service's default: "graphs" on a GPU, False on a CPU
    assert ServerConfig.load(environ={"CSM_COMPILE": "false"}).compile is False
    assert ServerConfig.load(environ={"CSM_COMPILE": "graphs"}).compile == "graphs"
    assert build_parser().parse_args(["serve", "--compile", "graphs"]).compile == "graphs"
    with pytest.raises(ConfigError, match="compile"):
        ServerConfig.load(environ={"CSM_COMPILE": "fast"})
    with pytest.raises(ConfigError, match="quantize"):
        ServerConfig.load(environ={"CSM_QUANTIZE": "int4"})
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "0", "--no-auth", "--compile", "--quantize", "int8"])
    assert args.func.__name__ == "cmd_serve" and args.host is None and args.no_auth and args.compile and args.quantize == "int8"


# --- voices and styles ----------------------------------------------------------------------------

def test_speech_with_voices_and_styles_from_a_voices_file(hf_checkpoint, tmp_path):
    from test_voices import example_copy, tone

    prompts = example_copy(tmp_path)
    legacy = tone(tmp_path / "legacy.wav", seconds=1.5)

    async def main():
        async with running_server(
            hf_checkpoint, voices_file=[prompts], voices=[{"name": "agent", "text": "Hello, I am the agent.", "audio": str(legacy)}],
        ) as (url, state), aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/info", headers=AUTH) as r:
                info = await r.json()
            assert info["voices"] == ["agent", "caller", "maya"]  # the config's list and the file's, one loader
            assert info["styles"] == ["casual", "comforting", "formal", "motivating"]

            async def wav(**fields):
                async with s.post(url + "/v1/speech", headers=AUTH, json={"text": "Sure, I can help.", "seed": 4,
                                                                            "max_audio_ms": 400, **fields}) as r:
                    assert r.status == 200, await r.text()
                    with wave.open(io.BytesIO(await r.read())) as w:
                        return np.frombuffer(w.readframes(w.getnframes()), "<i2")

            plain, maya, styled = await wav(), await wav(voice="maya"), await wav(style="comforting")
            assert len(plain) == len(maya) == len(styled) == 5 * 1920
            assert not np.array_equal(plain, maya) and not np.array_equal(plain, styled)  # both condition the reply
            assert np.array_equal(await wav(voice="maya"), maya)  # the same seed and voice: the same audio
            assert np.array_equal(await wav(text="[comforting] Sure, I can help."), styled)  # a tag is style=
            assert np.array_equal(await wav(text="[grumpy] Sure, I can help."), plain)  # an unknown tag is dropped
            assert not np.array_equal(await wav(voice="agent"), maya)
            for bad, status, code, says in (
                ({"voice": "nobody"}, 400, "unknown_voice", "unknown voice 'nobody'; this server has voices ['agent', 'caller', 'maya']"),
                ({"voice": 5}, 400, "bad_message", "voice: expected the name of a voice"),
                ({"style": "grumpy"}, 400, "unknown_style", "unknown style 'grumpy'; this server has styles ['casual'"),
                ({"style": "no such"}, 400, "bad_message", "style name must be"),
                ({"voices": {"0": "maya"}}, 400, "bad_message", "unknown speak option"),
            ):
                async with s.post(url + "/v1/speech", headers=AUTH, json={"text": "Hi.", **bad}) as r:
                    error = (await r.json())["error"]
                    assert r.status == status and error["code"] == code and says in error["message"], (bad, error)
            assert len(state.sessions) == 0 and not state.service._conversations  # nothing left behind
            assert metric_value(await scrape(s, url), "csm_streams_total", {"outcome": "completed"}) == 7
            # the remote client sends the same fields
            from csm_plugin.client import RemoteBackend, RemoteInputError

            async with RemoteBackend(url, KEY) as backend:
                assert backend.info["styles"] == info["styles"]
                data = await backend.speech("Sure, I can help.", seed=4, max_audio_ms=400, voice="maya")
                with wave.open(io.BytesIO(data)) as w:
                    assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), maya)
                data = await backend.speech("Sure, I can help.", seed=4, max_audio_ms=400, style="comforting")
                with wave.open(io.BytesIO(data)) as w:
                    assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), styled)
                with pytest.raises(RemoteInputError, match="unknown voice 'nobody'"):
                    await backend.speech("Hi.", voice="nobody")
            # the WebSocket path: the same voices pinned at open, the same styles as a speak option
            c = await Stream.connect(s, url)
            ready = await c.request(type="open", voices={"0": "maya"})
            assert ready["type"] == "ready" and [v["text"] for v in ready["voices"]] == [json.loads(prompts.read_text())["voices"]["maya"]["text"]]
            _, pcm, done = await c.reply(text="Sure, I can help.", seed=4, max_audio_ms=400)
            assert done["reason"] == "completed" and np.array_equal(np.frombuffer(b"".join(pcm), "<i2"), maya)
            c = await Stream.connect(s, url, "styled")
            await c.request(type="open")
            _, pcm, done = await c.reply(text="Sure, I can help.", seed=4, max_audio_ms=400, style="comforting")
            assert done["reason"] == "completed" and np.array_equal(np.frombuffer(b"".join(pcm), "<i2"), styled)
            err = await c.request(type="speak", text="Hi.", style="grumpy")  # refused before it waits for a place
            assert err["type"] == "error" and err["code"] == "unknown_style" and "unknown style 'grumpy'" in err["message"]
            _, pcm, done = await c.reply(text="Sure, I can help.", seed=4, max_audio_ms=400, style="comforting")
            assert done["reason"] == "completed"  # and the conversation goes on

    run(main())


def test_voices_config_through_the_voices_loader(tmp_path):
    from test_voices import example_copy, tone

    prompts = example_copy(tmp_path)
    tone(tmp_path / "a.wav")
    config = ServerConfig.load(environ={"CSM_VOICES_FILE": f"{prompts}:{prompts.parent / 'more.json'}"})
    assert config.voices_file == [prompts, prompts.parent / "more.json"]
    assert ServerConfig.load(environ={}, voices_file=str(prompts)).voices_file == [prompts]
    file = tmp_path / "server.json"
    file.write_text(json.dumps({"voices_file": str(prompts), "voices": [{"name": "a", "text": "Hi.", "audio": str(tmp_path / "a.wav")}]}))
    config = ServerConfig.load(file, environ={})
    loaded = config.prompts()
    assert sorted(loaded.voices) == ["a", "caller", "maya"] and len(loaded.styles) == 4
    assert loaded.voices["a"].path == tmp_path / "a.wav"
    from csm_plugin.server.app import ServerState
    from csm_plugin.voices import VoicesFileError

    speak_tags = ServerConfig.load(environ={"CSM_UNKNOWN_STYLE_TAGS": "speak"}, allow_no_auth=True)
    assert ServerState(speak_tags).service.unknown_style_tags == "speak"
    assert ServerState(ServerConfig.load(environ={}, allow_no_auth=True)).service.unknown_style_tags == "drop"
    with pytest.raises(ConfigError, match="unknown_style_tags"):
        ServerConfig.load(environ={"CSM_UNKNOWN_STYLE_TAGS": "shout"})

    for voices, says in (
        ([{"name": "a", "text": "Hi.", "audio": str(tmp_path / "gone.wav")}], "the server config's voices: voice 'a': audio .*does not exist"),
        ([{"name": "a b", "text": "Hi.", "audio": str(tmp_path / "a.wav")}], "voice name must be"),
        ([{"name": "a", "text": "Hi.", "audio": str(tmp_path / "a.wav")}] * 2, "voice 'a' is defined twice"),
        ([{"name": "maya", "text": "Hi.", "audio": str(tmp_path / "a.wav")}], "voice 'maya' is defined twice: in the server config's voices and in"),
    ):
        with pytest.raises(VoicesFileError, match=says):
            ServerConfig.load(environ={}, voices=voices, voices_file=[prompts]).prompts()
