"""Bounded load test: N concurrent short conversations through RemoteBackend.

    python bench/load_test.py --url http://127.0.0.1:8080 --api-key $CSM_API_KEY --conversations 50 --turns 2

Each conversation adds a user turn and speaks a short reply, `turns` times. Prints JSON figures:
completed conversations, errors, lost turns (history shorter than expected), wall time, audio
produced, aggregate real-time factor, time to first audio (client side) percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from csm_plugin.client import RemoteBackend


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(url: str, api_key: str | None, conversations: int = 50, turns: int = 2, reply_ms: float = 240,
                   timeout: float = 300) -> dict:
    backend = await RemoteBackend(url, api_key=api_key, reconnect_timeout=60).start()
    first_audio: list[float] = []
    audio_ms = 0.0

    async def one(i: int) -> int:
        nonlocal audio_ms
        conv = backend.conversation(f"load-{i}")
        for t in range(turns):
            await conv.add_segment(1, f"Caller {i} asks question number {t}.")
            start, first = time.perf_counter(), None
            async for chunk in conv.speak(f"Answer {t} for caller {i}.", seed=1000 * i + t, max_audio_ms=reply_ms):
                first = first or time.perf_counter() - start
                audio_ms += chunk.duration_ms
            first_audio.append(first if first is not None else float("nan"))
        return len(conv.history)

    start = time.perf_counter()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(conversations)), return_exceptions=True), timeout)
    finally:
        await backend.close()
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    lost = sum(2 * turns - r for r in results if not isinstance(r, BaseException))
    return {
        "conversations": conversations,
        "turns_per_conversation": turns,
        "completed": len(results) - len(errors),
        "errors": len(errors),
        "error_examples": sorted({f"{type(e).__name__}: {e}" for e in errors})[:3],
        "lost_turns": lost,
        "wall_s": round(wall, 2),
        "audio_s": round(audio_ms / 1000, 2),
        "aggregate_rtf": round(wall / max(audio_ms / 1000, 1e-9), 3),
        "replies_per_s": round(conversations * turns / wall, 2),
        "ttfa_p50_ms": round(1000 * _percentile(first_audio, 0.5), 1),
        "ttfa_p95_ms": round(1000 * _percentile(first_audio, 0.95), 1),
        "ttfa_max_ms": round(1000 * max(first_audio, default=float("nan")), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", default=None, help="default: $CSM_API_KEY")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--reply-ms", type=float, default=240)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    figures = asyncio.run(run_load(args.url, args.api_key, args.conversations, args.turns, args.reply_ms, args.timeout))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
