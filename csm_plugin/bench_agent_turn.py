"""`csm-plugin bench --agent-turn`: a voice agent's turns end to end, through each framework adapter.

Each adapter runs in its framework, with stand-ins only where a network service would be:

- Pipecat: a real Pipeline (scripted speech-to-text -> the standard user aggregator with an energy
  VAD and the speech-timeout turn strategy -> a scripted LLM -> CSMTTSService -> a timing sink ->
  the assistant aggregator), fed microphone audio (20 ms frames, paced in real time) like a
  transport's input, as examples/pipecat_local_agent.py --mic does.
- LiveKit: a real AgentSession (its LLM and TTS nodes) with a scripted LLM, csm.TTS following
  the session, a paced microphone input (50 ms frames, which the TTS taps for the user's voice)
  and a capturing audio output. At the end of each utterance the user's turn is committed with
  its timing, as the session's STT path does (`generate_reply(user_input=ChatMessage(...))`).

The LLM stand-in answers after `llm_first_token_ms` and streams `tokens_per_s` tokens a second
(words and punctuation as separate tokens, as LLM tokenizers cut them). Each adapter gets the same
script; the conversation opens with a greeting (which also opens the model-side conversation and
pins the agent's voice prompt), then `turns` user turns are timed:

- first_audio_ms: the user's turn committed by the framework (its end of turn) -> the first audio
  frame out of the TTS. It covers the LLM's first-token delay, the first clause's tokens and the
  TTS; the user's own turn (words and audio) is prefilled meanwhile (early prefill).
- llm_first_token_to_first_audio_ms: the LLM's first token -> that first audio frame. Its lower
  bound is `llm_first_clause_ms` (first token -> the token that completes the first clause under
  csm_plugin.conversation.clauses); the target is that plus two frame steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import inspect
import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .conversation.clauses import TextSplitter, split_text

log = logging.getLogger(__name__)

GREETING = "Hello, thanks for calling the parcel service. How can I help you today?"
AGENT_INSTRUCTIONS = "You are a friendly customer-service agent for a parcel company."
# (what the user says, how long they speak, what the LLM answers): first clauses of different lengths.
SCRIPT = [
    ("Hi, my parcel never arrived.", 1.6,
     "I am sorry to hear that, let me look into it for you. Could you tell me your order number?"),
    ("It is four two seven one.", 1.4,
     "Thank you, I found the order and it is at the depot. It will reach you tomorrow morning."),
    ("Can I get a refund instead?", 1.3,
     "Of course, I can refund it today. The money will be back on your card within three days."),
    ("Great, thanks a lot.", 1.0,
     "You are welcome, it was a pleasure to help. Have a lovely day!"),
]
_TOKEN = re.compile(r"\s*(?:[\w']+|[^\w\s]+)")
VOICE_NAME = "bench-agent"


def llm_tokens(text: str) -> list[str]:
    """The text as an LLM streams it: each word (with its leading space) and each run of
    punctuation is one token."""
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == text, text
    return tokens


def first_piece_token(tokens: list[str], mode: str = "clause") -> int:
    """Index of the token whose arrival completes the first piece to speak (the splitter knows a
    boundary once the whitespace after it arrives); len(tokens) if only the end of the text does."""
    splitter = TextSplitter(mode)
    for i, token in enumerate(tokens):
        if splitter.push(token):
            return i
    return len(tokens)


@dataclass
class TurnTimes:
    """perf_counter() times of one user turn."""

    user_text: str
    reply: str
    voice_end: float = 0.0  # the last voiced audio frame was sent
    committed: float | None = None  # the framework committed the user's turn
    tokens: list[float] = field(default_factory=list)  # when each LLM token was sent
    first_audio: float | None = None
    done: float | None = None
    user_recorded_at_first_token: bool | None = None
    user_cached_at_first_token: bool | None = None
    speak_called: float | None = None  # the adapter asked the service for the reply's first piece
    speak_first_chunk: float | None = None  # ... and the service handed it its first audio chunk
    user_recorded: float | None = None  # the user's turn appeared in the conversation's history
    user_cached: float | None = None  # ... and in its cache slot (the early prefill is done)

    def ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else 1000 * (b - a)

    def summary(self) -> dict:
        tokens = llm_tokens(self.reply)
        clause, sentence = first_piece_token(tokens, "clause"), first_piece_token(tokens, "sentence")
        at = lambda i: self.tokens[i] if i < len(self.tokens) else (self.tokens[-1] if self.tokens else None)
        first = self.tokens[0] if self.tokens else None
        return {
            "first_audio_ms": self.ms(self.committed, self.first_audio),
            "llm_first_token_to_first_audio_ms": self.ms(first, self.first_audio),
            "llm_first_clause_ms": self.ms(first, at(clause)),
            "llm_first_sentence_ms": self.ms(first, at(sentence)),
            "llm_first_token_ms": self.ms(self.committed, first),
            "voice_end_to_first_audio_ms": self.ms(self.voice_end, self.first_audio),
            "user_turn_recorded_at_first_token": self.user_recorded_at_first_token,
            "user_turn_cached_at_first_token": self.user_cached_at_first_token,
            # where the time after the first clause goes: the adapter's text handling, the service
            # (prefill of the piece's text rows, after any early prefill still running, and one
            # frame), then the framework's delivery to its output
            "clause_to_speak_ms": self.ms(at(clause), self.speak_called),
            "service_first_chunk_ms": self.ms(self.speak_called, self.speak_first_chunk),
            "chunk_to_output_ms": self.ms(self.speak_first_chunk, self.first_audio),
            "user_turn_recorded_ms": self.ms(self.committed, self.user_recorded),
            "user_turn_cached_ms": self.ms(self.committed, self.user_cached),
        }


@dataclass
class Options:
    turns: int = 4
    split: str = "clause"
    frameworks: tuple[str, ...] = ("pipecat", "livekit")
    llm_first_token_ms: float = 350.0
    tokens_per_s: float = 40.0
    stt_final_ms: float = 200.0  # end of speech -> the STT's final transcript
    user_speech_timeout_s: float = 0.3  # Pipecat's end-of-turn wait after the VAD stop (not timed)
    max_audio_ms: float | None = 1200.0  # per spoken piece; first audio does not depend on it
    voice_prompt_seconds: float = 10.0
    seed: int = 0
    livekit_text_transforms: bool = True  # the session's default tts_text_transforms (False: none)
    timeout_s: float = 300.0  # per turn


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options `csm-plugin bench` takes for these figures (no torch imported: the CLI's parser
    calls this before anything loads)."""
    p.add_argument("--voice-prompt-seconds", type=float, default=10.0,
                   help="length of the pinned voice prompt for the new-conversation figures")
    p.add_argument("--agent-turn", action="store_true",
                   help="also run a voice agent's turns through the Pipecat and LiveKit adapters (scripted STT and LLM)")
    p.add_argument("--agent-turns", type=int, default=4, help="user turns per adapter with --agent-turn")
    p.add_argument("--agent-split", choices=["clause", "sentence"], default="clause",
                   help="split mode asked of the adapters (where the installed adapter has the setting)")
    p.add_argument("--agent-frameworks", default="pipecat,livekit", help="comma-separated: pipecat, livekit")
    p.add_argument("--llm-first-token-ms", type=float, default=350.0, help="the LLM stand-in's time to its first token")
    p.add_argument("--llm-tokens-per-s", type=float, default=40.0, help="the LLM stand-in's streaming rate")
    p.add_argument("--agent-max-audio-ms", type=float, default=1200.0,
                   help="cap on each spoken piece's audio (first audio does not depend on it)")
    p.add_argument("--livekit-no-text-transforms", action="store_true",
                   help="AgentSession(tts_text_transforms=None): without LiveKit's markdown/emoji filters, which hold "
                        "back the end of the streamed text until the next token")


