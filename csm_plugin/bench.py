"""`csm-plugin bench`: speed of this engine against transformers' `generate` on the same weights.

Random weights of the chosen shape (tiny or the full CSM-1B / Mimi), built in memory, so nothing
is downloaded. Figures are ratios against the baseline measured in the same run; absolute times
depend on the machine, which the JSON records.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

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

CONTEXT_SECONDS = 30
REPLY_TEXT = "Sure, I can help you with that. Let me pull up your order."


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


def run(size="tiny", device="cpu", dtype="float32", streams=64, frames=None, baseline=True, quantize=None, compile=False) -> dict:
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


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.size, args.device, args.dtype, args.streams, args.frames, not args.no_baseline, args.quantize, args.compile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
