"""A LiveKit voice agent that speaks with Sesame CSM and follows the conversation.

Offline, on one machine, no LiveKit project, no keys (a scripted LLM stand-in answers; typed
lines stand in for speech-to-text; the agent's voice goes to a WAV file):

    pip install "csm-plugin[livekit]"          # in a clone: pip install -e ".[livekit]"
    python examples/livekit_agent.py offline --test-checkpoint --say "Hi, my parcel never arrived."
    python examples/livekit_agent.py offline                # the real model; type lines, an empty one ends

Online, with a LiveKit project (STT and LLM through LiveKit Inference):

    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py download-files   # fetch the CSM checkpoint once
    python examples/livekit_agent.py console          # talk to it in this terminal (needs PortAudio)
    python examples/livekit_agent.py dev              # join rooms of your project, reload on edits
    python examples/livekit_agent.py start            # production worker

livekit-agents 1.8 marks that built-in CLI as deprecated in favour of the LiveKit CLI (`lk agent
console`, ...), which drives the same file through `python -m livekit.agents start|console
examples/livekit_agent.py`; both find the `server` defined below.

Environment: CSM_MODEL (checkpoint, default sesame/csm-1b), CSM_DEVICE (cuda if usable, else
cpu), CSM_DTYPE (bfloat16 on cuda), CSM_THREADS (torch CPU threads), CSM_URL (use a `csm-plugin
serve` server instead of loading the model in this process, so many workers share one GPU),
CSM_API_KEY (that server's key), STT_MODEL / LLM_MODEL (LiveKit Inference model strings).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import wave

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_standins import fail, missing_dependency, offline_checkpoint, scripted_reply, setup_runtime  # noqa: E402

try:
    from livekit import rtc
    from livekit.agents import (
        DEFAULT_API_CONNECT_OPTIONS,
        Agent,
        AgentServer,
        AgentSession,
        JobContext,
        JobProcess,
        cli,
        llm,
    )
    from livekit.agents.voice import io
    from livekit.plugins import csm
except ImportError as e:
    missing_dependency(e, "LiveKit Agents", 'pip install "csm-plugin[livekit]" (in a clone: pip install -e ".[livekit]")')

logger = logging.getLogger("csm-agent")

INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in short, natural spoken sentences, without lists, markdown or emojis."
)


def make_tts(**options) -> csm.TTS:
    if url := os.environ.get("CSM_URL"):
        return csm.TTS(url=url, api_key=os.environ.get("CSM_API_KEY"), **options)
    device = setup_runtime(os.environ.get("CSM_DEVICE", "auto"), None)
    dtype = os.environ.get("CSM_DTYPE", "bfloat16" if device.startswith("cuda") else "float32")
    return csm.TTS(model=options.pop("model", None) or os.environ.get("CSM_MODEL"), device=device, dtype=dtype, **options)


def prewarm(proc: JobProcess) -> None:
    # Runs once in each job process before it takes a job: load the model here so that the
    # first reply does not wait for it. Every csm.TTS in this process then shares it.
    if not os.environ.get("CSM_URL"):
        make_tts().prewarm()


# Loading CSM takes longer than LiveKit's default 10 s process initialisation budget.
server = AgentServer(setup_fnc=prewarm, initialize_process_timeout=600.0)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        stt=os.environ.get("STT_MODEL", "deepgram/nova-3"),
        llm=os.environ.get("LLM_MODEL", "openai/gpt-4.1-mini"),
        tts=make_tts(),  # follows this job's session by itself: user turns, its own replies, barge-ins
    )
    await session.start(agent=Agent(instructions=INSTRUCTIONS), room=ctx.room)
    await session.generate_reply(instructions="Greet the user and ask how you can help.")


# --- offline: the same session and TTS, with stand-ins for the network parts ---------------------


class ScriptedLLM(llm.LLM):
    """Stands in for an LLM: answers the last user message with offline_standins.RULES, a word at
    a time like a streaming LLM."""

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **kwargs):
        users = [m for m in chat_ctx.items if getattr(m, "type", None) == "message" and m.role == "user"]
        reply = scripted_reply((users[-1].text_content or "") if users else "")
        return _ScriptedStream(self, reply, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    def __init__(self, owner, reply: str, **kwargs):
        super().__init__(owner, **kwargs)
        self._reply = reply

    async def _run(self) -> None:
        for i, word in enumerate(self._reply.split(" ")):
            await asyncio.sleep(0.01)
            delta = llm.ChoiceDelta(role="assistant", content=word if i == 0 else " " + word)
            self._event_ch.send_nowait(llm.ChatChunk(id="scripted", delta=delta))


class WavOutput(io.AudioOutput):
    """The session's audio output: keeps the agent's frames for a WAV file, played instantly."""

    def __init__(self):
        super().__init__(label="wav", capabilities=io.AudioOutputCapabilities(pause=False), sample_rate=None)
        self.frames: list[rtc.AudioFrame] = []
        self._pushed = 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._pushed:
            self.on_playback_started(created_at=0.0)
        self.frames.append(frame)
        self._pushed += frame.duration

    def flush(self) -> None:
        super().flush()
        if self._pushed:
            self.on_playback_finished(playback_position=self._pushed, interrupted=False)
            self._pushed = 0.0

    def clear_buffer(self) -> None:
        if self._pushed:
            self.on_playback_finished(playback_position=self._pushed, interrupted=True)
            self._pushed = 0.0

    def write(self, path: str) -> float:
        rate = self.frames[0].sample_rate if self.frames else 24_000
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(b"".join(bytes(f.data) for f in self.frames))
        return sum(f.duration for f in self.frames)


async def offline(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livekit_agent.py offline", description="The agent offline: no LiveKit project needed.")
    p.add_argument("--say", action="append", help="a user line (repeatable); default: read stdin")
    p.add_argument("--wav", default="agent.wav", help="where the agent's voice goes (default agent.wav)")
    p.add_argument("--model", help="CSM checkpoint (path or hub id); default $CSM_MODEL, else sesame/csm-1b")
    p.add_argument("--test-checkpoint", action="store_true", help="a small random checkpoint (noise, for a dry run)")
    p.add_argument("--device", default=os.environ.get("CSM_DEVICE", "auto"), help="cpu, cuda; auto: cuda when usable")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: $CSM_THREADS, else the CPUs available)")
    p.add_argument("--max-audio-ms", type=float, default=None, help="cap each reply's audio")
    args = p.parse_args(argv)

    os.environ["CSM_DEVICE"] = setup_runtime(args.device, args.threads)
    model = offline_checkpoint() if args.test_checkpoint else args.model
    speech = make_tts(model=model, seed=0, max_audio_ms=args.max_audio_ms)
    # No VAD and no turn detector (they load local models): typed turns need neither.
    turns = {"turn_detection": None, "interruption": {"resume_false_interruption": False}}
    session = AgentSession(llm=ScriptedLLM(), tts=speech, vad=None, turn_handling=turns)
    out = WavOutput()
    session.output.audio = out
    speech.attach(session)  # inside a LiveKit job the TTS finds its session itself
    print("loading the model...", flush=True)
    await session.start(agent=Agent(instructions=INSTRUCTIONS), record=False)
    loop = asyncio.get_running_loop()
    try:
        lines = iter(args.say) if args.say is not None else None
        while True:
            if lines is not None:
                line = next(lines, "")
            else:
                print("you> ", end="", flush=True)
                line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line:
                break
            await session.generate_reply(user_input=line).wait_for_playout()
        # What the next reply would be conditioned on: every turn, the agent's with its audio codes.
        for segment in speech.conversation.history if speech.conversation else []:
            who = "agent" if segment.speaker == 0 else "user"
            frames = 0 if segment.codes is None else segment.codes.shape[0]
            print(f"{who:>5}: {segment.text}  [{frames} audio frames]")
    finally:
        await session.aclose()
        await speech.aclose()
    print(f"wrote {out.write(args.wav):.1f} s of agent audio to {args.wav}")
    return 0


def check_console_audio() -> None:
    """The console talks through the sound card (sounddevice over PortAudio): say so in one line."""
    try:
        import sounddevice  # noqa: F401
    except ImportError as e:
        missing_dependency(e, "sounddevice for the console", "pip install sounddevice")
    except OSError as e:  # the PortAudio library itself is missing
        fail(
            f"console mode needs the PortAudio library ({e}). Install it (Debian/Ubuntu: apt install libportaudio2; "
            "macOS: brew install portaudio), use `console --text`, or run offline: "
            "python examples/livekit_agent.py offline --test-checkpoint"
        )


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "offline":
        sys.exit(asyncio.run(offline(sys.argv[2:])))
    if command == "console" and "--text" not in sys.argv:
        check_console_audio()
    cli.run_app(server)