def options_from_args(args) -> dict | bool:
    """run()'s options from add_arguments' flags; False without --agent-turn."""
    if not getattr(args, "agent_turn", False):
        return False
    return {"turns": args.agent_turns, "split": args.agent_split,
            "frameworks": tuple(f.strip() for f in args.agent_frameworks.split(",") if f.strip()),
            "llm_first_token_ms": args.llm_first_token_ms, "tokens_per_s": args.llm_tokens_per_s,
            "max_audio_ms": args.agent_max_audio_ms, "voice_prompt_seconds": args.voice_prompt_seconds,
            "livekit_text_transforms": not getattr(args, "livekit_no_text_transforms", False)}


def table_rows(result: dict) -> list[tuple[str, str]]:
    """Rows for the bench's table (cli.bench_table) with the service and agent-turn figures."""

    def ms(v) -> str:
        return "-" if v is None else f"{v:,.1f} ms"

    rows = []
    ttfa = result.get("time_to_first_audio_ms", {})
    if "new_conversation_voice" in ttfa:
        s = result["settings"]
        target = result["targets"]["new_conversation_voice_vs_warm"]
        rows += [
            ("first audio, new conversation + voice",
             (f"{ms(ttfa['new_conversation_voice'])} ({target['ratio']:.2f}x warm; target <= 1.3x: "
              f"{'met' if target['met'] else 'not met'}); first-ever {ms(ttfa['new_conversation_voice_first'])} "
              f"({s['voice_prompt_seconds']:g} s prompt)")),
            ("first audio, styled / unstyled reply",
             f"{ms(ttfa['styled_reply'])} / {ms(ttfa['unstyled_reply'])} (+{ms(ttfa['styled_reply_extra_ms'])})"),
        ]
    turn = result.get("agent_turn")
    if turn:
        rows.append(("agent turn: LLM first clause", f"{ms(turn['llm_first_clause_ms'])} (frame step {ms(turn['frame_step_ms'])})"))
        for name in ("pipecat", "livekit"):
            section = turn.get(name)
            if section is None:
                continue  # not asked for
            if "target" not in section:
                rows.append((f"agent turn, {name}", section.get("skipped") or section.get("error", "-")))
                continue
            t = section["target"]
            rows.append((f"agent turn, {name} ({t['split_mode']})",
                         (f"end of turn -> audio {ms(section['first_audio_ms'])}; LLM first token -> audio "
                          f"{ms(section['llm_first_token_to_first_audio_ms'])} (target <= {ms(t['limit_ms'])}: "
                          f"{'met' if t['met'] else 'not met'})")))
    return rows


