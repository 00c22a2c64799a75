"""Helpers for the server and client tests (no tests here): servers in-process and as
subprocesses, nginx from docs/deploy/nginx.conf, Prometheus text parsing, polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from csm_plugin.server.app import STATE, create_app, make_site, runner_options, url_scheme
from csm_plugin.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_server(checkpoint, port: int = 0, **overrides):
    """An app on 127.0.0.1 in this event loop, listening as `csm-plugin serve` does (timeouts,
    TLS); yields (base url, ServerState) once ready."""
    overrides.setdefault("api_keys", [KEY, OTHER_KEY])
    config = ServerConfig.load(environ={}, model=str(checkpoint), **overrides)
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, **runner_options(config))
    await runner.setup()
    site = make_site(runner, config, "127.0.0.1", port)
    await site.start()
    url = f"{url_scheme(config)}://127.0.0.1:{runner.addresses[0][1]}"
    state = app[STATE]
    try:
        await poll(lambda: state.ready or state.load_error is not None, timeout=60)
        assert state.ready, state.load_error
        yield url, state
    finally:
        await runner.cleanup()


async def poll(predicate, timeout: float = 10.0, interval: float = 0.01) -> float:
    """Wait until predicate() (sync or async) is true; returns the seconds it took."""
    start = time.perf_counter()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def metric_value(text: str, name: str, labels: dict | None = None) -> float:
    """A sample's value from Prometheus text (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as r:
        return await r.text()


class Stream:
    """A raw protocol client: one WebSocket, messages in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.next_id = 0

    @classmethod
    async def connect(cls, session, url, conversation="c1", headers=AUTH):
        return cls(await session.ws_connect(f"{url}/v1/conversations/{conversation}/stream", headers=headers))

    async def send(self, **message) -> int:
        self.next_id += 1
        await self.ws.send_json({**message, "id": self.next_id})
        return self.next_id

    async def json(self, timeout=30) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def request(self, **message) -> dict:
        rid = await self.send(**message)
        reply = await self.json()
        assert reply["re"] == rid, reply
        return reply

    async def reply(self, first_chunk=None, **speak) -> tuple[list[dict], list[bytes], dict]:
        """Send speak (unless already sent) and read its chunks up to `done`: the headers and PCM
        of the chunks with audio (a final chunk that carries only words is checked and left out)."""
        if first_chunk is None:
            await self.send(type="speak", **speak)
        headers, pcm = [], []
        words_only = False
        while True:
            msg = await self.ws.receive(timeout=60)
            if msg.type == aiohttp.WSMsgType.BINARY:
                if words_only:
                    assert msg.data == b""
                    words_only = False
                    continue
                assert headers and len(msg.data) == 2 * headers[-1]["samples"]
                pcm.append(msg.data)
                if first_chunk is not None:
                    first_chunk.set()
                continue
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            if data["type"] == "chunk" and data["samples"] == 0:
                words_only = True
            elif data["type"] == "chunk":
                headers.append(data)
            elif data["type"] == "done":
                return headers, pcm, data
            else:
                raise AssertionError(data)


# --- subprocesses ------------------------------------------------------------------------------

class ServerProcess:
    """`csm-plugin serve` in a subprocess on a port it picks; stdout goes to a log file."""

    def __init__(self, checkpoint, workdir: Path, name: str, *extra: str, threads: int = 1):
        self.log_path = workdir / f"{name}.log"
        keys = workdir / "keys.txt"
        keys.write_text(f"# test keys\n{KEY}\n{OTHER_KEY}\n")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        env.pop("CSM_API_KEYS", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csm_plugin.cli", "serve", "--model", str(checkpoint), "--port", "0",
             "--api-keys-file", str(keys), "--torch-threads", str(threads), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        self.port: int | None = None

    def wait_listening(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", self.log_path.read_text())
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.log_path.read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


async def wait_ready(url: str, timeout: float = 90) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready():
            try:
                async with session.get(url + "/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await poll(ready, timeout=timeout, interval=0.1)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key: (tls.crt, tls.key) in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csm test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def nginx_conf_for_test(conf: str, directory: Path, port: int, tls_port: int) -> str:
    """docs/deploy/nginx.conf with its listen addresses on loopback and its certificate made here."""
    cert_file, key_file = self_signed(directory / "tls")
    conf, n = re.subn(r"listen 8080\b", f"listen 127.0.0.1:{port}", conf)
    assert n == 1
    conf, n = re.subn(r"listen 8443\b", f"listen 127.0.0.1:{tls_port}", conf)
    assert n == 1
    return conf.replace("/etc/nginx/tls/tls.crt", str(cert_file)).replace("/etc/nginx/tls/tls.key", str(key_file))


class Nginx:
    """nginx running docs/deploy/nginx.conf with the given upstream ports, on free ports (plain
    HTTP on `port`, TLS with a self-signed certificate, `cert_file`, on `tls_port`)."""

    def __init__(self, workdir: Path, upstream_ports: list[int]):
        binary = nginx_binary()
        assert binary, "nginx is not installed"
        self.port = free_port()
        self.tls_port = free_port()
        self.dir = workdir / "nginx"
        self.dir.mkdir(exist_ok=True)
        self.cert_file = self.dir / "tls" / "tls.crt"
        conf = (REPO / "docs" / "deploy" / "nginx.conf").read_text()
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in upstream_ports)
        conf, n = re.subn(r"(# BEGIN csm servers[^\n]*\n).*?(\n\s*# END csm servers)", lambda m: m.group(1) + servers + m.group(2), conf, flags=re.S)
        assert n == 1
        conf = nginx_conf_for_test(conf, self.dir, self.port, self.tls_port)
        conf = conf.replace("worker_processes auto;", "worker_processes 1;")
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / temp).mkdir(exist_ok=True)
        temps = "".join(f"    {t}_temp_path {self.dir / t};\n" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = conf.replace("http {\n", "http {\n" + temps, 1)
        (self.dir / "nginx.conf").write_text(conf)
        globals_ = f"daemon off; pid {self.dir / 'nginx.pid'}; error_log {self.dir / 'error.log'} info; user root;"
        self.proc = subprocess.Popen(
            [binary, "-e", str(self.dir / "startup.log"), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g", globals_],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def wait_listening(self, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise AssertionError("nginx did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""
