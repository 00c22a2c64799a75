"""Mimi decode latency on CPU fp32: our streaming step and whole-sequence decode vs transformers.

Full-size architecture (MimiConfig.full()) with random weights. Prints one JSON object.
Usage: python bench/mimi_decode.py [--threads 2] [--steps 20] [--streams 1,4,16]

`pooled_rows` is the server's per-frame call: n streams, each owning a scattered row of one
pooled state, decoded together by one `decode_step(codes [n, K, 1], pool, rows=[n])`. Its
streams first run `--pool-warm` frames so the 250-step attention window is full (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from csm_plugin.models.mimi import FRAME_SIZE, MimiConfig
from csm_plugin.models.mimi_loading import mimi_from_state_dict, random_mimi_state_dict


def _median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--streams", default="1,4,16", help="stream counts for the pooled-rows measurement ('' to skip)")
    ap.add_argument("--pool-capacity", type=int, default=32)
    ap.add_argument("--pool-warm", type=int, default=125, help="frames each pooled stream decodes before timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = MimiConfig.full()
    sd = random_mimi_state_dict(cfg, seed=0)
    mimi = mimi_from_state_dict(sd, cfg)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, args.frames), generator=g)

    result: dict = {"device": "cpu", "dtype": "float32", "threads": args.threads, "frames": args.frames}

    # Streaming: one frame per call; the state keeps growing (KV ring fills up to 250 steps).
    state = mimi.decode_state(1)
    frame = codes[..., :1]
    result["ours_decode_step_1frame_ms"] = _median_ms(lambda: mimi.decode_step(frame, state), 5, args.steps)
    result["frame_duration_ms"] = 1000 * FRAME_SIZE / cfg.sampling_rate

    def stream_all():
        st = mimi.decode_state(1)
        for i in range(args.frames):
            mimi.decode_step(codes[..., i : i + 1], st)

    result["ours_stream_all_frames_ms"] = _median_ms(stream_all, 1, 3)
    result["ours_decode_all_frames_ms"] = _median_ms(lambda: mimi.decode(codes), 2, 7)

    if args.streams:
        pooled = {"capacity": args.pool_capacity, "warm_frames": args.pool_warm}
        for n in (int(v) for v in args.streams.split(",")):
            pool = mimi.decode_state(args.pool_capacity)
            rows = torch.randperm(args.pool_capacity, generator=g)[:n]  # scattered, like a free list hands them out
            frame_n = torch.randint(0, cfg.codebook_size, (n, cfg.num_quantizers, 1), generator=g)

            def pooled_step(frame_n=frame_n, pool=pool, rows=rows):
                return mimi.decode_step(frame_n, pool, rows=rows)

            for _ in range(args.pool_warm):
                pooled_step()
            ms = _median_ms(pooled_step, 2, args.steps)
            pooled[f"n={n}"] = {"ms_per_frame": ms, "ms_per_stream": round(ms / n, 2)}
        result["pooled_rows"] = pooled

    try:
        import transformers
    except ImportError:
        result["transformers"] = "not installed"
    else:
        with tempfile.TemporaryDirectory() as d:
            save_file(sd, str(Path(d) / "model.safetensors"))
            (Path(d) / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
            ref = transformers.MimiModel.from_pretrained(d).eval()

        def hf_decode():
            with torch.no_grad():
                return ref.decode(codes).audio_values

        result["transformers_version"] = transformers.__version__
        result["transformers_decode_all_frames_ms"] = _median_ms(hf_decode, 2, 7)
        ours, theirs = mimi.decode(codes), hf_decode()
        result["rel_err_vs_transformers"] = float((ours - theirs).norm() / theirs.norm())
        result["audio_std"] = float(theirs.std())
    # Other processes on a small machine distort CPU timings badly (OpenMP threads spin); record it.
    result["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