def run(engine, **options) -> dict:
    """Time `turns` agent turns through each framework's adapter on `engine` (an Engine nobody
    else uses meanwhile, or the bench's InferenceWorker that runs one). Returns the `agent_turn`
    section of the bench's JSON."""
    return asyncio.run(run_async(engine, **options))


async def run_async(engine, **options) -> dict:
    from .bench import VOICE_TEXT, EngineService, voice_like

    opts = Options(**{k: tuple(v) if k == "frameworks" else v for k, v in options.items()})
    TextSplitter(opts.split)  # the split mode, checked where it is defined (InputError, a ValueError)
    unknown = [name for name in opts.frameworks if name not in ("pipecat", "livekit")]
    if unknown:
        raise ValueError(f"unknown framework {unknown[0]!r} (pipecat, livekit)")
    script = [SCRIPT[i % len(SCRIPT)] for i in range(opts.turns)]
    result: dict = {
        "versions": _framework_versions(opts.frameworks),
        "settings": {
            "turns": opts.turns, "split_requested": opts.split, "llm_first_token_ms": opts.llm_first_token_ms,
            "llm_tokens_per_s": opts.tokens_per_s, "stt_final_ms": opts.stt_final_ms,
            "pipecat_user_speech_timeout_s": opts.user_speech_timeout_s, "max_audio_ms_per_piece": opts.max_audio_ms,
            "voice_prompt_seconds": opts.voice_prompt_seconds, "user_audio_seconds": [s for _, s, _ in script],
            "livekit_tts_text_transforms": "session default" if opts.livekit_text_transforms else "none",
        },
    }
    step = 1000 / opts.tokens_per_s
    clause_nominal = [step * first_piece_token(llm_tokens(reply), "clause") for _, _, reply in script]
    sentence_nominal = [step * first_piece_token(llm_tokens(reply), "sentence") for _, _, reply in script]
    result["llm_first_clause_ms"] = statistics.median(clause_nominal)
    result["llm_first_clause_ms_by_turn"] = clause_nominal
    result["llm_first_sentence_ms"] = statistics.median(sentence_nominal)

    class TimedService(EngineService):
        """The bench's service, noting when each reply is asked for and when its first chunk comes
        (a pass-through around the conversations the adapters get)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.speaks: list[dict] = []

        def conversation(self, conversation_id, **kwargs):
            return _TimedConversation(super().conversation(conversation_id, **kwargs), self.speaks)

    async with TimedService(engine) as service:
        result["frame_step_ms"] = await _frame_step_ms(service)
        await service.add_voice(VOICE_NAME, text=VOICE_TEXT, audio=voice_like(opts.voice_prompt_seconds, seed=3), sample_rate=24_000)
        voice = (VOICE_TEXT, voice_like(opts.voice_prompt_seconds, seed=3), 24_000)
        with _quiet_frameworks():
            for name in opts.frameworks:
                runner = {"pipecat": _run_pipecat, "livekit": _run_livekit}[name]
                try:
                    result[name] = await runner(service, script, opts, voice)
                except ImportError as e:
                    result[name] = {"skipped": f"{name} is not installed ({e})"}
                except Exception as e:  # noqa: BLE001 - one adapter failing leaves the other's figures
                    log.exception("agent turn through %s failed", name)
                    result[name] = {"error": f"{type(e).__name__}: {e}"}
    for name in opts.frameworks:
        section = result[name]
        if "turns" in section:
            _summarise(section, result["frame_step_ms"])
    return result


def _framework_versions(frameworks) -> dict:
    from importlib import metadata

    out = {}
    for name, dist in (("pipecat", "pipecat-ai"), ("livekit", "livekit-agents")):
        if name in frameworks:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
    return out


def target_summary(agent_turn: dict) -> dict:
    """Per adapter: LLM first token -> first audio (p50) against the first clause + two frame steps."""
    out = {}
    for name in ("pipecat", "livekit"):
        section = agent_turn.get(name) or {}
        if "target" in section:
            out[name] = section["target"]
    return out


def _summarise(section: dict, frame_step_ms: float) -> None:
    turns = section["turns"]

    def p50(key):
        values = [t[key] for t in turns if t.get(key) is not None]
        return statistics.median(values) if values else None

    for key in ("first_audio_ms", "llm_first_token_to_first_audio_ms", "llm_first_clause_ms", "llm_first_sentence_ms",
                "llm_first_token_ms", "voice_end_to_first_audio_ms", "user_turn_recorded_ms", "user_turn_cached_ms",
                "clause_to_speak_ms", "service_first_chunk_ms", "chunk_to_output_ms"):
        section[key] = p50(key)
    section["first_audio_ms_by_turn"] = [t["first_audio_ms"] for t in turns]
    section["llm_first_token_to_first_audio_ms_by_turn"] = [t["llm_first_token_to_first_audio_ms"] for t in turns]
    for key in ("user_turn_recorded_at_first_token", "user_turn_cached_at_first_token"):
        section[key] = f"{sum(bool(t[key]) for t in turns)} of {len(turns)}"
    # What the TTS path adds after the text it speaks is complete (the clause, or the sentence).
    for piece in ("clause", "sentence"):
        section[f"tts_after_first_{piece}_ms"] = statistics.median(
            [t["llm_first_token_to_first_audio_ms"] - t[f"llm_first_{piece}_ms"] for t in turns]
        )
    limits = [t["llm_first_clause_ms"] + 2 * frame_step_ms for t in turns]
    met = sum(t["llm_first_token_to_first_audio_ms"] <= limit for t, limit in zip(turns, limits))
    section["target"] = {
        "llm_first_token_to_first_audio_ms": section["llm_first_token_to_first_audio_ms"],
        "limit_ms": statistics.median(limits),
        "rule": "LLM first token -> first audio <= LLM first clause + 2 frame steps (p50; per turn below)",
        "met": section["llm_first_token_to_first_audio_ms"] <= statistics.median(limits),
        "turns_met": f"{met} of {len(turns)}",
        "split_mode": section["split"]["mode_observed"],
    }


async def _frame_step_ms(service) -> float:
    """Median interval between a reply's audio frames on this engine (a plain reply, no framework)."""
    conv = service.conversation("bench-agent-frame-step")
    stamps = []
    async for _ in conv.speak("One two three four five six seven eight nine ten eleven twelve.", seed=0, max_audio_ms=1040):
        stamps.append(time.perf_counter())
    await conv.close()
    return float(statistics.median(np.diff(stamps) * 1000)) if len(stamps) > 2 else float("nan")


