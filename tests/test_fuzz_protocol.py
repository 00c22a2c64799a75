"""10,000+ generated protocol inputs against a running server on loopback: WebSocket control
messages (on opened and unopened sockets), binary frames, HTTP bodies, paths and headers.

Every input gets a typed answer: no HTTP 500, no `internal`/`engine_error`, no exception logged,
the server and its inference worker stay up, and a canary conversation on another key keeps its
history, its digest and its audio (the next reply equals a fresh engine's on the same history).
A seeded generator (not hypothesis): the same 10,000 inputs every run, and a failure names the
input's index.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import random
import time

import aiohttp
import numpy as np
import pytest
import torch

from csm_plugin.client import RemoteBackend
from csm_plugin.engine import Engine, Sampling
from test_server_support import AUTH, OTHER_KEY, metric_value, running_server, scrape

pytestmark = pytest.mark.slow  # about a minute on 2 shared cores

SEED = 20_261_130
N_WS_TEXT, N_WS_BINARY, N_HTTP_BODY, N_HTTP_OTHER = 6_000, 1_000, 2_400, 600  # 10,000 in all

# Codes a client mistake may get; never `internal` or `engine_error`.
CLIENT_CODES = {
    "bad_message", "not_open", "text_too_long", "audio_too_long", "history_too_long", "context_too_long",
    "invalid_input", "invalid_audio", "unknown_voice", "unknown_style", "unknown_conversation", "busy", "message_too_big",
}
TERMINAL = {"error", "ready", "added", "interrupted", "closed", "done"}


# --- the generator -----------------------------------------------------------------------------

class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, *items):
        return items[self.r.randrange(len(items))]

    def text(self) -> str:
        r = self.r
        kind = r.randrange(12)
        if kind == 0:
            return ""
        if kind == 1:
            return " \t\n "
        if kind == 2:
            return "x" * r.choice([1999, 2000, 2001, 5000])
        if kind == 3:
            return "".join(chr(r.randrange(0x20, 0x2FFF)) for _ in range(r.randrange(1, 40)))
        if kind == 4:
            return "Hi \x00 there\x1b[0m"
        if kind == 5:
            return "ok \U0001F600 " * r.randrange(1, 5)
        return r.choice(["Hello.", "Sure, one moment.", "What?", "Thanks, bye.", "A"]) 

    def number(self):
        return self.pick(0, 1, -1, 7, 2**31 - 1, 2**31, 2**62, 2**63, 10**30, -(10**30), 0.5, -0.0, 1e308, 80, 79.9,
                         True, None, "5", [], {})

    def any_json(self, depth: int = 0):
        r = self.r
        kind = r.randrange(8 if depth < 3 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return self.number()
        if kind in (3, 4):
            return self.text()
        if kind == 5:
            return [self.any_json(depth + 1) for _ in range(r.randrange(4))]
        return {self.text()[:10]: self.any_json(depth + 1) for _ in range(r.randrange(4))}

    def b64(self, n: int) -> str:
        return base64.b64encode(self.r.randbytes(n)).decode()

    def codes(self):
        r = self.r
        frames = r.choice([1, 2, 3, 0, -1, 10**6])
        valid = np.array([r.randrange(2048) for _ in range(max(0, min(frames, 3)) * 32)], dtype="<u2")
        kind = r.randrange(6)
        if kind == 0:
            data = base64.b64encode(valid.tobytes()).decode()
        elif kind == 1:
            data = self.b64(r.randrange(0, 200))
        elif kind == 2:
            data = "%%%not base64%%%"
        elif kind == 3:
            data = base64.b64encode(np.full(max(1, frames if 0 < frames < 4 else 1) * 32, 65535, "<u2").tobytes()).decode()
        else:
            data = base64.b64encode(valid.tobytes()).decode()
            frames = max(1, min(frames, 3)) if frames > 0 else frames
        return {"frames": frames, "data": data}

    def audio(self):
        r = self.r
        rate = r.choice([16000, 24000, 8000, 7999, 192001, 0, -16000, 44100])
        fmt = r.choice(["s16le", "f32le", "mp3", None])
        seconds = r.choice([0.0, 0.01, 0.2, 0.5, 61.0])
        width = 4 if fmt == "f32le" else 2
        n = int(abs(rate) * seconds) * width if seconds < 60 else 100
        if fmt == "f32le" and r.random() < 0.5:
            data = base64.b64encode(np.full(n // 4, np.nan if r.random() < 0.5 else 0.1, "<f4").tobytes()).decode()
        elif seconds > 60:
            data = "A" * int(16000 * 2 * 4 / 3 * 62)  # longer than the limit, before decoding
        else:
            data = self.b64(min(n, 64_000)) + r.choice(["", "", "=", "x"])
        audio = {"sample_rate": rate, "data": data}
        if fmt is not None:
            audio["format"] = fmt
        return audio

    def segment(self):
        seg = {"speaker": self.pick(0, 1, 9999, 10000, -1), "text": self.text(), "origin": self.pick("user", "agent", "voice", "x")}
        if self.r.random() < 0.5:
            seg["codes"] = self.codes()
        return seg

    def valid_like(self) -> dict:
        """A message of every kind, mostly near valid."""
        r = self.r
        kind = r.choice(["open", "open", "restore", "add_segment", "add_segment", "speak", "speak", "interrupt", "close"])
        msg: dict = {"type": kind}
        if r.random() < 0.8:
            msg["id"] = r.choice([r.randrange(1, 10**6), 0, -5, 2**70, "7", None])
        if kind == "open":
            if r.random() < 0.3:
                msg["voices"] = r.choice([{"0": "nobody"}, {"x": "a"}, {"1234567": "a"}, {"0": 5}, []])
            if r.random() < 0.3:
                msg["turns"] = self.number()
            if r.random() < 0.3:
                msg["digest"] = r.choice(["0" * 32, "x" * 200, 5])
        elif kind == "restore":
            msg["history"] = [self.segment() for _ in range(r.choice([0, 1, 3, 1001]) if r.random() < 0.02 else r.randrange(3))]
        elif kind == "add_segment":
            msg.update(speaker=self.pick(1, 0, -1, 10**6, "1"), text=self.text())
            x = r.random()
            if x < 0.4:
                msg["audio"] = self.audio()
            elif x < 0.7:
                msg["codes"] = self.codes()
        elif kind == "speak":
            msg["text"] = self.text()
            for field in ("speaker", "temperature", "top_k", "seed", "max_audio_ms", "chunk_frames"):
                if r.random() < 0.25:
                    msg[field] = self.number()
        elif kind == "interrupt":
            if r.random() < 0.5:
                msg["played_ms"] = self.number()
            if r.random() < 0.3:
                msg["replies"] = self.number()
        return msg

    def mutate(self, msg: dict) -> dict:
        r = self.r
        msg = dict(msg)
        for _ in range(r.randrange(3)):
            op = r.randrange(4)
            keys = list(msg)
            if op == 0 and keys:
                msg.pop(r.choice(keys))
            elif op == 1:
                msg[r.choice(["bogus", "extra", "audio", "codes", "history", "text"])] = self.any_json()
            elif op == 2 and keys:
                msg[r.choice(keys)] = self.any_json()
            else:
                msg["type"] = r.choice(["speak", "open", "", "SPEAK", None, 7, "bogus"])
        return msg

    def ws_text(self) -> str:
        r = self.r
        x = r.random()
        if x < 0.55:
            return json.dumps(self.valid_like())
        if x < 0.85:
            return json.dumps(self.mutate(self.valid_like()))
        special = r.randrange(10)
        if special == 0:
            depth = r.choice([50, 1000, 100_000])
            return "[" * depth + "]" * depth
        if special == 1:
            return '{"type": "speak", "id": 3, "text": "' + r.choice(["\\ud800", "\\udfff x", "\\ud83d"]) + '"}'
        if special == 2:
            return json.dumps(self.valid_like())[: r.randrange(1, 20)]
        if special == 3:
            return r.choice(['{"type": "speak", "text": "hi", "temperature": NaN}', '{"type": "speak", "text": "hi", "top_k": Infinity}',
                             '{"type": "open", "type": "speak", "text": "x"}', "null", "[]", "42", '"open"', ""])
        if special == 4:
            return "".join(chr(r.randrange(1, 0xD7FF)) for _ in range(r.randrange(1, 100)))
        if special == 5:
            return json.dumps({"type": "speak", "text": "deep", "seed": json.loads("[" * 200 + "]" * 200)})
        return json.dumps(self.any_json())

    def http_body(self) -> bytes:
        r = self.r
        x = r.random()
        if x < 0.6:
            body: dict = {"text": self.text()}
            for field in ("speaker", "temperature", "top_k", "seed", "max_audio_ms", "chunk_frames"):
                if r.random() < 0.2:
                    body[field] = self.number()
            if r.random() < 0.4:
                body["context"] = [self.segment() | ({"audio": self.audio()} if r.random() < 0.3 else {}) for _ in range(r.randrange(3))]
            if r.random() < 0.5:
                body = self.mutate(body)
                body.pop("type", None) if r.random() < 0.5 else None
            return json.dumps(body).encode()
        if x < 0.7:
            return r.randbytes(r.randrange(0, 300))
        if x < 0.8:
            depth = r.choice([10, 5000, 100_000])
            return ("[" * depth + "]" * depth).encode()
        if x < 0.9:
            return b'{"text": "' + r.choice([b"\\ud800", b"\xff\xfe", b"\xc3\x28"]) + b'"}'
        return json.dumps(self.any_json()).encode()


# --- the run -----------------------------------------------------------------------------------

class Sock:
    answers: collections.Counter = collections.Counter()  # what the inputs got, for the summary

    def __init__(self, session, url, name):
        self.session, self.url, self.name, self.ws = session, url, name, None

    async def ensure(self):
        if self.ws is None or self.ws.closed:
            self.ws = await self.session.ws_connect(f"{self.url}/v1/conversations/{self.name}/stream", headers=AUTH)

    async def exchange(self, kind: str, payload, index: int) -> list[dict]:
        """Send one input; read up to its terminal answer. Every answer is checked here."""
        await self.ensure()
        ws = self.ws
        if kind == "text":
            await ws.send_str(payload)
        else:
            await ws.send_bytes(payload)
        seen = []
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                assert seen and seen[-1]["type"] == "closed" or ws.close_code == 1009, (index, payload[:200], ws.close_code, seen)
                self.ws = None
                return seen
            assert msg.type == aiohttp.WSMsgType.TEXT, (index, msg)
            data = json.loads(msg.data)
            seen.append(data)
            Sock.answers[data["type"] if data["type"] != "error" else "error:" + data["code"]] += 1
            if data["type"] == "error":
                assert data["code"] in CLIENT_CODES, (index, payload[:300], data)
            if data["type"] == "done":
                error = data.get("error")
                assert error is None or error["code"] in CLIENT_CODES, (index, payload[:300], data)
            if data["type"] in TERMINAL and data["type"] != "closed":
                if data["type"] == "interrupted" and data.get("speaking"):
                    continue  # its reply's `done` follows
                if data["type"] == "error" and data.get("code") == "busy" and any(d["type"] == "chunk" for d in seen):
                    continue
                return seen


async def _canary_turn(conv, text: str, seed: int) -> np.ndarray:
    chunks = [c async for c in conv.speak(text, seed=seed, max_audio_ms=240)]
    return np.concatenate([c.pcm for c in chunks if c.num_frames])


def test_ten_thousand_generated_inputs_and_the_canary_is_unchanged(hf_checkpoint, caplog):
    caplog.set_level(logging.WARNING)
    reference = Engine.load(hf_checkpoint)
    gen = Gen(SEED)
    ws_inputs = [("text", gen.ws_text()) for _ in range(N_WS_TEXT)] + [("binary", gen.r.randbytes(gen.r.randrange(0, 400)))
                                                                      for _ in range(N_WS_BINARY)]
    gen.r.shuffle(ws_inputs)
    http_bodies = [gen.http_body() for _ in range(N_HTTP_BODY)]
    total = len(ws_inputs) + len(http_bodies) + N_HTTP_OTHER
    assert total >= 10_000

    async def main():
        async with running_server(hf_checkpoint, max_reply_ms=80.0, auth_failures_per_minute=10**6,
                                  max_message_bytes=1024 * 1024) as (url, state), aiohttp.ClientSession() as s:
            # the canary, on another key: one turn each way before the storm
            canary_backend = await RemoteBackend(url, api_key=OTHER_KEY).start()
            canary = canary_backend.conversation("canary")
            t = np.arange(8000) / 16000
            await canary.add_segment(1, "Canary speaking.", audio=(0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sample_rate=16000)
            await _canary_turn(canary, "Still singing.", 1)
            digest_before, history_before = canary.digest(), canary.history
            canary_state = state.sessions.get(state.keys.authenticate(f"Bearer {OTHER_KEY}").key_id, "canary")

            started = time.perf_counter()
            socks = [Sock(s, url, f"fuzz-{i}") for i in range(4)]
            for i, (kind, payload) in enumerate(ws_inputs):
                await socks[i % 4].exchange(kind, payload, i)
            statuses = collections.Counter()
            for i, body in enumerate(http_bodies):
                headers = {**AUTH, "Content-Type": gen.pick("application/json", "text/plain", "application/octet-stream")}
                async with s.post(url + "/v1/speech", data=body, headers=headers) as r:
                    statuses[r.status] += 1
                    assert r.status != 500 and r.status in (200, 400, 413), (i, body[:200], r.status, await r.text())
                    if r.status != 200:
                        assert (await r.json())["error"]["code"] in CLIENT_CODES, (i, body[:200])
            for i in range(N_HTTP_OTHER):
                method, path, headers = _other_http(gen, i)
                async with s.request(method, url + path, headers=headers, data=gen.r.randbytes(gen.r.randrange(0, 50))) as r:
                    statuses[r.status] += 1
                    assert r.status < 500 or r.status == 503 and path.endswith("/stream"), (i, method, path, r.status, await r.text())
            elapsed = time.perf_counter() - started
            print(f"{total} inputs in {elapsed:.1f} s; WebSocket answers: {dict(Sock.answers.most_common())}; "
                  f"HTTP statuses: {dict(statuses.most_common())}")

            # nothing crashed, nothing answered 500, nothing logged as an error
            assert state.ready and state.service.alive
            text = await scrape(s, url)
            assert metric_value(text, "csm_errors_total", {"code": "internal"}) == 0
            assert metric_value(text, "csm_errors_total", {"code": "engine_error"}) == 0
            assert not [f for f in text.splitlines() if f.startswith("csm_http_requests_total") and 'status="500"' in f]
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not errors, [r.getMessage()[:300] for r in errors[:5]]
            # the canary: the same history and digest on both sides, and its next reply is what a
            # fresh engine says on that history
            assert canary.digest() == digest_before == canary_state.digest()
            assert _same(canary.history, history_before) and _same(canary_state.conv.history, history_before)
            before = canary.history
            await _canary_turn(canary, "And still singing after the storm.", 7)
            expected = torch.stack([f.codes for f in reference.synthesize(list(before), 0, "And still singing after the storm.",
                                                                         Sampling(seed=7, max_audio_ms=80))])  # max_reply_ms
            assert canary.history[-1].codes.shape[0] == 1
            assert np.array_equal(canary.history[-1].codes, expected.numpy().astype(np.uint16))
            assert _same(canary.history, canary_state.conv.history)
            await canary_backend.close()

    run(main())


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.speaker == y.speaker and x.text == y.text and (x.codes is None) == (y.codes is None)
        and (x.codes is None or np.array_equal(x.codes, y.codes)) for x, y in zip(a, b)
    )


def _other_http(gen: Gen, i: int):
    r = gen.r
    method = r.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    path = r.choice(["/v1/info", "/healthz", "/readyz", "/metrics", "/v1/speech", "/v1/conversations/ok/stream",
                     "/v1/conversations/%0A/stream", "/v1/conversations/" + "a" * 200 + "/stream",
                     "/v1/conversations/-x/stream", "/../etc/passwd", "/v1/" + "%ff" * 5, "/nothing"])
    headers = r.choice([AUTH, {}, {"Authorization": "Bearer " + "x" * 5000}, {"Authorization": "Basic abc"},
                        {**AUTH, "Content-Type": "application/json"}, {"Authorization": "Bearer wrong-0123456789abcdef"}])
    return method, path, headers


def run(coro):
    return asyncio.run(coro)
