"""A voice agent on one laptop, no network: Pipecat + CSMTTSService.

    python examples/pipecat_local_agent.py --say "Hi, my parcel never arrived." --say "It was blue."
    python examples/pipecat_local_agent.py                 # type lines; an empty line ends
    python examples/pipecat_local_agent.py --mic --speaker # microphone in, speaker out (pyaudio)
    python examples/pipecat_local_agent.py --voice-wav maya.wav --voice-text "Thanks for calling, this is Maya."

Text goes in as the user's transcript (or microphone audio, with a simple energy VAD and a
scripted transcript standing in for an STT model); a scripted LLM stand-in answers (or
`--llm openai` with OPENAI_API_KEY); CSM speaks with the conversation as context; the replies go
to a WAV file (default agent.wav) or the speaker. `--model` picks the checkpoint ($CSM_MODEL,
else sesame/csm-1b); `--test-checkpoint` makes a small random one, to try the plumbing in seconds
(it speaks noise, not words). `--voice-wav` and `--voice-text` give the agent's voice (a clip and
its transcript); `--split sentence` speaks whole sentences instead of starting at the first clause.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import wave

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_standins import fail, missing_dependency, offline_checkpoint, scripted_reply, setup_runtime  # noqa: E402

try:
    from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
    from pipecat.frames.frames import (
        EndFrame,
        Frame,
        InputAudioRawFrame,
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from pipecat.workers.runner import WorkerRunner

    from pipecat_csm import CSMTTSService, VoicePrompt
except ImportError as e:
    missing_dependency(e, "Pipecat", 'pip install "csm-plugin[pipecat]" (in a clone: pip install -e ".[pipecat]")')

SYSTEM = "You are a friendly customer-service agent for a parcel company. Answer in one or two short sentences."


class ScriptedLLM(FrameProcessor):
    """Answers each LLM context with a canned reply (offline_standins.RULES), streamed as tokens
    like a real LLM service."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        users = [m for m in frame.context.get_messages() if m.get("role") == "user"]
        reply = scripted_reply(str(users[-1].get("content", "")) if users else "")
        await self.push_frame(LLMFullResponseStartFrame())
        for word in reply.split(" "):
            await self.push_frame(LLMTextFrame(word + " "))
            await asyncio.sleep(0.02)
        await self.push_frame(LLMFullResponseEndFrame())


class EnergyVAD(VADAnalyzer):
    """A tiny energy detector (no model): voice when the RMS is above a threshold."""

    def __init__(self, threshold: float = 0.02, **kwargs):
        kwargs.setdefault("params", VADParams(start_secs=0.1, stop_secs=0.2, min_volume=0.0))
        super().__init__(**kwargs)
        self._threshold = threshold

    def num_frames_required(self) -> int:
        return int(self.sample_rate * 0.02)

    def voice_confidence(self, buffer: bytes) -> float:
        pcm = np.frombuffer(buffer, dtype=np.int16).astype(np.float32) / 32768
        return 1.0 if pcm.size and float(np.sqrt(np.mean(pcm**2))) > self._threshold else 0.0


class ScriptedSTT(FrameProcessor):
    """Stands in for an STT model: when the user's speech (by energy) ends, the next line of a
    script is the transcript. Swap in a real STT service (Whisper, Deepgram...) for real use."""

    def __init__(self, lines: list[str], threshold: float = 0.02, silence_s: float = 0.4):
        super().__init__()
        self._lines, self._threshold, self._silence_s = list(lines), threshold, silence_s
        self._voiced_s = self._quiet_s = 0.0

    def add_lines(self, lines: list[str]) -> None:
        self._lines.extend(lines)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if not isinstance(frame, InputAudioRawFrame):
            return
        pcm = np.frombuffer(frame.audio, dtype=np.int16).astype(np.float32) / 32768
        seconds = len(pcm) / frame.sample_rate
        if pcm.size and float(np.sqrt(np.mean(pcm**2))) > self._threshold:
            self._voiced_s, self._quiet_s = self._voiced_s + seconds, 0.0
        elif self._voiced_s:
            self._quiet_s += seconds
            if self._quiet_s >= self._silence_s:
                voiced, self._voiced_s = self._voiced_s, 0.0
                if voiced >= 0.2 and self._lines:
                    await self.push_frame(transcript(self._lines.pop(0)))


def transcript(text: str) -> TranscriptionFrame:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return TranscriptionFrame(text=text, user_id="user", timestamp=now, finalized=True)


