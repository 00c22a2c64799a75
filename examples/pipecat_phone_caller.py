"""Plays the caller for pipecat_phone_bot.py over the Twilio Media Streams protocol, in real time.

    python examples/pipecat_phone_caller.py ws://localhost:8765 --wav call.wav

Started together with the bot, it waits (up to --wait seconds, 60 by default) until the bot
listens: the bot loads its model first.

It sends `connected` and `start` (its lines as customParameters, for the bot's scripted
transcriber), then 20 ms `media` messages of 8 kHz mu-law without a break, as a phone line does:
a voiced stretch for each line (a buzz shaped like syllables; no speech model needed), then
silence while it listens to the bot's reply. After the last reply it sends `stop` and hangs up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import wave
from dataclasses import dataclass, field

import numpy as np

try:
    import websockets
except ImportError as e:
    print(f"error: the caller needs websockets ({e}). Install it with: pip install websockets "
          '(it comes with "csm-plugin[pipecat]")', file=sys.stderr)
    sys.exit(2)

RATE, CHUNK = 8000, 160  # 8 kHz, 20 ms
LINES = ["Hi, my parcel never arrived.", "It was a blue jacket.", "Great, thanks. Bye!"]


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 -> G.711 mu-law bytes."""
    x = np.clip(pcm.astype(np.int32), -32635, 32635)
    sign = np.where(x < 0, 0x80, 0)
    x = np.abs(x) + 0x84
    exponent = np.floor(np.log2(x)).astype(np.int32) - 7
    mantissa = (x >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    x = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -x, x).astype(np.int16)


def voiced(seconds: float, seed: int) -> np.ndarray:
    """A speech-like buzz: a 140 Hz harmonic tone, amplitude-modulated at a syllable rate."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + seed)
    return (0.25 * 32767 * tone / 2.3 * syllables).astype(np.int16)


@dataclass
class CallResult:
    replies: list[float] = field(default_factory=list)  # seconds of bot audio after each line
    greeting_s: float = 0.0
    audio: list[bytes] = field(default_factory=list)  # bot audio, 8 kHz int16

    @property
    def total_s(self) -> float:
        return sum(len(a) for a in self.audio) / 2 / RATE


class BotNotListening(ConnectionError):
    """Nothing answered at the bot's address within the wait."""


async def connect_when_listening(url: str, wait_s: float = 60.0, retry_s: float = 0.25):
    """Open the WebSocket, retrying while nothing listens yet (the bot loads its model before it
    listens, several seconds); says once that it is waiting. BotNotListening after `wait_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    told = False
    while True:
        try:
            return await websockets.connect(url)
        except (OSError, websockets.exceptions.InvalidHandshake) as e:  # refused or reset: the bot is still starting
            if loop.time() >= deadline:
                raise BotNotListening(
                    f"no bot is listening at {url} after {wait_s:g} s ({getattr(e, 'strerror', None) or e}). Start it first: "
                    "python examples/pipecat_phone_bot.py --test-checkpoint"
                ) from None
            if not told:
                print(f"waiting for the bot at {url} (it listens once its model is loaded; up to {wait_s:g} s)...",
                      file=sys.stderr, flush=True)
                told = True
            await asyncio.sleep(retry_s)


async def call(url: str, lines: list[str] = LINES, reply_gap_s: float = 1.5, timeout_s: float = 120,
               wait_s: float = 60.0) -> CallResult:
    """Make one call (waiting up to `wait_s` for the bot to listen); returns how much the bot said
    after each line."""
    result = CallResult()
    stream_sid = "MZ" + "0" * 32
    async with await connect_when_listening(url, wait_s) as ws:
        received = asyncio.Event()
        heard = [0.0]  # seconds of bot audio so far

        async def listen():
            async for message in ws:
                event = json.loads(message)
                if event.get("event") == "media":
                    audio = ulaw_decode(base64.b64decode(event["media"]["payload"]))
                    result.audio.append(audio.tobytes())
                    heard[0] += len(audio) / RATE
                    received.set()

        async def send(pcm: np.ndarray):
            start = asyncio.get_running_loop().time()
            for i in range(0, len(pcm), CHUNK):
                payload = base64.b64encode(ulaw_encode(pcm[i : i + CHUNK])).decode()
                await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}))
                await asyncio.sleep(max(0.0, start + (i + CHUNK) / RATE - asyncio.get_running_loop().time()))

        async def listen_until_quiet() -> float:
            """Send silence (the line stays open) until the bot has spoken and gone quiet."""
            before = heard[0]
            silence = np.zeros(CHUNK, dtype=np.int16)
            quiet = 0.0
            while quiet < reply_gap_s or heard[0] == before:
                seen = heard[0]
                await send(silence)
                quiet = 0.0 if heard[0] != seen else quiet + CHUNK / RATE
            return heard[0] - before

        listener = asyncio.create_task(listen())
        try:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {
                "streamSid": stream_sid,
                "callSid": "CA" + "0" * 32,
                "customParameters": {"script": json.dumps(lines)},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            }
            await ws.send(json.dumps({"event": "start", "streamSid": stream_sid, "start": start}))

            async def conversation():
                result.greeting_s = await listen_until_quiet()
                for n, _line in enumerate(lines):
                    await send(voiced(1.2 + 0.1 * len(_line.split()), seed=n))
                    result.replies.append(await listen_until_quiet())

            await asyncio.wait_for(conversation(), timeout_s)
            await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid}))
        finally:
            listener.cancel()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url", nargs="?", default="ws://localhost:8765")
    p.add_argument("--wav", help="save what the bot said (8 kHz)")
    p.add_argument("--reply-gap", type=float, default=1.5, help="seconds of bot silence that end its reply")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the bot to listen (default 60)")
    args = p.parse_args(argv)
    try:
        result = asyncio.run(call(args.url, reply_gap_s=args.reply_gap, wait_s=args.wait))
    except BotNotListening as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"greeting: {result.greeting_s:.1f} s of bot audio")
    for line, seconds in zip(LINES, result.replies):
        print(f"caller: {line!r} -> bot replied with {seconds:.1f} s of audio")
    if args.wav:
        with wave.open(args.wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(b"".join(result.audio))
    return 0 if result.replies and all(s > 0 for s in result.replies) else 1


if __name__ == "__main__":
    sys.exit(main())