@contextlib.contextmanager
def _quiet_frameworks():
    """Pipecat logs (loguru) every frame at DEBUG on stderr: off while timing, then back on."""
    try:
        from loguru import logger
    except ImportError:
        yield
        return
    names = ("pipecat", "pipecat_csm")
    for name in names:
        logger.disable(name)
    try:
        yield
    finally:
        for name in names:
            logger.enable(name)


def _split_options(init: Callable, settings_cls: type | None, split: str) -> tuple[dict, dict, str | None]:
    """(constructor kwargs, settings kwargs, where) to ask the installed adapter for `split`:
    only where its signature (or Settings) has the setting."""
    if "split" in inspect.signature(init).parameters:
        return {"split": split}, {}, "constructor"
    if settings_cls is not None and dataclasses.is_dataclass(settings_cls) and "split" in {f.name for f in dataclasses.fields(settings_cls)}:
        return {}, {"split": split}, "settings"
    return {}, {}, None


class _TimedConversation:
    """A conversation as the adapters see it, with its replies' timing noted in `speaks`."""

    def __init__(self, conv, speaks: list[dict]):
        self._conv, self._speaks = conv, speaks

    def __getattr__(self, name):
        return getattr(self._conv, name)

    def speak(self, text: str, options=None, **changes):
        entry = {"conversation": self._conv.id, "text": text, "called": time.perf_counter(), "first": None}
        self._speaks.append(entry)
        return _timed_reply(self._conv.speak(text, options, **changes), entry)


async def _timed_reply(reply, entry: dict):
    try:
        async for chunk in reply:
            if entry["first"] is None:
                entry["first"] = time.perf_counter()
            yield chunk
    finally:
        await reply.aclose()


