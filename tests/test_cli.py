"""The command line: speak, demo, make-test-checkpoint, and what a newcomer meets first: help,
--version, progress, one-line errors (exit 2) that come before the model loads."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import csm_plugin
from csm_plugin import cli
from csm_plugin.cli import build_parser, main
from csm_plugin.models.loading import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def speak(ckpt, out, *extra):
    return main(["speak", "--model", str(ckpt), "--text", "Hello there.", "--seed", "3", "--out", str(out), *extra])


@pytest.mark.slow
def test_speak_writes_a_wav_matching_its_frames(hf_checkpoint, tmp_path):
    assert speak(hf_checkpoint, tmp_path / "a.wav", "--codes", str(tmp_path / "a.npy")) == 0
    wav, rate = sf.read(tmp_path / "a.wav", dtype="int16")
    codes = np.load(tmp_path / "a.npy")
    info = sf.info(tmp_path / "a.wav")
    assert rate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert codes.ndim == 2 and codes.shape[1] == 32 and len(wav) == codes.shape[0] * 1920 > 0
    assert np.abs(wav).max() > 0
    # the same seed gives the same audio; another seed does not
    assert speak(hf_checkpoint, tmp_path / "b.wav") == 0
    assert speak(hf_checkpoint, tmp_path / "c.wav", "--seed", "4") == 0
    assert np.array_equal(sf.read(tmp_path / "b.wav", dtype="int16")[0], wav)
    other = sf.read(tmp_path / "c.wav", dtype="int16")[0]
    n = min(len(other), len(wav))
    assert not np.array_equal(other[:n], wav[:n])


@pytest.mark.slow
def test_context_audio_at_any_rate_conditions_the_reply(hf_checkpoint, tmp_path):
    sf.write(tmp_path / "u16k.wav", tone(1.0, 16_000), 16_000)
    sf.write(tmp_path / "u44k.wav", tone(1.0, 44_100), 44_100)
    (tmp_path / "ctx.json").write_text(json.dumps([
        {"speaker": 1, "text": "Hi, I have a question.", "audio": "u16k.wav"},
        {"speaker": 0, "text": "Sure, go ahead."},
        {"speaker": 1, "text": "It is about my bill.", "audio": "u44k.wav"},
    ]))
    assert speak(hf_checkpoint, tmp_path / "ctx.wav", "--context", str(tmp_path / "ctx.json")) == 0
    assert speak(hf_checkpoint, tmp_path / "plain.wav") == 0
    with_ctx, plain = sf.read(tmp_path / "ctx.wav")[0], sf.read(tmp_path / "plain.wav")[0]
    n = min(len(with_ctx), len(plain))
    assert not np.allclose(with_ctx[:n], plain[:n])  # the context changed what was said


@pytest.mark.parametrize("audio,message", [(tone(1.0, 16_000, channels=2), "channels"), (np.zeros(0, np.float32), "")])
def test_stereo_or_empty_context_audio_is_a_clear_error(hf_checkpoint, tmp_path, capsys, audio, message):
    sf.write(tmp_path / "bad.wav", audio, 16_000)
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "Hi.", "audio": "bad.wav"}]))
    assert speak(hf_checkpoint, tmp_path / "x.wav", "--context", str(tmp_path / "ctx.json")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("channels" in err if message else "empty" in err or "cannot read" in err)
    assert not (tmp_path / "x.wav").exists()


def test_unavailable_model_says_how_to_fix_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["speak", "--model", "sesame/csm-1b", "--text", "Hi.", "--out", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "sesame/csm-1b" in err and "make-test-checkpoint" in err


@pytest.mark.slow
def test_make_test_checkpoint_and_demo(tmp_path, monkeypatch, capsys):
    assert main(["make-test-checkpoint", str(tmp_path / "ckpt"), "--format", "sesame", "--seed", "2"]) == 0
    assert load_checkpoint(tmp_path / "ckpt").format == "sesame"
    assert "noise" in capsys.readouterr().out  # the test checkpoint says what it is
    assert main(["demo", "--model", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    announced = [line.split(",")[0] for line in out.splitlines() if line.startswith("line ")]
    assert announced == ["line 1 of 3", "line 2 of 3", "line 3 of 3"]  # each line is announced as it starts
    lines = sorted(p.name for p in (tmp_path / "out").glob("*.wav"))
    assert lines == ["demo_1_speaker0.wav", "demo_2_speaker1.wav", "demo_3_speaker0.wav", "demo_conversation.wav"]
    total = sum(len(sf.read(tmp_path / "out" / n)[0]) for n in lines[:3])
    assert len(sf.read(tmp_path / "out" / "demo_conversation.wav")[0]) == total


# --- what a newcomer meets first -------------------------------------------------------------------


def one_line_error(err: str) -> str:
    """The whole of stderr is one `error:` line (no traceback); returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version_and_verbose_after_the_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"csm-plugin {csm_plugin.__version__}"
    parser = build_parser()
    base = ["--text", "Hi.", "--out", "x.wav"]
    assert parser.parse_args(["speak", *base]).verbose is False
    for argv in (["-v", "speak", *base], ["speak", "-v", *base], ["speak", *base, "--verbose"]):
        assert parser.parse_args(argv).verbose is True, argv
    assert parser.parse_args(["serve", "-v"]).verbose is True


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["speak", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 0.9)", "(default: 50)", "(default: auto)", "(default: float32)", "(default: 0)"):
        assert default in text, default
    assert "default: 0, so every run with the same inputs sounds the same" in text  # --seed
    assert "$CSM_THREADS" in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--threads THREADS, --torch-threads THREADS" in capsys.readouterr().out


