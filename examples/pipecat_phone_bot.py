"""A customer-service phone bot: a Twilio-style media-stream WebSocket (8 kHz mu-law) in and out,
CSM as the voice, the conversation (the caller's own voice included) as its context.

    python examples/pipecat_phone_bot.py --test-checkpoint &      # serves one call on :8765
    python examples/pipecat_phone_caller.py ws://localhost:8765   # plays the caller (waits for the bot)

The WebSocket speaks Twilio's Media Streams protocol (`connected`, `start`, `media`, `stop`
events; base64 mu-law at 8 kHz), so a real Twilio number can stream to it (`<Connect><Stream
url="wss://.../">` in TwiML, behind a TLS proxy). The pipeline runs at 8 kHz: the adapter
resamples CSM's 24 kHz audio itself, the serializer only converts to mu-law.

Offline stand-ins, so the example runs on one machine with no network or extra models: an energy
VAD, a scripted transcript per caller utterance (the caller script sends its lines in the
`start` event's customParameters, where a Twilio <Parameter> would go; put a real STT service
here for real calls) and the scripted LLM of pipecat_local_agent.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_standins import missing_dependency, offline_checkpoint, setup_runtime  # noqa: E402

try:
    from pipecat.frames.frames import EndFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.transports.websocket.server import (
        SingleClientWebsocketServerParams,
        SingleClientWebsocketServerTransport,
    )
    from pipecat.workers.runner import WorkerRunner

    from pipecat_csm import CSMTTSService
except ImportError as e:
    missing_dependency(e, "Pipecat (with its websocket transport)", 'pip install "csm-plugin[pipecat]" (in a clone: pip install -e ".[pipecat]")')

from pipecat_local_agent import EnergyVAD, ScriptedLLM, ScriptedSTT, user_aggregator_params  # noqa: E402

PHONE_RATE = 8000
SYSTEM = "You are the phone agent of a parcel company. Keep answers short; this is a phone call."
GREETING = "Thanks for calling Parcel Express. How can I help you today?"


class MediaStreamSerializer(TwilioFrameSerializer):
    """Twilio's serializer, learning the stream id and custom parameters from the `start` event
    (Twilio sends it first on every stream), so no call setup happens outside the WebSocket."""

    def __init__(self, on_start=None):
        super().__init__("pending", params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
        self._on_start = on_start

    async def deserialize(self, data):
        message = json.loads(data) if isinstance(data, str) else {}
        if message.get("event") == "start":
            start = message.get("start", {})
            self._stream_sid = start.get("streamSid") or message.get("streamSid") or self._stream_sid
            if self._on_start is not None:
                await self._on_start(start.get("customParameters") or {})
            return None
        return await super().deserialize(data)


async def serve_one_call(host: str, port: int, tts: CSMTTSService, ready: asyncio.Event | None = None) -> CSMTTSService:
    """Answer one call on ws://host:port and return when the caller hangs up."""
    stt = ScriptedSTT([])

    async def on_start(parameters: dict) -> None:
        stt.add_lines(json.loads(parameters.get("script", "[]")))

    transport = SingleClientWebsocketServerTransport(
        SingleClientWebsocketServerParams(
            audio_in_enabled=True, audio_out_enabled=True, serializer=MediaStreamSerializer(on_start)
        ),
        host=host,
        port=port,
    )
    context = LLMContext([{"role": "system", "content": SYSTEM}])
    aggregators = LLMContextAggregatorPair(context, user_params=user_aggregator_params(EnergyVAD()))
    pipeline = Pipeline(
        [transport.input(), stt, aggregators.user(), ScriptedLLM(), tts, transport.output(), aggregators.assistant()]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=PHONE_RATE, audio_out_sample_rate=PHONE_RATE, enable_metrics=True),
        cancel_on_idle_timeout=False,
    )

    @transport.event_handler("on_websocket_ready")
    async def on_ready(_transport):
        if ready is not None:
            ready.set()

    @transport.event_handler("on_client_connected")
    async def on_connected(_transport, _websocket):
        from pipecat.frames.frames import TTSSpeakFrame

        await worker.queue_frame(TTSSpeakFrame(GREETING))

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_transport, _websocket):
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=ready is None)
    await runner.add_workers(worker)
    await runner.run()
    return tts


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--model", help="CSM checkpoint (path or hub id); default $CSM_MODEL, else sesame/csm-1b")
    p.add_argument("--url", help="a csm-plugin server instead of the in-process engine")
    p.add_argument("--test-checkpoint", action="store_true", help="a small random checkpoint (noise, for a dry run)")
    p.add_argument("--device", default="auto", help="cpu, cuda; auto: cuda when usable (default)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: $CSM_THREADS, else the CPUs available)")
    p.add_argument("--max-audio-ms", type=float, default=None)
    args = p.parse_args(argv)
    device = "cpu" if args.url else setup_runtime(args.device, args.threads)
    model = offline_checkpoint() if args.test_checkpoint else args.model
    tts = CSMTTSService(
        url=args.url, device=device, settings=CSMTTSService.Settings(model=model, max_audio_ms=args.max_audio_ms)
    )
    print("loading the model before answering (the caller waits for it)...", flush=True)
    await tts.wait_ready()  # load before answering, so the caller never waits on the model
    print(f"answering one call on ws://{args.host}:{args.port}", flush=True)
    await serve_one_call(args.host, args.port, tts)
    for segment in tts.conversation.history:
        who = "bot" if segment.speaker == 0 else "caller"
        frames = 0 if segment.codes is None else segment.codes.shape[0]
        print(f"{who:>6}: {segment.text}  [{frames} audio frames]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