class WavSink(FrameProcessor):
    """Writes the agent's audio to a WAV file; tells the typed input when each reply has ended."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.rate, self.chunks = path, 0, []
        self.reply_done = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.rate = frame.sample_rate
            self.chunks.append(frame.audio)
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.reply_done.set()
        await self.push_frame(frame, direction)

    def write(self) -> float:
        with wave.open(self.path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.rate or 24000)
            w.writeframes(b"".join(self.chunks))
        return sum(map(len, self.chunks)) / 2 / (self.rate or 24000)


def user_aggregator_params(vad: VADAnalyzer | None = None) -> LLMUserAggregatorParams:
    # Turn ends 0.6 s after the last transcript / VAD stop (no smart-turn model to download).
    return LLMUserAggregatorParams(
        vad_analyzer=vad, user_turn_strategies=UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy()])
    )


def make_llm(kind: str):
    if kind == "openai":
        try:
            from pipecat.services.openai.llm import OpenAILLMService
        except ImportError as e:
            missing_dependency(e, "Pipecat's OpenAI service", 'pip install "pipecat-ai[openai]"')
        if not os.environ.get("OPENAI_API_KEY"):
            fail("--llm openai needs OPENAI_API_KEY in the environment")
        return OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"])
    return ScriptedLLM()


async def typed_turns(worker: PipelineWorker, sink: WavSink, lines: list[str] | None) -> None:
    """Each line is one user turn; the next waits for the reply to end. No lines: read stdin."""
    loop = asyncio.get_running_loop()
    source = iter(lines) if lines is not None else None
    while True:
        if source is not None:
            line = next(source, "")
        else:
            print("you> ", end="", flush=True)
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line:
            break
        sink.reply_done.clear()
        await worker.queue_frame(transcript(line))
        await sink.reply_done.wait()
    await worker.queue_frame(EndFrame())


def load_voice_prompt(path: str | None, text: str | None) -> VoicePrompt | None:
    """The agent's voice from --voice-wav and --voice-text (both or neither); a one-line error
    for a missing half, an unreadable file or a clip CSM cannot use."""
    if path is None and text is None:
        return None
    if path is None or text is None:
        fail("--voice-wav and --voice-text go together: a clip and its exact transcript")
    from csm_plugin.audio import read_mono
    from csm_plugin.errors import CSMError

    try:
        audio, rate = read_mono(path)
        return VoicePrompt(text, audio, rate)
    except (CSMError, OSError) as e:
        fail(f"--voice-wav {path}: {e}")


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--say", action="append", help="a user line (repeatable); default: read stdin")
    p.add_argument("--mic", action="store_true", help="microphone in (needs pyaudio)")
    p.add_argument("--speaker", action="store_true", help="play through the speaker instead of a WAV file")
    p.add_argument("--wav", default="agent.wav", help="where the agent's voice goes (default agent.wav)")
    p.add_argument("--llm", choices=["scripted", "openai"], default="scripted")
    p.add_argument("--model", help="CSM checkpoint (path or hub id)")
    p.add_argument("--test-checkpoint", action="store_true", help="a small random checkpoint (noise, for a dry run)")
    p.add_argument("--device", default="auto", help="cpu, cuda; auto: cuda when usable (default)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: $CSM_THREADS, else the CPUs available)")
    p.add_argument("--max-audio-ms", type=float, default=None, help="cap each reply's audio")
    p.add_argument("--split", choices=["clause", "sentence"], default="clause",
                   help="start speaking at the first clause (default) or at the first sentence")
    p.add_argument("--voice-wav", help="the agent's voice: a short mono clip (any rate)")
    p.add_argument("--voice-text", help="the exact transcript of --voice-wav")
    args = p.parse_args(argv)
    voice_prompt = load_voice_prompt(args.voice_wav, args.voice_text)  # before the model loads: mistakes fail fast

    device = setup_runtime(args.device, args.threads)
    model = offline_checkpoint() if args.test_checkpoint else args.model
    tts = CSMTTSService(device=device, split=args.split, voice_prompt=voice_prompt,
                        settings=CSMTTSService.Settings(model=model, max_audio_ms=args.max_audio_ms))

    context = LLMContext([{"role": "system", "content": SYSTEM}])
    transport = None
    if args.mic or args.speaker:
        try:
            from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams
        except (ImportError, OSError) as e:  # pyaudio missing, or PortAudio under it
            missing_dependency(e, "PyAudio (and the PortAudio library) for --mic / --speaker",
                               "pip install pyaudio (PortAudio: apt install portaudio19-dev, or brew install portaudio)")

        transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=args.mic, audio_out_enabled=True))
    aggregators = LLMContextAggregatorPair(context, user_params=user_aggregator_params(EnergyVAD() if args.mic else None))
    sink = WavSink(args.wav)
    stages = [aggregators.user(), make_llm(args.llm), tts]
    if args.mic:  # a scripted transcript per utterance; for real speech put an STT service here
        stages.insert(0, ScriptedSTT(args.say or ["Hi, my parcel never arrived.", "It was a blue jacket.", "Thanks, bye!"]))
    if transport is not None:
        stages = ([transport.input()] if args.mic else []) + stages + [transport.output()]
    else:
        stages.append(sink)
    pipeline = Pipeline([*stages, aggregators.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(worker)
    tasks = [asyncio.create_task(runner.run())]
    if not args.mic:
        tasks.append(asyncio.create_task(typed_turns(worker, sink, args.say)))
    await asyncio.gather(*tasks)

    # The conversation as CSM heard it: the voice prompt, then each turn; a reply spoken clause by
    # clause is one line per clause.
    for turn in tts.conversation.turns if tts.conversation else []:
        segment = turn.segment
        who = "voice" if turn.pinned else "agent" if turn.origin == "agent" else "user"
        frames = 0 if segment.codes is None else segment.codes.shape[0]
        print(f"{who:>5}: {segment.text}  [{frames} audio frames]")
    if transport is None:
        print(f"wrote {sink.write():.1f} s of agent audio to {args.wav}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