def _note_first_speak(service, conversation_id: str, times: TurnTimes) -> None:
    """The turn's first reply piece as the adapter asked the service for it (after the commit)."""
    for entry in service.speaks:
        if entry["conversation"] == conversation_id and times.committed is not None and entry["called"] >= times.committed:
            times.speak_called, times.speak_first_chunk = entry["called"], entry["first"]
            return


def _user_turn_state(service, conv, times: TurnTimes) -> tuple[bool, bool]:
    """(recorded, cached): is the user's turn in the conversation, and in its cache slot?"""
    if conv is None:
        return False, False
    turns = [t for t in conv.turns if t.origin == "user" and t.segment.text == times.user_text]
    if not turns:
        return False, False
    return True, turns[-1].id in service.engine.cached_keys(conv.id)  # a snapshot, read off the worker thread


async def _watch_user_turn(service, conv_of: Callable, times: TurnTimes) -> None:
    """From the commit on: note when the user's turn is recorded, then cached (every 5 ms)."""
    while times.user_cached is None:
        recorded, cached = _user_turn_state(service, conv_of(), times)
        now = time.perf_counter()
        if recorded and times.user_recorded is None:
            times.user_recorded = now
        if cached:
            times.user_cached = now
            return
        await asyncio.sleep(0.005)


def _probe(service, conv_of: Callable, times: TurnTimes) -> None:
    """At the LLM's first token: is the user's turn in the conversation, and in its cache slot?"""
    times.user_recorded_at_first_token, times.user_cached_at_first_token = _user_turn_state(service, conv_of(), times)


def _history_summary(conv) -> dict:
    turns = conv.turns if conv is not None else []
    users = [t for t in turns if t.origin == "user"]
    agents = [t for t in turns if t.origin == "agent"]
    # each user turn's reply as spoken: the first piece is the agent segment right after it
    first_pieces = [turns[i + 1].segment.text for i, t in enumerate(turns[:-1]) if t.origin == "user" and turns[i + 1].origin == "agent"]
    return {
        "user_turns": len(users),
        "user_turns_with_audio": sum(t.segment.codes is not None for t in users),
        "user_audio_frames": [0 if t.segment.codes is None else int(t.segment.codes.shape[0]) for t in users],
        "agent_segments": len(agents),
        "agent_segments_with_audio": sum(t.segment.codes is not None for t in agents),
        "voice_pinned": any(t.pinned for t in turns),
        "user_texts": [t.segment.text for t in users],
        "first_pieces": first_pieces,
    }


def _observed_mode(history: dict, script: list) -> str:
    """Which split the adapter ran, from what it spoke: each reply's first piece is its first
    clause ("clause"), its first sentence ("sentence"), or something else ("other")."""
    modes = []
    for piece, (_, _, reply) in zip(history["first_pieces"], script):
        clause, sentence = split_text(reply, "clause")[0], split_text(reply, "sentence")[0]
        modes.append("clause" if piece == clause else "sentence" if piece == sentence else "other")
    if len(history["first_pieces"]) < len(script):
        modes.append("missing")
    return "+".join(sorted(set(modes))) or "none"


async def _wait(done: asyncio.Event, failed: asyncio.Event, errors: list[str], timeout: float, what: str) -> None:
    """Wait for `done`; a framework error (an ErrorFrame, a session error) ends the wait at once."""
    waits = [asyncio.ensure_future(done.wait()), asyncio.ensure_future(failed.wait())]
    try:
        finished, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if failed.is_set():
        raise RuntimeError(f"{what}: {errors[0] if errors else 'the framework reported an error'}")
    if not finished:
        raise TimeoutError(f"{what}: nothing after {timeout:g} s")


class _Clock:
    """Absolute schedule for paced sends: sleep until each due time, without drift."""

    def __init__(self, period_s: float):
        self.period, self.next = period_s, time.perf_counter()

    async def tick(self) -> None:
        self.next += self.period
        delay = self.next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            self.next = time.perf_counter()  # fell behind: do not burst to catch up
            await asyncio.sleep(0)


async def _stream_tokens(reply: str, opts: Options, times: TurnTimes, send: Callable, on_first: Callable) -> None:
    """The LLM stand-in's timing: the first token `llm_first_token_ms` after the request, then
    one token every 1/tokens_per_s, on an absolute schedule."""
    start = time.perf_counter()
    for i, token in enumerate(llm_tokens(reply)):
        due = start + opts.llm_first_token_ms / 1000 + i / opts.tokens_per_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == 0:
            on_first()
        times.tokens.append(time.perf_counter())
        await send(token)


# --- Pipecat -------------------------------------------------------------------------------------