@pytest.mark.slow
def test_progress_is_logged_by_default_and_debug_with_v(hf_checkpoint, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    assert speak(hf_checkpoint, tmp_path / "a.wav") == 0
    assert logging.getLogger("csm_plugin").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("aiohttp.access").getEffectiveLevel() == logging.INFO
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("csm_plugin")]
    assert any(m.startswith("loading ") for m in messages) and any(m.startswith("model ready in") for m in messages)
    assert any("of audio so far" in m for m in messages)  # a line every 2 s of generated audio
    assert "noise" in capsys.readouterr().err  # the test checkpoint's audio is noise, and the CLI says so
    assert main(["speak", "-v", "--model", str(hf_checkpoint), "--text", "Hi.", "--out", str(tmp_path / "b.wav")]) == 0
    assert logging.getLogger("csm_plugin").getEffectiveLevel() == logging.DEBUG
    logging.getLogger("csm_plugin").setLevel(logging.INFO)


def test_threads_option_sets_torch_threads_and_the_caller_keeps_its_own(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(cli, "load_engine", lambda model, args: seen.append(torch.get_num_threads()))  # no model work
    monkeypatch.setattr(cli, "encode_context", lambda context, engine: [])
    monkeypatch.setattr(cli, "speak_to_file", lambda *args, **kwargs: None)
    monkeypatch.delenv("CSM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert speak("m", tmp_path / "a.wav", "--threads", "2") == 0
    monkeypatch.setenv("CSM_THREADS", "3")
    assert speak("m", tmp_path / "b.wav") == 0
    monkeypatch.delenv("CSM_THREADS")
    assert speak("m", tmp_path / "c.wav") == 0
    assert seen == [2, 3, 1] and torch.get_num_threads() == before


def test_bad_thread_counts_are_one_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        main(["speak", "--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--threads", "0"])
    assert exit.value.code == 2 and "--threads" in capsys.readouterr().err
    monkeypatch.setenv("CSM_THREADS", "lots")
    assert main(["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "x.wav")]) == 2
    assert "CSM_THREADS" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("device,says", [("mps", "not supported"), ("gpu", "unknown device"), ("cuda:x", "unknown device")])
def test_unsupported_device_is_one_line_before_loading(tmp_path, capsys, device, says):
    argv = ["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--device", device]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert says in line and "cpu" in line and "checkpoint" not in line


@pytest.mark.parametrize("build,says", [(None, "CPU-only build"), ("12.8", "no usable CUDA GPU")])
def test_cuda_without_a_usable_gpu_is_one_line(tmp_path, capsys, monkeypatch, build, says):
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--device", "cuda"]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert says in line and "--device cpu" in line


def test_device_defaults_to_the_gpu_when_one_is_usable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.resolve_device("auto") == "cuda" and cli.resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == "cpu"
    assert build_parser().parse_args(["speak", "--text", "Hi.", "--out", "x.wav"]).device == "auto"


def test_serve_options_device_default_and_exit_status(monkeypatch):
    import csm_plugin.server.run as run

    configs = []
    monkeypatch.setattr(run, "main", lambda config: configs.append(config) or 2)  # as when the model fails to load
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CSM_DEVICE", raising=False)
    assert main(["serve", "--model", "m", "--no-auth", "--torch-threads", "3"]) == 2  # the server's status is the exit status
    assert main(["serve", "--model", "m", "--no-auth", "--threads", "4", "--device", "cpu"]) == 2
    monkeypatch.setenv("CSM_DEVICE", "cpu")
    assert main(["serve", "--model", "m", "--no-auth"]) == 2
    assert [(c.device, c.torch_threads) for c in configs] == [("cuda", 3), ("cpu", 4), ("cpu", None)]


def test_serve_takes_tls_and_metrics_port_options(monkeypatch, tmp_path):
    import csm_plugin.server.run as run

    configs = []
    monkeypatch.setattr(run, "main", lambda config: configs.append(config) or 0)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert main(["serve", "--model", "m", "--no-auth", "--device", "cpu", "--tls-cert", str(cert), "--tls-key", str(key),
                 "--metrics-port", "9100"]) == 0
    assert (configs[0].tls_cert_file, configs[0].tls_key_file, configs[0].metrics_port) == (cert, key, 9100)


def test_output_format_is_checked_before_the_model_loads(tmp_path, capsys):
    assert main(["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "reply.xyz")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "reply.xyz" in line and ".wav" in line and ".flac" in line and "checkpoint" not in line


@pytest.mark.parametrize("ext", ["flac", "mp3"])
def test_speak_writes_the_format_its_extension_names(hf_checkpoint, tmp_path, ext):
    if ext.upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {ext}")
    out = tmp_path / f"reply.{ext}"
    assert speak(hf_checkpoint, out, "--codes", str(tmp_path / "a.npy")) == 0
    info = sf.info(out)
    assert info.format == ext.upper() and info.samplerate == 24_000 and info.channels == 1
    assert info.frames >= 0.9 * np.load(tmp_path / "a.npy").shape[0] * 1920  # mp3 pads and trims a little


@pytest.mark.parametrize("content,says", [
    ('[{"speaker": 1, "text": "Hi.", "audio": 5}]', "'audio' must be the path of an audio file"),
    ('[{"speaker": 1, "text": "Hi.", "audio": ["a.wav", "b.wav"]}]', "'audio' must be the path of an audio file"),
    ('[{"speaker": 1, "text": "Hi.", "audio": "missing.wav"}]', "does not exist"),
    ('[{"speaker": "one", "text": "Hi."}]', "'speaker' must be"),
    ('[{"speaker": 1, "text": 7}]', "'text' must be"),
    ('[{"speaker": 1}]', "needs 'speaker' and 'text'"),
    ('{"speaker": 1}', "expected a JSON list"),
    ('[{"speaker": 1, "text": "Hi."', "cannot read context file"),
])
def test_a_broken_context_file_is_one_line_before_the_model_loads(tmp_path, capsys, content, says):
    (tmp_path / "ctx.json").write_text(content)
    argv = ["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "x.wav"),
            "--context", str(tmp_path / "ctx.json")]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert says in line and "checkpoint" not in line  # reported before the (missing) model was looked at


def test_bench_without_transformers_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["bench", "--size", "tiny"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert 'pip install "csm-plugin[dev]"' in line and "--no-baseline" in line


BENCH_RESULT = {
    "machine": {"platform": "Linux", "processor": "x86_64", "cpus": 2, "torch_threads": 2, "gpu": None},
    "versions": {"csm_plugin": "0.1.0", "torch": "2.13.0", "transformers": "5.0"},
    "settings": {"size": "tiny", "device": "cpu", "dtype": "float32", "quantize": None, "compile": False,
                 "compile_s": None, "context_seconds": 30, "context_rows": 512},
    "time_to_first_audio_ms": {"warm_conversation": 12.5, "full_reprefill": 50.0, "prefix_cache_speedup": 4.0},
    "per_frame": {"backbone_ms": 2.0, "depth_ms": 5.0, "codec_ms": 1.0, "frame_ms": 8.0, "real_time_factor": 0.1},
    "concurrency": {"max_realtime_streams": 2, "p95_frame_interval_ms_by_streams": {1: 9.0, 2: 15.5}},
    "baseline_transformers_generate": {"time_to_first_frame_s": 0.05, "frame_ms": 42.0},
    "ratios": {"frame_time_speedup": 6.0, "first_audio_speedup_warm": 4.0},
}


def test_bench_prints_a_table_besides_the_json(monkeypatch, capsys, tmp_path):
    import csm_plugin.bench as bench

    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: json.loads(json.dumps(BENCH_RESULT)))
    assert main(["bench", "--no-baseline", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    table, _, raw = out.partition("{")
    assert json.loads("{" + raw) == json.loads((tmp_path / "b.json").read_text())  # the JSON as before
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.strip().splitlines())
    assert rows["first audio, warm conversation"] == "12.5 ms"
    assert rows["frame: backbone / depth / codec"] == "2.0 ms / 5.0 ms / 1.0 ms"
    assert rows["real-time streams"] == "2" and rows["p95 frame interval by streams"] == "1: 9 ms, 2: 15.5 ms"
    assert rows["transformers generate: frame"].startswith("42.0 ms (6.0x")


def serve_process(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CSM_API_KEYS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "csm_plugin.cli", "serve", "--port", "0", "--no-auth", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, log


@pytest.mark.slow
def test_serve_exits_with_a_one_line_error_when_the_model_fails_to_load(tmp_path):
    proc, log = serve_process(tmp_path, "--model", str(tmp_path / "no-such-checkpoint"))
    try:
        assert proc.wait(90) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not load the model" in errors[0] and "no-such-checkpoint" in errors[0]
    assert "Traceback" not in output


@pytest.mark.slow
def test_serve_says_when_it_is_ready_and_logs_each_request(hf_checkpoint, tmp_path):
    proc, log = serve_process(tmp_path, "--model", str(hf_checkpoint))
    try:
        deadline = time.monotonic() + 90
        while not (ready := re.search(r"ready on (http://127\.0\.0\.1:\d+)", (tmp_path / "serve.log").read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        with urllib.request.urlopen(ready.group(1) + "/readyz", timeout=10) as response:
            assert response.status == 200
        while '"GET /readyz HTTP/1.1" 200' not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert output.index("listening on") < output.index("ready on")


# --- voices and styles (csm_plugin.voices, docs/voices.md) -------------------------------------------


def voices_file(folder: Path) -> Path:
    """The example voices file in `folder`, with its placeholder clips."""
    from test_voices import example_copy

    return example_copy(folder)


@pytest.mark.slow
def test_speak_with_a_voice_or_a_style_conditions_the_reply(hf_checkpoint, tmp_path):
    prompts = voices_file(tmp_path)
    assert speak(hf_checkpoint, tmp_path / "plain.wav") == 0
    assert speak(hf_checkpoint, tmp_path / "voice.wav", "--voices", str(prompts), "--voice", "maya") == 0
    maya = json.loads(prompts.read_text())["voices"]["maya"]
    assert speak(hf_checkpoint, tmp_path / "oneoff.wav", "--voice-audio", str(tmp_path / maya["audio"]),
                 "--voice-text", maya["text"]) == 0
    assert speak(hf_checkpoint, tmp_path / "style.wav", "--voices", str(prompts), "--style", "formal") == 0
    assert main(["speak", "--model", str(hf_checkpoint), "--text", "[formal] Hello there.", "--seed", "3",
                 "--out", str(tmp_path / "tag.wav"), "--voices", str(prompts)]) == 0
    audio = {name: sf.read(tmp_path / f"{name}.wav", dtype="int16")[0] for name in ("plain", "voice", "oneoff", "style", "tag")}
    n = min(len(a) for a in audio.values())
    assert not np.array_equal(audio["voice"][:n], audio["plain"][:n])  # the same seed: the voice changed it
    assert not np.array_equal(audio["style"][:n], audio["plain"][:n])
    assert not np.array_equal(audio["style"][:n], audio["voice"][:n])
    assert np.array_equal(audio["oneoff"], audio["voice"])  # the same clip and words, named or one-off
    assert np.array_equal(audio["tag"], audio["style"])  # a leading [formal] tag is --style formal


@pytest.mark.parametrize("extra,says", [
    (["--voice", "maya"], "--voice maya: name the file that defines it with --voices FILE"),
    (["--voices", "{prompts}", "--voice", "nobody"], "unknown voice 'nobody'; {prompts} define(s) voices ['caller', 'maya']"),
    (["--voices", "{prompts}", "--voice", "maya", "--voice-audio", "{dir}/maya.wav"], "not both"),
    (["--voice-audio", "{dir}/maya.wav"], "needs both --voice-audio PATH and --voice-text TEXT"),
    (["--voice-text", "Hello."], "needs both --voice-audio PATH and --voice-text TEXT"),
    (["--voice-audio", "{dir}/gone.wav", "--voice-text", "Hi."], "--voice-audio/--voice-text: file {dir}/gone.wav does not exist"),
    (["--voices", "{prompts}", "--style", "grumpy"], "--style grumpy: unknown style 'grumpy'; {prompts} define(s) styles"),
    (["--style", "formal"], "--style formal: unknown style 'formal'; no styles are loaded"),
    (["--voices", "{dir}/missing.json"], "cannot read voices file {dir}/missing.json"),
    (["--voices", "{dir}/broken.json"], "{dir}/broken.json: voice 'a': missing 'audio'"),
    (["--voices", "{prompts}", "--voices", "{prompts}"], "voice 'caller' is defined twice"),
])
def test_voice_and_style_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys, extra, says):
    prompts = voices_file(tmp_path)
    (tmp_path / "broken.json").write_text('{"voices": {"a": {"text": "Hi."}}}')

    def fill(text: str) -> str:
        return text.format(prompts=prompts, dir=tmp_path)

    argv = ["speak", "--model", str(tmp_path / "none"), "--text", "Hi.", "--out", str(tmp_path / "x.wav"), *map(fill, extra)]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert fill(says) in line and "checkpoint" not in line  # before the (missing) model was looked at


@pytest.mark.parametrize("text,extra,says", [
    ("[grumpy] Hi.", [], "the text starts with the style tag [grumpy]: unknown style 'grumpy'"),
    ("[formal] Hi.", ["--style", "casual"], "the text's tag [formal] and --style casual name different styles"),
    ("[formal]  ", [], "text is empty"),
])
def test_style_tags_in_the_text_are_checked_too(tmp_path, capsys, text, extra, says):
    prompts = voices_file(tmp_path)
    argv = ["speak", "--model", str(tmp_path / "none"), "--text", text, "--out", str(tmp_path / "x.wav"),
            "--voices", str(prompts), *extra]
    assert main(argv) == 2
    assert says in one_line_error(capsys.readouterr().err)


def test_speak_puts_the_voice_first_and_the_exemplars_last(tmp_path, monkeypatch):
    prompts = voices_file(tmp_path)
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "Hi, my parcel is late."}]))
    seen = {}
    monkeypatch.setattr(cli, "load_engine", lambda model, args: None)  # no model work
    monkeypatch.setattr(cli, "encode_context", lambda items, engine: seen.setdefault("items", items))
    monkeypatch.setattr(cli, "speak_to_file", lambda engine, context, speaker, text, *rest: seen.update(speaker=speaker, text=text))
    argv = ["speak", "--model", "m", "--text", "[comforting] I'm so sorry.", "--speaker", "2", "--out", str(tmp_path / "x.wav"),
            "--voices", str(prompts), "--voice", "maya", "--context", str(tmp_path / "ctx.json")]
    assert main(argv) == 0
    assert seen["speaker"] == 2 and seen["text"] == "I'm so sorry."  # the tag is not spoken
    items = seen["items"]
    maya = json.loads(prompts.read_text())["voices"]["maya"]
    assert (items[0].speaker, items[0].text) == (2, maya["text"]) and items[0].audio is not None  # pinned for --speaker
    assert items[1].text == "Hi, my parcel is late."
    comforting = json.loads(prompts.read_text())["styles"]["comforting"]
    assert [(i.speaker, i.text) for i in items[2:]] == [(e["speaker"], e["text"]) for e in comforting]


def test_voice_options_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["speak", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--voices FILE", "--voice NAME", "--voice-audio PATH", "--voice-text TEXT", "--style NAME", "docs/voices.md"):
        assert option in text, option
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--voices FILE" in text and "$CSM_VOICES_FILE" in text


def test_serve_takes_voices_files_and_checks_them_first(monkeypatch, tmp_path, capsys):
    import csm_plugin.server.run as run

    configs = []
    monkeypatch.setattr(run, "main", lambda config: configs.append(config) or 0)
    prompts = voices_file(tmp_path)
    assert main(["serve", "--model", "m", "--no-auth", "--device", "cpu", "--voices", str(prompts)]) == 0
    assert configs[0].voices_file == [prompts]
    assert sorted(configs[0].prompts().styles) == ["casual", "comforting", "formal", "motivating"]
    (tmp_path / "maya.wav").write_bytes(b"RIFF")  # a clip broken after the file was written
    assert main(["serve", "--model", "m", "--no-auth", "--device", "cpu", "--voices", str(prompts)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{prompts}: voice 'maya': audio 'maya.wav': cannot read" in line
    assert len(configs) == 1  # the server was never started
