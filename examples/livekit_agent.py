"""A LiveKit voice agent that speaks with Sesame CSM and follows the conversation.

    pip install "csm-plugin[livekit]"
    export LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...   # STT and LLM via LiveKit Inference
    python examples/livekit_agent.py download-files   # fetch the CSM checkpoint once
    python examples/livekit_agent.py console          # talk to it in this terminal
    python examples/livekit_agent.py dev              # join rooms of your LiveKit project

Environment: CSM_MODEL (checkpoint, default sesame/csm-1b), CSM_DEVICE (cuda if available, else
cpu), CSM_DTYPE (bfloat16 on cuda), CSM_URL (use a `csm-plugin serve` server instead of loading
the model in this process, so many workers share one GPU), CSM_API_KEY (that server's key),
STT_MODEL / LLM_MODEL (LiveKit Inference model strings).
"""

from __future__ import annotations

import logging
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli
from livekit.plugins import csm

logger = logging.getLogger("csm-agent")


def make_tts() -> csm.TTS:
    if url := os.environ.get("CSM_URL"):
        return csm.TTS(url=url, api_key=os.environ.get("CSM_API_KEY"))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    device = os.environ.get("CSM_DEVICE", "cuda" if cuda else "cpu")
    dtype = os.environ.get("CSM_DTYPE", "bfloat16" if device.startswith("cuda") else "float32")
    return csm.TTS(model=os.environ.get("CSM_MODEL"), device=device, dtype=dtype)


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
    await session.start(
        agent=Agent(
            instructions=(
                "You are a friendly voice assistant. Answer in short, natural spoken sentences, "
                "without lists, markdown or emojis."
            )
        ),
        room=ctx.room,
    )
    await session.generate_reply(instructions="Greet the user and ask how you can help.")


if __name__ == "__main__":
    cli.run_app(server)