async def _run_pipecat(service, script: list, opts: Options, voice) -> dict:
    from .audio import float_to_int16, int16_to_float
    from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
    from pipecat.frames.frames import (
        EndFrame,
        ErrorFrame,
        Frame,
        InputAudioRawFrame,
        LLMContextFrame,
        LLMContextUserTurnFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        TTSSpeakFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from pipecat.workers.runner import WorkerRunner

    from pipecat_csm import CSMTTSService

    rate, chunk_s = 16_000, 0.02
    threshold = 0.02
    current: list[TurnTimes] = []  # the turn being timed (empty during the greeting)
    errors: list[str] = []
    failed = asyncio.Event()
    watchers: list[asyncio.Task] = []

    def rms(pcm: bytes) -> float:
        x = int16_to_float(np.frombuffer(pcm, dtype=np.int16))
        return float(np.sqrt(np.mean(x**2))) if x.size else 0.0

    class EnergyVAD(VADAnalyzer):
        def __init__(self):
            super().__init__(params=VADParams(start_secs=0.1, stop_secs=0.2, min_volume=0.0))

        def num_frames_required(self) -> int:
            return int(self.sample_rate * 0.02)

        def voice_confidence(self, buffer: bytes) -> float:
            return 1.0 if rms(buffer) > threshold else 0.0

    class ScriptedSTT(FrameProcessor):
        """Stands in for an STT service: once the user's speech (by energy) has been quiet for
        stt_final_ms, the turn's line is the final transcript."""

        def __init__(self):
            super().__init__()
            self.lines: list[str] = []
            self._voiced = self._quiet = 0.0

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)
            if isinstance(frame, ErrorFrame):  # upstream from any processor: it reaches the first one
                errors.append(frame.error)
                failed.set()
            if not isinstance(frame, InputAudioRawFrame):
                return
            seconds = len(frame.audio) / 2 / frame.sample_rate
            if rms(frame.audio) > threshold:
                self._voiced, self._quiet = self._voiced + seconds, 0.0
            elif self._voiced:
                self._quiet += seconds
                if self._quiet * 1000 >= opts.stt_final_ms and self.lines:
                    self._voiced = 0.0
                    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
                    await self.push_frame(TranscriptionFrame(text=self.lines.pop(0), user_id="user", timestamp=now, finalized=True))

    class ScriptedLLM(FrameProcessor):
        """Stands in for an LLM service: streams the turn's scripted reply as tokens."""

        def __init__(self):
            super().__init__()
            self.replies: list[str] = []

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMContextUserTurnFrame) and direction == FrameDirection.DOWNSTREAM and current:
                current[0].committed = time.perf_counter()  # the aggregator wrote the user's turn
                watchers.append(asyncio.create_task(_watch_user_turn(service, lambda: tts.conversation, current[0])))
            if not isinstance(frame, LLMContextFrame) or getattr(frame, "speculation", False):
                await self.push_frame(frame, direction)
                return
            if not self.replies:
                return
            times = current[0]
            await self.push_frame(LLMFullResponseStartFrame())
            await _stream_tokens(self.replies.pop(0), opts, times, lambda t: self.push_frame(LLMTextFrame(t)),
                                 lambda: _probe(service, lambda: tts.conversation, times))
            await self.push_frame(LLMFullResponseEndFrame())

    class Sink(FrameProcessor):
        """Where the output transport would be: notes when audio leaves the TTS."""

        def __init__(self):
            super().__init__()
            self.audio_at: list[float] = []
            self.stopped = asyncio.Event()
            self.greeting_first: float | None = None

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                now = time.perf_counter()
                self.audio_at.append(now)
                if current and current[0].first_audio is None and current[0].committed is not None:
                    current[0].first_audio = now
                elif not current and self.greeting_first is None:
                    self.greeting_first = now
            elif isinstance(frame, TTSStoppedFrame):
                self.stopped.set()
            await self.push_frame(frame, direction)

    init_kw, settings_kw, where = _split_options(CSMTTSService.__init__, getattr(CSMTTSService, "Settings", None), opts.split)
    tts = CSMTTSService(
        backend=service, conversation_id="bench-pipecat", **init_kw,
        settings=CSMTTSService.Settings(voice=VOICE_NAME, seed=opts.seed, max_audio_ms=opts.max_audio_ms, **settings_kw),
    )
    stt, llm_, sink = ScriptedSTT(), ScriptedLLM(), Sink()
    context = LLMContext([{"role": "system", "content": AGENT_INSTRUCTIONS}])
    turn_stop = SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=opts.user_speech_timeout_s)
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=EnergyVAD(), user_turn_strategies=UserTurnStrategies(stop=[turn_stop]))
    )
    pipeline = Pipeline([stt, aggregators.user(), llm_, tts, sink, aggregators.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=rate), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())

    speech: list[bytes] = []  # what the microphone sends next; silence when empty
    spoken = asyncio.Event()

    async def microphone() -> None:  # a transport's input: 20 ms frames, always, in real time
        clock, silence = _Clock(chunk_s), bytes(int(rate * chunk_s) * 2)
        while True:
            pcm = speech.pop(0) if speech else silence
            await worker.queue_frame(InputAudioRawFrame(audio=pcm, sample_rate=rate, num_channels=1))
            if pcm is not silence and not speech:
                current[0].voice_end = time.perf_counter()
                spoken.set()
            await clock.tick()

    mic = asyncio.create_task(microphone())
    timed: list[TurnTimes] = []
    greeting_ms = None
    try:
        if await asyncio.wait_for(tts.wait_ready(), opts.timeout_s) is None:
            raise RuntimeError("CSMTTSService could not open its conversation")
        sink.stopped.clear()
        start = time.perf_counter()
        await worker.queue_frame(TTSSpeakFrame(GREETING))
        await _wait(sink.stopped, failed, errors, opts.timeout_s, "pipecat greeting")
        greeting_ms = 1000 * (sink.greeting_first - start) if sink.greeting_first else None
        for i, (line, seconds, reply) in enumerate(script):
            times = TurnTimes(line, reply)
            current[:] = [times]
            stt.lines.append(line)
            llm_.replies.append(reply)
            sink.stopped.clear()
            spoken.clear()
            pcm = float_to_int16(_voice(seconds, seed=20 + i, rate=rate)).tobytes()
            step = int(rate * chunk_s) * 2
            speech.extend(pcm[j : j + step] for j in range(0, len(pcm), step))
            await _wait(spoken, failed, errors, opts.timeout_s, f"pipecat turn {i + 1} (speaking)")
            await _wait(sink.stopped, failed, errors, opts.timeout_s, f"pipecat turn {i + 1}")
            times.done = time.perf_counter()
            _note_first_speak(service, "bench-pipecat", times)
            timed.append(times)
        current.clear()
    finally:
        for task in watchers:
            task.cancel()
        mic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mic
        await worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(running), 60)
        except asyncio.TimeoutError:
            await worker.cancel()
            await asyncio.wait_for(running, 30)
    history = _history_summary(tts.conversation)
    return {
        "adapter": "pipecat_csm.CSMTTSService in a Pipeline (scripted STT -> user aggregator with VAD -> scripted LLM -> TTS)",
        "split": {"requested": opts.split, "passed_as": where, "mode_observed": _observed_mode(history, script)},
        "greeting_first_audio_ms": greeting_ms,
        "turns": [t.summary() for t in timed],
        "history": history,
    }


