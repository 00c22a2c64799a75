"""Every example runs offline (a small random checkpoint, scripted stand-ins for STT and the LLM),
as a subprocess the way the docs start it; and each one fails in one line when what it needs is
missing."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import wave
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

# every runnable example, and the test that runs it offline
SMOKE = {
    "pipecat_local_agent.py": "test_pipecat_local_agent_offline",
    "pipecat_phone_bot.py": "test_phone_bot_and_caller_started_together",
    "pipecat_phone_caller.py": "test_phone_bot_and_caller_started_together",
    "livekit_agent.py": "test_livekit_agent_offline",
}
HELPERS = {"offline_standins.py"}  # imported by the examples, not run


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CSM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_example(name: str, *args: str, timeout: float = 240, cwd: Path | None = None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env(**extra_env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def test_every_example_has_a_smoke_test():
    examples = {p.name for p in EXAMPLES.glob("*.py")} - HELPERS
    assert examples == set(SMOKE), "add the new example to SMOKE and give it an offline test"
    assert all(name in globals() for name in SMOKE.values())


@pytest.mark.slow
def test_pipecat_local_agent_offline(tmp_path):
    pytest.importorskip("pipecat")
    done = run_example("pipecat_local_agent.py", "--test-checkpoint", "--say", "Hi, my parcel never arrived.",
                       "--max-audio-ms", "480", "--wav", str(tmp_path / "agent.wav"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "agent: I am sorry to hear that." in done.stdout and "noise" in done.stderr
    assert wav_seconds(tmp_path / "agent.wav") > 0


@pytest.mark.slow
def test_livekit_agent_offline(tmp_path):
    pytest.importorskip("livekit.agents")
    done = run_example("livekit_agent.py", "offline", "--test-checkpoint", "--say", "Hi, my parcel never arrived.",
                       "--say", "It was a blue jacket.", "--max-audio-ms", "480", "--wav", str(tmp_path / "agent.wav"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "user: Hi, my parcel never arrived.  [0 audio frames]" in lines
    assert any(line.startswith("agent: I am sorry to hear that.") for line in lines)
    assert any(line.startswith("agent: Thank you.") for line in lines)  # the second turn got its own answer
    assert wav_seconds(tmp_path / "agent.wav") > 0


@pytest.mark.slow
def test_phone_bot_and_caller_started_together(tmp_path):
    """As the docs start them: the bot in the background and the caller right away. The caller
    waits for the bot to load and listen, then completes the call in real time."""
    pytest.importorskip("pipecat")
    port = free_port()
    bot_log = open(tmp_path / "bot.log", "w")
    bot = subprocess.Popen([sys.executable, str(EXAMPLES / "pipecat_phone_bot.py"), "--test-checkpoint", "--host", "127.0.0.1",
                            "--port", str(port), "--max-audio-ms", "480"], stdout=bot_log, stderr=subprocess.STDOUT,
                           cwd=REPO, env=env())
    try:
        caller = run_example("pipecat_phone_caller.py", f"ws://127.0.0.1:{port}", "--wav", str(tmp_path / "call.wav"),
                             "--reply-gap", "1.0", "--wait", "120")
        assert caller.returncode == 0, caller.stdout + caller.stderr
        assert bot.wait(60) == 0
    finally:
        if bot.poll() is None:
            bot.kill()
        bot_log.close()
    assert caller.stdout.count("-> bot replied with") == 3 and "greeting:" in caller.stdout
    assert wav_seconds(tmp_path / "call.wav") > 0
    assert "caller: Great, thanks. Bye!" in (tmp_path / "bot.log").read_text()


# --- waiting for the bot ----------------------------------------------------------------------------


def test_caller_waits_for_the_bot_to_listen(capsys):
    websockets = pytest.importorskip("websockets")
    from pipecat_phone_caller import connect_when_listening

    port = free_port()

    async def main():
        connecting = asyncio.create_task(connect_when_listening(f"ws://127.0.0.1:{port}", wait_s=60, retry_s=0.05))
        while "waiting for the bot" not in capsys.readouterr().err:  # refused at least once, and said so
            assert not connecting.done()
            await asyncio.sleep(0.02)

        async def handler(ws):
            await ws.send("hello")

        async with websockets.serve(handler, "127.0.0.1", port):
            ws = await asyncio.wait_for(connecting, 30)
            async with ws:
                assert await ws.recv() == "hello"

    asyncio.run(main())


def test_caller_gives_up_with_one_line_when_no_bot_comes(capsys):
    pytest.importorskip("websockets")
    from pipecat_phone_caller import main

    assert main([f"ws://127.0.0.1:{free_port()}", "--wait", "0.3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: no bot is listening") and "pipecat_phone_bot.py" in err[-1]
    assert not any("Traceback" in line for line in err)


# --- what is missing, in one line ---------------------------------------------------------------------


def blocked(tmp_path: Path, *modules: str, error: str = "ModuleNotFoundError") -> dict:
    """PYTHONPATH with stand-ins that fail to import like an absent (or broken) package."""
    for module in modules:
        top = tmp_path / "blocked" / module.split(".")[0]
        top.mkdir(parents=True, exist_ok=True)
        message = "PortAudio library not found" if error == "OSError" else f"No module named '{module}'"
        raise_line = f"raise {error}({message!r})" if error == "OSError" else f"raise {error}({message!r}, name={module!r})"
        (top / "__init__.py").write_text(raise_line + "\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("example,args,module,install", [
    ("pipecat_local_agent.py", ["--say", "Hi."], "pipecat", 'pip install "csm-plugin[pipecat]"'),
    ("pipecat_phone_bot.py", [], "pipecat", 'pip install "csm-plugin[pipecat]"'),
    ("livekit_agent.py", ["offline", "--say", "Hi."], "livekit", 'pip install "csm-plugin[livekit]"'),
    ("pipecat_phone_caller.py", [], "websockets", "pip install websockets"),
])
def test_an_example_without_its_framework_says_what_to_install(tmp_path, example, args, module, install):
    done = run_example(example, *args, timeout=120, **blocked(tmp_path, module))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and install in lines[0] and module in lines[0]


def test_livekit_console_without_portaudio_is_one_line(tmp_path):
    pytest.importorskip("livekit.agents")
    done = run_example("livekit_agent.py", "console", timeout=120, **blocked(tmp_path, "sounddevice", error="OSError"))
    lines = [line for line in done.stderr.splitlines() if line.strip() and "DeprecationWarning" not in line]
    assert done.returncode == 2 and lines and lines[-1].startswith("error: console mode needs the PortAudio library")
    assert "libportaudio2" in lines[-1] and "offline" in lines[-1] and "Traceback" not in done.stderr
