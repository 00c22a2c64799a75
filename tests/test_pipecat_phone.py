"""The phone example end to end on one machine: examples/pipecat_phone_bot.py answers over a
Twilio-style media stream (8 kHz mu-law WebSocket) and examples/pipecat_phone_caller.py plays the
caller, in real time, with the small random checkpoint."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("pipecat")
pytest.importorskip("websockets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from pipecat_phone_bot import GREETING, serve_one_call  # noqa: E402
from pipecat_phone_caller import call  # noqa: E402

from pipecat_csm import CSMTTSService  # noqa: E402

pytestmark = pytest.mark.slow  # a whole phone call in real time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
async def test_caller_script_completes_a_call(hf_checkpoint):
    port = free_port()
    tts = CSMTTSService(settings=CSMTTSService.Settings(model=str(hf_checkpoint), max_audio_ms=800, seed=0))
    await tts.wait_ready()
    ready = asyncio.Event()
    bot = asyncio.create_task(serve_one_call("127.0.0.1", port, tts, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        lines = ["Hi, my parcel never arrived.", "Great, thanks. Bye!"]
        result = await call(f"ws://127.0.0.1:{port}", lines, reply_gap_s=1.0, timeout_s=90)
        await asyncio.wait_for(bot, 30)  # the bot's pipeline ends when the caller hangs up
    finally:
        if not bot.done():
            bot.cancel()
    # The caller heard a greeting and a reply to each line, all of it 8 kHz mu-law.
    assert result.greeting_s > 0 and len(result.replies) == 2 and all(s > 0 for s in result.replies)
    history = tts.conversation.history
    texts = [(s.speaker, s.text) for s in history]
    assert texts[0] == (0, GREETING)
    callers = [s for s in history if s.speaker == 1]
    assert [s.text for s in callers] == lines
    # The caller's own voice (8 kHz from the phone line) is in the context, Mimi-encoded.
    assert all(s.codes is not None and s.codes.shape[0] >= 10 for s in callers)
    bot_frames = sum(s.codes.shape[0] for s in history if s.speaker == 0)
    # What the caller received is what the bot recorded: 80 ms of 8 kHz audio per CSM frame.
    assert abs(result.total_s - bot_frames * 0.08) < 0.1
    last_caller = max(i for i, s in enumerate(history) if s.speaker == 1)
    assert last_caller < len(history) - 1 and all(s.speaker == 0 for s in history[last_caller + 1 :])
