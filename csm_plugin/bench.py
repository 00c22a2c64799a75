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

import asyncio
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import bench_agent_turn
from .engine import FRAME_MS, Engine, InferenceWorker, Sampling
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
            engine.decode_frames(codes[None], [stream.slot])
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
    """A CSMService on the bench's inference worker (its engine has the bench's random weights,
    built in memory): the service path and both adapters (`backend=`) run on the very engine,
    and on the very thread, that the engine figures come from. One thread runs every use of an
    engine, as in the product (an Engine and its GraphedSteps are not thread-safe).
    The worker outlives the service (closing the service leaves it running)."""

    def __init__(self, worker: Engine | InferenceWorker, **options):
        if isinstance(worker, Engine):  # an engine nobody else runs: a worker of its own
            engine, worker = worker, None
            worker = InferenceWorker(lambda: engine, name="csm-bench")
            self._owns_worker = True
        else:
            self._owns_worker = False
        engine = worker.ready.result()
        super().__init__("<bench: random weights in memory>", max_cached_conversations=len(engine.slots), **options)
        self._bench_worker = worker

    async def start(self) -> CSMService:
        self._worker = self._bench_worker
        await asyncio.wrap_future(self._worker.ready)
        return self

    async def close(self) -> None:
        if not self._owns_worker:
            self._worker = None  # the bench's worker goes on (its owner stops it)
        await super().close()


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


async def service_first_audio(worker: Engine | InferenceWorker, context: list[Segment],
                              voice_prompt_seconds: float = VOICE_PROMPT_SECONDS, samples: int = 3) -> dict:
    """First audio through the conversation service (asyncio, the inference thread, chunking):
    a warm conversation (its 30 s context cached); the same conversation with a styled reply
    and an unstyled one, alternated; the first reply of a new conversation whose pinned voice
    prompt of `voice_prompt_seconds` is new to the service (`new_conversation_voice_first`) and
    of one that follows another conversation with the same voice (`new_conversation_voice`: the
    voice rows are copied from the shared prefix store, not prefilled again)."""
    from .service import Exemplar

    rate = 24_000
    out: dict = {}
    async with EngineService(worker) as service:
        engine = service.engine
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
        voice_prompt_seconds: float = VOICE_PROMPT_SECONDS, agent_turn: bool | dict = False,
        compile_batches: list[int] | None = None) -> dict:
    """The whole bench as one JSON-able dict. agent_turn: True (or a dict of
    csm_plugin.bench_agent_turn.run options) also runs a voice agent's turns through the
    framework adapters (`agent_turn` in the result). compile_batches: the batch sizes compiled
    (default: powers of two up to the streams); fewer compile sooner."""
    from .engine import parse_dtype

    dt = parse_dtype(dtype)
    frames = frames or (30 if size == "tiny" else 6)
    checkpoint, weights, mimi_cfg = build(size, device, dt, quantize)
    compile_s = 0.0

    def load() -> Engine:  # on the worker's thread, like every other use of the engine below
        nonlocal compile_s
        engine = Engine(checkpoint, slots=max(2, streams), compile=compile, compile_batches=compile_batches)
        started = time.perf_counter()
        engine.warm_up()
        compile_s = time.perf_counter() - started
        return engine

    worker = InferenceWorker(load, name="csm-bench")
    try:
        result = _run_on(worker, checkpoint, size, device, dtype, quantize, compile, frames, streams, voice_prompt_seconds, agent_turn)
    finally:
        worker.stop()
    result["settings"]["compile_s"] = round(compile_s, 1) if compile else None
    result["settings"]["compile_batches"] = worker.engine.generator.batches if compile else None
    result["settings"]["cuda_graphs"] = worker.engine.cuda_graphs
    if baseline:
        import transformers

        context = conversation(CONTEXT_SECONDS)
        result["versions"]["transformers"] = transformers.__version__
        base = transformers_baseline(checkpoint, weights, mimi_cfg, context, frames)
        result["baseline_transformers_generate"] = base
        result["ratios"] = {
            "frame_time_speedup": base["frame_ms"] / (result["per_frame"]["backbone_ms"] + result["per_frame"]["depth_ms"]),
            "first_audio_speedup_warm": 1000 * base["time_to_first_frame_s"] / result["time_to_first_audio_ms"]["warm_conversation"],
        }
    return result


def _run_on(worker: InferenceWorker, checkpoint, size, device, dtype, quantize, compile, frames, streams,
            voice_prompt_seconds, agent_turn) -> dict:
    """The engine, service and agent-turn figures, every use of the engine on `worker`'s thread."""
    def on_worker(fn, *args):
        return worker.submit(fn, *args).result()

    from . import __version__

    context = conversation(CONTEXT_SECONDS)
    keyed = [(i, s) for i, s in enumerate(context)]
    sampling = Sampling(seed=0, max_audio_ms=60_000)

    on_worker(Engine.prefill_context, "warm", keyed)  # the conversation so far is cached, as in a live call
    on_worker(time_to_first_audio, "warm", keyed, sampling)  # warm-up
    warm = statistics.median(on_worker(time_to_first_audio, "warm", keyed, sampling) for _ in range(3))
    cold = []
    for i in range(2):
        on_worker(Engine.release, "cold")
        cold.append(on_worker(time_to_first_audio, "cold", keyed, sampling))
    on_worker(Engine.release, "cold")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None},
        "versions": {"csm_plugin": __version__, "torch": torch.__version__},
        "settings": {"size": size, "device": device, "dtype": dtype, "quantize": quantize, "compile": compile,
                     "context_seconds": CONTEXT_SECONDS,
                     "context_rows": int(build_prompt(checkpoint.tokenizer, context, 1, REPLY_TEXT)[0].shape[0])},
        "time_to_first_audio_ms": {"warm_conversation": 1000 * warm, "full_reprefill": 1000 * min(cold)},
        "per_frame": on_worker(per_frame_split, keyed, sampling, frames),
        "concurrency": on_worker(concurrent_streams, keyed, streams, max(5, frames)),
    }
    result["time_to_first_audio_ms"]["prefix_cache_speedup"] = result["time_to_first_audio_ms"]["full_reprefill"] / result["time_to_first_audio_ms"]["warm_conversation"]
    result["settings"]["voice_prompt_seconds"] = voice_prompt_seconds
    result["settings"]["style_exemplar_seconds"] = [seconds for _, _, seconds in STYLE_EXEMPLARS]
    served = asyncio.run(service_first_audio(worker, context, voice_prompt_seconds))
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
        result["agent_turn"] = bench_agent_turn.run(worker, **options)
        result["targets"]["llm_first_token_to_first_audio"] = bench_agent_turn.target_summary(result["agent_turn"])
    return result


if __name__ == "__main__":  # `python -m csm_plugin.bench ...` is `csm-plugin bench ...`
    import sys

    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