# --- LiveKit -------------------------------------------------------------------------------------


async def _run_livekit(service, script: list, opts: Options, voice) -> dict:
    from .audio import float_to_int16
    from livekit import rtc
    from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, Agent, AgentSession, llm
    from livekit.agents.voice import io
    from livekit.plugins import csm

    rate, chunk_s = 24_000, 0.05  # RoomIO's input defaults
    current: list[TurnTimes] = []
    errors: list[str] = []
    failed = asyncio.Event()
    watchers: list[asyncio.Task] = []

    class Microphone(io.AudioInput):
        """The session's audio input: 50 ms frames in real time; silence unless the user speaks."""

        def __init__(self):
            super().__init__(label="bench-mic")
            self.speech: list[np.ndarray] = []
            self.spoken = asyncio.Event()
            self._clock: _Clock | None = None
            self._silence = np.zeros(int(rate * chunk_s), dtype=np.int16)

        async def __anext__(self) -> rtc.AudioFrame:
            if self._clock is None:
                self._clock = _Clock(chunk_s)
            await self._clock.tick()
            pcm = self.speech.pop(0) if self.speech else self._silence
            if pcm is not self._silence and not self.speech:
                self.spoken.set()
            return rtc.AudioFrame(pcm.tobytes(), rate, 1, len(pcm))

    class ScriptedLLM(llm.LLM):
        def __init__(self):
            super().__init__()
            self.replies: list[str] = []

        def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **kwargs):
            return _Stream(self, self.replies.pop(0) if self.replies else "", chat_ctx=chat_ctx, tools=tools or [],
                           conn_options=conn_options)

    class _Stream(llm.LLMStream):
        def __init__(self, owner, reply: str, **kwargs):
            super().__init__(owner, **kwargs)
            self._reply = reply

        async def _run(self) -> None:
            if not self._reply or not current:
                return
            times = current[0]

            async def send(token: str) -> None:
                self._event_ch.send_nowait(llm.ChatChunk(id="bench", delta=llm.ChoiceDelta(role="assistant", content=token)))

            await _stream_tokens(self._reply, opts, times, send, lambda: _probe(service, lambda: speech.conversation, times))

    class Output(io.AudioOutput):
        """The session's audio output: notes when audio arrives, 'plays' it instantly."""

        def __init__(self):
            super().__init__(label="bench-out", capabilities=io.AudioOutputCapabilities(pause=False), sample_rate=None)
            self.first: float | None = None
            self._pushed = 0.0

        async def capture_frame(self, frame: rtc.AudioFrame) -> None:
            await super().capture_frame(frame)
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            if current and current[0].first_audio is None:
                current[0].first_audio = now
            if not self._pushed:
                self.on_playback_started(created_at=time.time())
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

    kwargs, _, where = _split_options(csm.TTS.__init__, None, opts.split)
    text, audio, audio_rate = voice
    speech = csm.TTS(backend=service, conversation_id="bench-livekit", seed=opts.seed, max_audio_ms=opts.max_audio_ms,
                     voice=csm.VoicePrompt(text, audio, audio_rate), **kwargs)
    scripted = ScriptedLLM()
    turns = {"turn_detection": None, "interruption": {"resume_false_interruption": False}}
    # LiveKit's default tts_text_transforms (markdown and emoji filters) hold back the end of the
    # text until the next token; livekit_text_transforms=False measures without them.
    extra = {} if opts.livekit_text_transforms else {"tts_text_transforms": None}
    session = AgentSession(llm=scripted, tts=speech, vad=None, turn_handling=turns, **extra)
    mic, out = Microphone(), Output()
    session.input.audio = mic
    session.output.audio = out
    speech.attach(session)  # inside a LiveKit job the TTS finds its session itself

    def on_error(ev) -> None:
        errors.append(f"{type(ev.error).__name__}: {ev.error}")
        if not getattr(ev.error, "recoverable", True):
            failed.set()

    def on_close(ev) -> None:
        if getattr(ev, "error", None) is not None:
            errors.insert(0, f"session closed: {ev.error}")
        failed.set()

    session.on("error", on_error)
    session.on("close", on_close)

    async def playout(handle, what: str) -> None:
        done = asyncio.Event()
        handle.add_done_callback(lambda _: done.set())
        await _wait(done, failed, errors, opts.timeout_s, what)
        if handle.exception() is not None:
            raise RuntimeError(f"{what}: {handle.exception()}")

    timed: list[TurnTimes] = []
    greeting_ms = None
    await session.start(agent=Agent(instructions=AGENT_INSTRUCTIONS), record=False)
    try:
        start = time.perf_counter()
        await playout(session.say(GREETING), "livekit greeting")
        greeting_ms = 1000 * (out.first - start) if out.first else None
        for i, (line, seconds, reply) in enumerate(script):
            times = TurnTimes(line, reply)
            current[:] = [times]
            scripted.replies.append(reply)
            mic.spoken.clear()
            pcm = float_to_int16(_voice(seconds, seed=20 + i, rate=rate))
            step = int(rate * chunk_s)
            started_at = time.time()
            mic.speech.extend(pcm[j : j + step] for j in range(0, len(pcm), step))
            await _wait(mic.spoken, failed, errors, opts.timeout_s, f"livekit turn {i + 1} (speaking)")
            times.voice_end, stopped_at = time.perf_counter(), time.time()
            await asyncio.sleep(opts.stt_final_ms / 1000)  # the STT finalizes its transcript
            # The end of the user's turn, as the session's STT path commits it: the transcript
            # with the speech timing (the TTS takes the user's voice from its audio-input tap).
            message = llm.ChatMessage(role="user", content=[line],
                                      metrics={"started_speaking_at": started_at, "stopped_speaking_at": stopped_at})
            times.committed = time.perf_counter()
            watchers.append(asyncio.create_task(_watch_user_turn(service, lambda: speech.conversation, times)))
            await playout(session.generate_reply(user_input=message), f"livekit turn {i + 1}")
            times.done = time.perf_counter()
            _note_first_speak(service, "bench-livekit", times)
            timed.append(times)
        current.clear()
    finally:
        for task in watchers:
            task.cancel()
        session.off("close", on_close)
        await session.aclose()
        history = _history_summary(speech.conversation)
        await speech.aclose()
    return {
        "adapter": "livekit.plugins.csm.TTS in an AgentSession (scripted LLM, tapped microphone input, capture output)",
        "split": {"requested": opts.split, "passed_as": where, "mode_observed": _observed_mode(history, script)},
        "greeting_first_audio_ms": greeting_ms,
        "turns": [t.summary() for t in timed],
        "history": history,
    }


def _voice(seconds: float, seed: int, rate: int) -> np.ndarray:
    from .bench import voice_like

    return voice_like(seconds, seed=seed, rate=rate)
