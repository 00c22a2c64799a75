"""Serving under load and faults, on loopback, bounded in count and time: figures for
bench/RESULTS.md.

    python bench/serving_faults.py [--model DIR] [--threads 1] [--json out.json] [--only load,isolation,...]

Phases (each starts its own `csm-plugin serve` processes on 127.0.0.1 with a small random
checkpoint unless --model is given, and stops them):

- load: 50 concurrent two-turn conversations on one key, 8 cache slots: completed, errors, lost
  turns, first-audio p50/p95 (bench/load_test.py).
- isolation: another key's first audio, unloaded and then with 8 readers on one key that read
  1 KiB every 0.5 s through a 4 KiB receive buffer (the issue's slow readers) holding all 8
  cache slots; the ratio. send_timeout_s is 120 s here, so that no slow reply is cut while it
  is measured: the other key's replies get slots because the slow ones are suspended (counted
  from the server's debug log), and the slow replies are still running afterwards.
- encode: the longest gap between a running reply's frames while another conversation's 60 s
  turn is encoded, in-process: encoded on the inference thread (as before) and on the encoder
  thread (as now), against one frame interval (80 ms).
- failover: two servers behind nginx (docs/deploy/nginx.conf), 10 conversations; the server
  holding them is killed (SIGKILL) in the middle of their replies; every conversation then
  finishes its turns on the other one: lost and duplicated turns, replays, digests.
- restart: one server restarted (SIGTERM, drained, started again on the same port) under a live
  client: the next turn's first audio after the restart, lost turns.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from load_test import run_load  # noqa: E402

from csm_plugin.client import ConnectionLostError, RemoteBackend  # noqa: E402

SERVER_REPO = REPO  # --server-repo: run the servers from another checkout (a "before" figure)
KEY = "bench-key-0123456789abcdef"
OTHER_KEY = "bench-other-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`csm-plugin serve` on 127.0.0.1:port in a subprocess."""

    def __init__(self, model: Path, workdir: Path, name: str, threads: int, port: int | None = None, config: dict | None = None,
                 verbose: bool = False):
        self.port = port or free_port()
        self.model, self.workdir, self.name, self.threads, self.config = model, workdir, name, threads, config
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        keys = self.workdir / "keys"
        keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
        args = [sys.executable, "-m", "csm_plugin.cli", "serve", "--model", str(self.model), "--port", str(self.port),
                "--api-keys-file", str(keys), "--torch-threads", str(self.threads)]
        if self.config:
            path = self.workdir / f"{self.name}.json"
            path.write_text(json.dumps(self.config))
            args += ["--config", str(path)]
        if self.verbose:
            args.append("-v")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        env.pop("CSM_API_KEYS", None)
        self.log = open(self.workdir / f"{self.name}.log", "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=SERVER_REPO)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self, text: str) -> int:
        """How many lines of the server's log contain `text`."""
        return sum(text in line for line in (self.workdir / f"{self.name}.log").read_text().splitlines())

    async def ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited: {(self.workdir / f'{self.name}.log').read_text()[-2000:]}")
                try:
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"server {self.name} not ready in {timeout} s")

    def stop(self, sig=signal.SIGKILL) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode if self.proc else None


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def first_audio_ms(conv, text: str, seed: int) -> float:
    start = time.perf_counter()
    first = None
    async for chunk in conv.speak(text, seed=seed, max_audio_ms=240):
        if first is None and chunk.num_frames:
            first = time.perf_counter() - start
    return 1000 * first


# --- phases ------------------------------------------------------------------------------------

async def phase_load(model, workdir, threads, conversations: int = 50) -> dict:
    server = Server(model, workdir, "load", threads).start()
    try:
        await server.ready()
        return await run_load(server.url, KEY, conversations=conversations, turns=2, reply_ms=240, timeout=600)
    finally:
        server.stop()


