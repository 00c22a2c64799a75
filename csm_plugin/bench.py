"""`csm-plugin bench`: speed of this engine against transformers' `generate` on the same weights.

Random weights of the chosen shape (tiny or the full CSM-1B / Mimi), built in memory, so nothing
is downloaded. Figures are ratios against the baseline measured in the same run; absolute times
depend on the machine, which the JSON records.

Besides the engine figures, the same engine is measured through the conversation service
(`service_first_audio`): a new conversation whose pinned voice prompt was used by an earlier one
(its cache rows shared), and a styled reply against an unstyled one. With `agent_turn=True`
(`--agent-turn`), a voice agent's turn runs through each framework adapter
(csm_plugin.bench_agent_turn).

    python -m csm_plugin.bench --size tiny --agent-turn --json out.json   # the same as csm-plugin bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import bench_agent_turn
from .engine import FRAME_MS, Engine, Sampling
from .models.csm import csm_1b_config
from .models.loading import (
    LoadedCheckpoint,
    bundled_tokenizer_file,
    build_model,
    from_internal,
    hf_config,
    random_weights,
    tiny_config,
)
from .models.mimi import MimiConfig
from .models.mimi_loading import mimi_from_state_dict, random_mimi_state_dict
from .prompt import Segment, TextTokenizer, build_prompt
from .service import CSMService

CONTEXT_SECONDS = 30
REPLY_TEXT = "Sure, I can help you with that. Let me pull up your order."
VOICE_PROMPT_SECONDS = 10.0
VOICE_TEXT = ("Hi, thanks for calling the parcel service. My name is Maya and I will be looking after you today, "
              "so just tell me what happened and we will sort it out together.")
# A style as a voices file has it (examples/voices/voices.json): a user line and the agent's answer.
STYLE_EXEMPLARS = [
    (1, "My flight got cancelled and I am stuck at the airport.", 3.0),
    (0, "Oh no, I'm so sorry. That sounds really stressful. We'll sort this out together.", 4.0),
]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _now(device) -> float:
    _sync(device)
    return time.perf_counter()


def build(size: str, device: str, dtype: torch.dtype, quantize: str | None, seed: int = 0):
    cfg = tiny_config() if size == "tiny" else csm_1b_config()
    mimi_cfg = MimiConfig.tiny() if size == "tiny" else MimiConfig.full()
    weights = random_weights(cfg, seed, std=0.1 if size == "tiny" else 0.02)
    model = build_model(cfg, weights, device=device, dtype=dtype, quantize=quantize)
    codec = mimi_from_state_dict(random_mimi_state_dict(mimi_cfg, seed + 1), mimi_cfg).to(device).eval()
    tokenizer = TextTokenizer.from_file(bundled_tokenizer_file())
    return LoadedCheckpoint(Path("<random>"), "hf", cfg, model, tokenizer, codec), weights, mimi_cfg


def conversation(seconds: float, seed: int = 0) -> list[Segment]:
    """A two-speaker history with `seconds` of audio (random codes), in turns of about 5 s."""
    g = torch.Generator().manual_seed(seed)
    turns, left = [], int(seconds * 1000 / FRAME_MS)
    while left > 0:
        frames = min(left, 62)
        turns.append(Segment(len(turns) % 2, f"This is turn number {len(turns)} of our call.", torch.randint(0, 2048, (frames, 32), generator=g)))
        left -= frames
    return turns


def time_to_first_audio(engine: Engine, owner, context, sampling) -> float:
    start = _now(engine.generator.device)
    stream = engine.start(owner, context, 1, REPLY_TEXT, sampling)
    engine.step(stream)
    elapsed = _now(engine.generator.device) - start
    engine.finish(stream, None, None)
    return elapsed


def per_frame_split(engine: Engine, context, sampling, frames: int) -> dict:
    """Frame by frame, timing the backbone step, the depth decoder (with sampling) and Mimi."""
    device = engine.generator.device
    g = engine.generator
    stream = engine.start("split", context, 1, REPLY_TEXT, sampling)
    parts: dict[str, list[float]] = {"backbone_ms": [], "depth_ms": [], "codec_ms": []}
    with torch.inference_mode():
        for i in range(frames):
            t0 = _now(device)
            if stream.codes:
                stream.h = g.feed_frames(torch.tensor([stream.slot]), stream.codes[-1][None], torch.tensor([stream.frames_start + i - 1]))
            t1 = _now(device)
            codes = g.sample_frames(stream.h, [sampling.seed], [i], [sampling.temperature], [sampling.top_k])[0].cpu()
            t2 = _now(device)
            engine.codec.decode_step(codes[None, :, None], engine.codec_state, rows=torch.tensor([stream.slot]))
            t3 = _now(device)
            stream.codes.append(codes)
            if i:  # the first frame has no backbone step of its own (the prefill made it)
                parts["backbone_ms"].append(1000 * (t1 - t0))
            parts["depth_ms"].append(1000 * (t2 - t1))
            parts["codec_ms"].append(1000 * (t3 - t2))
    engine.finish(stream, None, None)  # a slot is freed only once nothing writes into it
    engine.release("split")
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["frame_ms"] = sum(out.values())
    out["real_time_factor"] = out["frame_ms"] / FRAME_MS
    return out


def concurrent_streams(engine: Engine, context, max_streams: int, frames: int) -> dict:
    """The most streams that advance together with the 95th percentile frame interval under
    80 ms (batch sizes 1, 2, 4, ...)."""
    results, best = {}, 0
    n = 1
    while n <= max_streams:
        streams = [engine.start(f"c{i}", context, 1, REPLY_TEXT, Sampling(seed=i, max_audio_ms=60_000)) for i in range(n)]
        engine.step_many(streams)  # warm-up round
        intervals = []
        for _ in range(frames):
            t = _now(engine.generator.device)
            engine.step_many([s for s in streams if not s.done])
            intervals.append(1000 * (_now(engine.generator.device) - t))
        for i, s in enumerate(streams):
            engine.finish(s, None, None)
            engine.release(f"c{i}")
        p95 = float(np.percentile(intervals, 95))
        results[n] = round(p95, 2)
        if p95 >= FRAME_MS:
            break
        best = n
        n *= 2
    return {"max_realtime_streams": best, "p95_frame_interval_ms_by_streams": results}


def transformers_baseline(checkpoint: LoadedCheckpoint, weights, mimi_cfg, context, frames: int) -> dict:
    """transformers' CsmForConditionalGeneration.generate on the same weights (shared, not copied)."""
    import transformers

    transformers.logging.set_verbosity_error()  # its config warnings about the random vocabulary would mix into our JSON
    cfg = checkpoint.config
    device, dtype = checkpoint.model.codebook0_head.weight.device, checkpoint.model.codebook0_head.weight.dtype
    with torch.device(device):  # its own buffers must be real; its random weights are replaced below
        model = transformers.CsmForConditionalGeneration(transformers.CsmConfig(**hf_config(cfg, mimi_cfg.to_hf_dict())))
    state = {k: v.to(device, dtype) for k, v in from_internal(weights, "hf", cfg).items()}
    state["depth_decoder.model.embed_tokens.weight"] = state["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.codec_model = None  # not used by generate without audio output
    model.eval()
    tokens, mask = build_prompt(checkpoint.tokenizer, context, 1, REPLY_TEXT)
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.no_grad():
        text = model.embed_text_tokens(tokens[:, -1])
        audio = model.backbone_model.embed_tokens(tokens[None, :, :-1])[0]
        embeds = torch.where(mask[:, -1:], text, audio)[None]

        def generate(n):
            start = _now(device)
            model.generate(inputs_embeds=embeds, do_sample=True, top_k=50, temperature=0.9, depth_decoder_do_sample=True,
                           depth_decoder_top_k=50, depth_decoder_temperature=0.9, max_new_tokens=n)
            return _now(device) - start

        generate(1)  # warm-up
        first = generate(1)
        longer = generate(1 + frames)
    return {"time_to_first_frame_s": first, "frame_ms": 1000 * (longer - first) / frames}


def voice_like(seconds: float, seed: int = 0, rate: int = 24_000) -> np.ndarray:
    """Speech-like test audio (a gliding tone with syllable-rate bursts and a little noise),
    float32 mono at `rate`: what voice prompts, exemplars and user turns are made of here."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    tone = np.sin(2 * np.pi * np.cumsum(pitch) / rate)
    bursts = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + seed) ** 2
    return (0.25 * tone * bursts + 0.02 * g.standard_normal(t.shape)).astype(np.float32)


class EngineService(CSMService):
    """A CSMService over an engine that already exists (the bench's random weights, built in
    memory): the service path and both adapters (`backend=`) run on the very engine the engine
    figures come from. The engine is the service's inference thread's until the service closes."""

    def __init__(self, engine: Engine, **options):
        super().__init__("<bench: random weights in memory>", max_cached_conversations=len(engine.slots), **options)
        self._bench_engine = engine

    def _load_engine(self) -> Engine:
        return self._bench_engine  # built and warmed up by the bench


async def _idle(service) -> None:
    """Wait until the inference worker has run everything submitted so far (a no-op job: jobs
    start in order, and a finished reply's cache update is a single job)."""
    await service._submit(lambda engine: None)


async def _cached(service, conv, timeout: float = 600.0) -> None:
    """Wait until the conversation's whole context is in its cache slot (the background prefills
    of add_segment are done)."""
    want = [key for key, _ in conv._keyed()]
    deadline = time.perf_counter() + timeout
    while await service._submit(lambda engine: engine.cached_keys(conv.id)) != want:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the context of {conv.id!r} was not cached within {timeout:g} s")
        await asyncio.sleep(0.01)


async def first_audio_ms(conv, text: str = REPLY_TEXT, **options) -> float:
    """Milliseconds from asking the service for a reply to its first audio chunk (the reply is
    then stopped: the history keeps its first frame, as a barge-in would)."""
    await _idle(conv.service)
    reply = conv.speak(text, seed=0, max_audio_ms=2_000, **options)
    start = time.perf_counter()
    try:
        await reply.__anext__()
        return 1000 * (time.perf_counter() - start)
    finally:
        await reply.aclose()


async def service_first_audio(engine: Engine, context: list[Segment], voice_prompt_seconds: float = VOICE_PROMPT_SECONDS,
                              samples: int = 3) -> dict:
    """First audio through the conversation service (asyncio, the inference thread, chunking):
    a warm conversation (its 30 s context cached); the same conversation with a styled reply
    and an unstyled one, alternated; the first reply of a new conversation whose pinned voice
    prompt of `voice_prompt_seconds` is new to the service (`new_conversation_voice_first`) and
    of one that follows another conversation with the same voice (`new_conversation_voice`: the
    voice rows are copied from the shared prefix store, not prefilled again)."""
    from .service import Exemplar

    rate = 24_000
    out: dict = {}
    async with EngineService(engine) as service:
        warm = service.conversation("bench-warm")
        for segment in context:
            await warm.add_segment(segment.speaker, segment.text, codes=segment.codes)
        await _cached(service, warm)
        await first_audio_ms(warm)  # warm-up
        out["warm_conversation_service"] = statistics.median([await first_audio_ms(warm) for _ in range(samples)])

        exemplars = [Exemplar(speaker, text, voice_like(seconds, seed=10 + i), rate)
                     for i, (speaker, text, seconds) in enumerate(STYLE_EXEMPLARS)]
        await service.add_style("comforting", exemplars)
        await first_audio_ms(warm, style="comforting")  # warm-up
        plain, styled = [], []
        for _ in range(samples):  # alternated, so both see the same (slowly growing) history
            plain.append(await first_audio_ms(warm))
            styled.append(await first_audio_ms(warm, style="comforting"))
        out["unstyled_reply"] = statistics.median(plain)
        out["styled_reply"] = statistics.median(styled)
        out["styled_reply_extra_ms"] = out["styled_reply"] - out["unstyled_reply"]
        out["style_exemplar_rows"] = sum(service._rows(s) for s in service._style("comforting").segments)
        await warm.close()

        wav = voice_like(voice_prompt_seconds, seed=1)
        first, shared = [], []
        hits = engine.prefixes.hits
        for i in range(samples):  # each sample registers a voice new to the service (a new prefix)
            name = f"bench-voice-{i}"
            voice = await service.add_voice(name, text=VOICE_TEXT, audio=wav, sample_rate=rate)
            a = service.conversation(f"bench-voice-{i}-a", voices={0: name})
            first.append(await first_audio_ms(a))
            b = service.conversation(f"bench-voice-{i}-b", voices={0: name})  # a is still open: another call
            shared.append(await first_audio_ms(b))
            await a.close()
            await b.close()
        out["new_conversation_voice_first"] = statistics.median(first)
        out["new_conversation_voice"] = statistics.median(shared)
        out["voice_prompt_rows"] = service._rows(Segment(0, VOICE_TEXT, voice.codes))
        out["voice_prefix_hits"] = engine.prefixes.hits - hits
    return out


def run(size="tiny", device="cpu", dtype="float32", streams=64, frames=None, baseline=True, quantize=None, compile=False,
        voice_prompt_seconds: float = VOICE_PROMPT_SECONDS, agent_turn: bool | dict = False) -> dict:
    """The whole bench as one JSON-able dict. agent_turn: True (or a dict of
    csm_plugin.bench_agent_turn.run options) also runs a voice agent's turns through the
    framework adapters (`agent_turn` in the result)."""
    from . import __version__
    from .engine import parse_dtype

    dt = parse_dtype(dtype)
    frames = frames or (30 if size == "tiny" else 6)
    checkpoint, weights, mimi_cfg = build(size, device, dt, quantize)
    engine = Engine(checkpoint, slots=max(2, streams), compile=compile)
    started = time.perf_counter()
    engine.generator.warm_up()
    compile_s = time.perf_counter() - started
    context = conversation(CONTEXT_SECONDS)
    keyed = [(i, s) for i, s in enumerate(context)]
    sampling = Sampling(seed=0, max_audio_ms=60_000)

    engine.prefill_context("warm", keyed)  # the conversation so far is cached, as in a live call
    time_to_first_audio(engine, "warm", keyed, sampling)  # warm-up
    warm = statistics.median(time_to_first_audio(engine, "warm", keyed, sampling) for _ in range(3))
    cold = []
    for i in range(2):
        engine.release("cold")
        cold.append(time_to_first_audio(engine, "cold", keyed, sampling))
    engine.release("cold")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None},
        "versions": {"csm_plugin": __version__, "torch": torch.__version__},
        "settings": {"size": size, "device": device, "dtype": dtype, "quantize": quantize, "compile": compile,
                     "compile_s": round(compile_s, 1) if compile else None, "context_seconds": CONTEXT_SECONDS,
                     "context_rows": int(build_prompt(checkpoint.tokenizer, context, 1, REPLY_TEXT)[0].shape[0])},
        "time_to_first_audio_ms": {"warm_conversation": 1000 * warm, "full_reprefill": 1000 * min(cold)},
        "per_frame": per_frame_split(engine, keyed, sampling, frames),
        "concurrency": concurrent_streams(engine, keyed, streams, frames=max(5, frames)),
    }
    result["time_to_first_audio_ms"]["prefix_cache_speedup"] = result["time_to_first_audio_ms"]["full_reprefill"] / result["time_to_first_audio_ms"]["warm_conversation"]
    result["settings"]["voice_prompt_seconds"] = voice_prompt_seconds
    result["settings"]["style_exemplar_seconds"] = [seconds for _, _, seconds in STYLE_EXEMPLARS]
    served = asyncio.run(service_first_audio(engine, context, voice_prompt_seconds))
    ttfa = result["time_to_first_audio_ms"]
    ttfa.update({k: served[k] for k in ("warm_conversation_service", "new_conversation_voice", "new_conversation_voice_first",
                                         "unstyled_reply", "styled_reply", "styled_reply_extra_ms")})
    result["service"] = {k: served[k] for k in ("voice_prompt_rows", "voice_prefix_hits", "style_exemplar_rows")}
    ratio = ttfa["new_conversation_voice"] / ttfa["warm_conversation"]
    result["targets"] = {
        "new_conversation_voice_vs_warm": {
            "ratio": ratio, "target": 1.3, "met": ratio <= 1.3,
            "ratio_vs_warm_conversation_service": ttfa["new_conversation_voice"] / ttfa["warm_conversation_service"],
        },
    }
    result["ratios_service"] = {
        "voice_prefix_sharing_speedup": ttfa["new_conversation_voice_first"] / ttfa["new_conversation_voice"],
        "styled_over_unstyled": ttfa["styled_reply"] / ttfa["unstyled_reply"],
    }
    if agent_turn:
        options = agent_turn if isinstance(agent_turn, dict) else {}
        result["agent_turn"] = bench_agent_turn.run(engine, **options)
        result["targets"]["llm_first_token_to_first_audio"] = bench_agent_turn.target_summary(result["agent_turn"])
    if baseline:
        import transformers

        result["versions"]["transformers"] = transformers.__version__
        base = transformers_baseline(checkpoint, weights, mimi_cfg, context, frames)
        result["baseline_transformers_generate"] = base
        result["ratios"] = {
            "frame_time_speedup": base["frame_ms"] / (result["per_frame"]["backbone_ms"] + result["per_frame"]["depth_ms"]),
            "first_audio_speedup_warm": 1000 * base["time_to_first_frame_s"] / result["time_to_first_audio_ms"]["warm_conversation"],
        }
    return result


def build_parser() -> argparse.ArgumentParser:
    """`python -m csm_plugin.bench`: the options of `csm-plugin bench` and the agent-turn ones."""
    p = argparse.ArgumentParser(prog="python -m csm_plugin.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--frames", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json")
    bench_agent_turn.add_arguments(p)
    return p


def main(args) -> dict:
    from .threads import configure_threads

    configure_threads(args.threads)
    result = run(args.size, args.device, args.dtype, args.streams, args.frames, not args.no_baseline, args.quantize, args.compile,
                 voice_prompt_seconds=getattr(args, "voice_prompt_seconds", VOICE_PROMPT_SECONDS),
                 agent_turn=bench_agent_turn.options_from_args(args))
    from .cli import bench_table

    text = json.dumps(result, indent=2)
    rows = bench_agent_turn.table_rows(result)
    width = max(len(k) for k, _ in rows)
    print(bench_table(result) + "\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main(build_parser().parse_args())