class SlowReader:
    """A raw WebSocket client with a 4 KiB receive buffer that reads 1 KiB every 0.5 s."""

    def __init__(self, port: int, conversation: str):
        self.port, self.conversation = port, conversation
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write((f"GET /v1/conversations/{self.conversation}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {KEY}\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.send({"type": "open", "id": 1})
        await asyncio.sleep(0.2)
        self.send({"type": "speak", "id": 2, "text": "A long answer that this listener takes in far too slowly. " * 6,
                   "seed": 1, "max_audio_ms": 60_000})
        self.task = asyncio.create_task(self._trickle())

    def send(self, message: dict) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        header = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def _trickle(self) -> None:
        while True:
            if not await self.reader.read(1024):
                return
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.transport.abort()


async def phase_isolation(model, workdir, threads) -> dict:
    send_timeout_s = 120  # no slow reply is cut while measured: isolation must come from suspending them
    server = Server(model, workdir, "isolation", threads, config={"limits": {"send_timeout_s": send_timeout_s}}, verbose=True).start()
    readers: list[SlowReader] = []
    try:
        await server.ready()
        backend = await RemoteBackend(server.url, api_key=OTHER_KEY).start()
        conv = backend.conversation("measured")
        await first_audio_ms(conv, "Warm up.", 0)
        unloaded = [await first_audio_ms(conv, f"Unloaded answer {i}.", i) for i in range(7)]
        for i in range(8):
            reader = SlowReader(server.port, f"slow-{i}")
            await reader.start()
            readers.append(reader)
        deadline = time.monotonic() + 15  # (a server without csm_replies_behind: measured after 15 s)
        while await metric(server.url, "csm_replies_behind") < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        behind = await metric(server.url, "csm_replies_behind")
        active = await metric(server.url, "csm_active_streams")
        loaded = [await first_audio_ms(conv, f"Loaded answer {i}.", 100 + i) for i in range(7)]
        slow_consumer = await metric(server.url, 'csm_streams_total{outcome="slow_consumer"}')
        active_after = await metric(server.url, "csm_active_streams")
        await backend.close()
        u, l = statistics.median(unloaded), statistics.median(loaded)
        return {
            "stalled_readers": 8, "send_timeout_s": send_timeout_s, "readers_behind_when_measured": behind,
            "replies_active_when_measured": active,
            "unloaded_first_audio_ms_median": round(u, 1), "loaded_first_audio_ms_median": round(l, 1),
            "loaded_first_audio_ms_max": round(max(loaded), 1), "ratio": round(l / u, 2),
            "slow_readers_ended_slow_consumer": slow_consumer, "slow_replies_still_running_after": active_after,
            "suspensions": server.log_lines("suspended a stream"), "resumes": server.log_lines("resumed a stream"),
        }
    finally:
        for reader in readers:
            await reader.close()
        server.stop()


async def phase_encode(model, threads) -> dict:
    """In-process: frame gaps of a reply while a 60 s turn is encoded, both ways."""
    import torch

    from csm_plugin.engine import Engine
    from csm_plugin.service import CSMService, _check_audio

    torch.set_num_threads(threads)
    wav = (0.3 * np.sin(2 * np.pi * 220 * np.arange(60 * 16000) / 16000)).astype(np.float32)
    out = {}
    async with CSMService(model) as service:
        talker = service.conversation("talker")
        [c async for c in talker.speak("Warm up.", seed=0, max_audio_ms=160)]
        for way in ("inference_thread", "encoder_thread"):
            times: list[float] = []
            window: list[float] = []

            async def speak():
                async for chunk in talker.speak("A long answer that keeps going while the user's turn is encoded. " * 3,
                                                seed=1, max_audio_ms=8000):
                    times.append(time.perf_counter())

            task = asyncio.create_task(speak())
            while len(times) < 10:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            clean = _check_audio(wav, 16000)
            if way == "inference_thread":  # as before: a job on the worker, between frames
                await service._submit(Engine.encode_audio, clean, 16000)
            else:
                await service._encode(clean, 16000)
            window = [start, time.perf_counter()]
            await task
            gaps = np.diff(times)
            during = [g for t, g in zip(times[1:], gaps) if window[0] <= t <= window[1] + 1.0]
            out[way] = {
                "encode_s": round(window[1] - window[0], 3),
                "frame_gap_ms_median": round(1000 * float(np.median(gaps)), 1),
                "frame_gap_ms_max_while_encoding": round(1000 * max(during, default=0.0), 1),
            }
    return out


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


class Nginx:
    def __init__(self, workdir: Path, ports: list[int]):
        self.port, tls_port = free_port(), free_port()
        self.dir = workdir / "nginx"
        self.dir.mkdir(exist_ok=True)
        conf = (REPO / "docs" / "deploy" / "nginx.conf").read_text()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in ports)
        conf = re.sub(r"(# BEGIN csm servers[^\n]*\n).*?(\n\s*# END csm servers)", lambda m: m.group(1) + servers + m.group(2), conf, flags=re.S)
        conf = re.sub(r"listen 8080\b", f"listen 127.0.0.1:{self.port}", conf)
        conf = re.sub(r"listen 8443 ssl\b", f"listen 127.0.0.1:{tls_port} ssl", conf)
        tls = self.dir / "tls"
        tls.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", str(tls / "tls.key"), "-out", str(tls / "tls.crt"), "-days", "1", "-subj", "/CN=127.0.0.1"],
                       check=True, capture_output=True)
        conf = conf.replace("/etc/nginx/tls/", str(tls) + "/").replace("worker_processes auto;", "worker_processes 1;")
        temps = "".join(f"    {t}_temp_path {self.dir / t};\n" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = conf.replace("http {\n", "http {\n" + temps, 1)
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [nginx_binary(), "-e", str(self.dir / "startup.log"), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
             "-g", f"daemon off; pid {self.dir / 'nginx.pid'}; error_log {self.dir / 'error.log'} info; user root;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def listening(self) -> None:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise TimeoutError("nginx did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def phase_failover(model, workdir, threads) -> dict:
    if nginx_binary() is None:
        return {"skipped": "nginx is not installed"}
    servers = [Server(model, workdir, f"failover-{i}", threads).start() for i in range(2)]
    nginx = Nginx(workdir, [s.port for s in servers])
    try:
        await asyncio.gather(*(s.ready() for s in servers), nginx.listening())
        backend = await RemoteBackend(nginx.url, api_key=KEY, reconnect_timeout=60).start()
        convs = [backend.conversation(f"fo-{i}") for i in range(10)]
        for conv in convs:  # two turns each, before the fault
            for t in range(2):
                await conv.add_segment(1, f"Caller turn {t}.")
                [c async for c in conv.speak(f"Agent turn {t}.", seed=t, max_audio_ms=240)]
        holders = [s for s in servers if await metric(s.url, "csm_open_connections") > 0]
        victim = holders[0]  # a server that holds conversations' streams

        async def long_reply(conv):
            await conv.add_segment(1, "Caller turn 2.")
            try:
                [c async for c in conv.speak("A long agent turn that the crash interrupts. " * 3, seed=2, max_audio_ms=4000)]
                return "completed"
            except ConnectionLostError:
                return "cut"

        replies = [asyncio.create_task(long_reply(c)) for c in convs]
        await asyncio.sleep(0.5)  # replies under way
        killed_at = time.perf_counter()
        victim.stop(signal.SIGKILL)
        outcomes = await asyncio.gather(*replies)
        cut = outcomes.count("cut")
        recovery = []
        for conv in convs:  # the next turn on the survivor
            await conv.add_segment(1, "Caller turn 3, after the crash.")
            start = time.perf_counter()
            [c async for c in conv.speak("Agent turn 3.", seed=3, max_audio_ms=240)]
            recovery.append(time.perf_counter() - start)
        expected_turns = 8  # 4 caller + 4 agent turns each (a cut agent turn keeps what was heard)
        lengths = [len(c.history) for c in convs]
        survivor = next(s for s in servers if s is not victim)
        async with aiohttp.ClientSession() as s:
            matches = 0
            for conv in convs:
                async with s.ws_connect(f"{survivor.url}/v1/conversations/{conv.id}/stream",
                                        headers={"Authorization": f"Bearer {KEY}"}) as ws:
                    await ws.send_json({"type": "open", "id": 1, "turns": len(conv.history), "digest": conv.digest()})
                    matches += (await ws.receive_json(timeout=30)).get("state") == "resumed"
        figures = {
            "conversations": len(convs), "killed_server_held_streams": bool(holders), "replies_cut_by_the_kill": cut,
            "replies_completed_despite_the_kill": outcomes.count("completed"),
            "lost_turns": sum(max(0, expected_turns - n) for n in lengths),
            "duplicated_turns": sum(max(0, n - expected_turns) for n in lengths),
            "replays": sum(c.replays for c in convs), "survivor_digest_matches": matches,
            "next_turn_s_p50": round(pct(recovery, 0.5), 3), "next_turn_s_max": round(max(recovery), 3),
            "kill_to_all_recovered_s": round(time.perf_counter() - killed_at, 2),
        }
        await backend.close()
        return figures
    finally:
        nginx.stop()
        for s in servers:
            s.stop()


async def phase_restart(model, workdir, threads) -> dict:
    server = Server(model, workdir, "restart", threads).start()
    try:
        await server.ready()
        backend = await RemoteBackend(server.url, api_key=KEY, reconnect_timeout=120).start()
        conv = backend.conversation("live")
        for t in range(2):
            await conv.add_segment(1, f"Caller turn {t}.")
            [c async for c in conv.speak(f"Agent turn {t}.", seed=t, max_audio_ms=240)]
        stopped_at = time.perf_counter()
        status = server.stop(signal.SIGTERM)  # drains, exits 0
        server.start()  # the same port
        await conv.add_segment(1, "Caller turn 2, across the restart.")  # retries until the new process is ready
        first = await first_audio_ms(conv, "Agent turn 2.", 2)
        figures = {
            "exit_status_on_sigterm": status, "turns": len(conv.history), "lost_turns": 6 - len(conv.history),
            "replays": conv.replays, "stop_to_next_reply_done_s": round(time.perf_counter() - stopped_at, 2),
            "first_audio_after_restart_ms": round(first, 1),
        }
        await backend.close()
        return figures
    finally:
        server.stop()


# --- main ----------------------------------------------------------------------------------------

def machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads_per_server": threads,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()}


async def main_async(args) -> dict:
    from csm_plugin.models.loading import make_test_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="csm-faults-"))
    model = Path(args.model) if args.model else make_test_checkpoint(workdir / "ckpt", "hf", seed=0)
    results = {"machine": machine(args.threads), "model": "small random test checkpoint" if not args.model else str(model)}
    phases = {
        "load": lambda: phase_load(model, workdir, args.threads, args.conversations),
        "isolation": lambda: phase_isolation(model, workdir, args.threads),
        "encode": lambda: phase_encode(model, args.threads),
        "failover": lambda: phase_failover(model, workdir, args.threads),
        "restart": lambda: phase_restart(model, workdir, args.threads),
    }
    for name in args.only.split(","):
        started = time.perf_counter()
        try:
            results[name] = await asyncio.wait_for(phases[name](), args.phase_timeout)
        except Exception as e:  # noqa: BLE001 - a failed phase is a figure too
            results[name] = {"failed": f"{type(e).__name__}: {e}"}
        results[name]["phase_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: results[name]}), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a small random one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--only", default="load,isolation,encode,failover,restart")
    parser.add_argument("--phase-timeout", type=float, default=300)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--server-repo", help="run `csm-plugin serve` from this checkout (e.g. an older commit)")
    parser.add_argument("--conversations", type=int, default=50, help="load phase: concurrent conversations")
    args = parser.parse_args()
    global SERVER_REPO
    if args.server_repo:
        SERVER_REPO = Path(args.server_repo)
    results = asyncio.run(main_async(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
