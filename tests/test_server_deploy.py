"""Server processes as an operator runs them (`csm-plugin serve`), on loopback: SIGTERM draining,
failover behind Debian's nginx with docs/deploy/nginx.conf, and a bounded load test."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal

import aiohttp
import pytest

from csm_plugin.cli import build_parser
from csm_plugin.client import RemoteBackend
from csm_plugin.models.loading import make_test_checkpoint
from test_server_support import (
    AUTH,
    KEY,
    REPO,
    Nginx,
    ServerProcess,
    Stream,
    free_port,
    metric_value,
    nginx_binary,
    nginx_conf_for_test,
    poll,
    scrape,
    wait_ready,
)

pytestmark = pytest.mark.slow  # starts `csm-plugin serve` subprocesses and nginx; SIGTERM draining and load tests

needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy")
    make_test_checkpoint(path / "ckpt", "hf", seed=0)
    return path


@pytest.fixture
def servers(workdir, request):
    """Start n server processes (killed at the end whatever happens)."""
    started = []

    def start(n, *extra, threads=1):
        procs = [ServerProcess(workdir / "ckpt", workdir, f"{request.node.name}-{i}", *extra, threads=threads) for i in range(n)]
        started.extend(procs)
        for p in procs:
            p.wait_listening()
        return procs

    yield start
    for p in started:
        p.stop()


def run(coro):
    return asyncio.run(coro)


def test_sigterm_lets_running_replies_finish_then_exits_0(servers):
    (server,) = servers(1)

    async def main():
        await wait_ready(server.url)
        async with aiohttp.ClientSession() as s:
            streams = [await Stream.connect(s, server.url, f"c{i}") for i in range(2)]
            firsts = [asyncio.Event() for _ in streams]
            for i, c in enumerate(streams):
                await c.request(type="open")
                await c.send(type="speak", text="A reply that is still running when the server is asked to stop.", seed=i, max_audio_ms=2400)
            replies = [asyncio.create_task(c.reply(first_chunk=e)) for c, e in zip(streams, firsts)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 60)
            server.signal(signal.SIGTERM)

            async def not_ready():
                async with s.get(server.url + "/readyz") as r:
                    return r.status == 503

            await poll(not_ready, timeout=10)
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:  # new streams go elsewhere
                await s.ws_connect(server.url + "/v1/conversations/late/stream", headers=AUTH)
            assert e.value.status == 503
            for c, task in zip(streams, replies):
                _, pcm, done = await task
                assert done["reason"] == "completed" and done["frames"] == len(pcm) == 30  # every frame, none cut
                # The close frame the server sent says "going away". (The client's own close_code can
                # read 1006 when the server process is gone before the client's close reply.)
                closing = await c.ws.receive(timeout=30)
                assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001

    run(main())
    assert server.proc.wait(timeout=30) == 0, server.output()
    assert "all replies finished" in server.output()


@needs_nginx
def test_failover_through_nginx_replays_the_history(servers, workdir):
    procs = servers(2)
    nginx = Nginx(workdir, [p.port for p in procs])
    try:
        nginx.wait_listening()
        run(_failover(procs, nginx))
    finally:
        nginx.stop()


async def _failover(procs, nginx):
    for p in procs:
        await wait_ready(p.url)
    backend = await RemoteBackend(nginx.url, api_key=KEY, reconnect_timeout=30).start()
    conv = backend.conversation("call-failover")
    for turn in range(2):
        await conv.add_segment(1, f"Caller turn {turn}.")
        [c async for c in conv.speak(f"Agent turn {turn}.", seed=turn, max_audio_ms=320)]
    async with aiohttp.ClientSession() as s:
        holders = [p for p in procs if metric_value(await scrape(s, p.url), "csm_open_connections") == 1]
        assert len(holders) == 1, "exactly one server holds the conversation's stream"
        holder, other = holders[0], next(p for p in procs if p is not holders[0])
        holder.proc.kill()  # mid-call, no warning
        holder.proc.wait(10)

        await conv.add_segment(1, "Caller turn 2, after the crash.")
        chunks = [c async for c in conv.speak("Agent turn 2, on the other server.", seed=2, max_audio_ms=320)]
        assert sum(c.num_frames for c in chunks) == 4 and conv.replays == 1 and len(conv.history) == 6
        assert metric_value(await scrape(s, other.url), "csm_conversations") == 1
        # the surviving server holds exactly the client's history: same digest
        await backend.close()
        direct = await Stream.connect(s, other.url, "call-failover")
        ready = await direct.request(type="open", turns=6, digest=conv.digest())
        assert ready["type"] == "ready" and ready["state"] == "resumed" and ready["turns"] == 6
    assert "csm" not in nginx.error_log() or "[emerg]" not in nginx.error_log()


@needs_nginx
def test_load_through_nginx_50_conversations(servers, workdir):
    config = workdir / "load.json"
    config.write_text(json.dumps({"limits": {"max_streams_per_key": 64, "max_conversations_per_key": 128}}))
    procs = servers(2, "--config", str(config))
    nginx = Nginx(workdir, [p.port for p in procs])
    spec = importlib.util.spec_from_file_location("load_test", REPO / "bench" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    try:
        nginx.wait_listening()

        async def main():
            for p in procs:
                await wait_ready(p.url)
            figures = await load_test.run_load(nginx.url, KEY, conversations=50, turns=2, reply_ms=240, timeout=150)
            async with aiohttp.ClientSession() as s:
                per_server = [metric_value(await scrape(s, p.url), "csm_streams_total", {"outcome": "completed"}) for p in procs]
            return figures, per_server

        figures, per_server = run(main())
    finally:
        nginx.stop()
    print("load test:", json.dumps({**figures, "replies_per_server": per_server}))
    assert figures["errors"] == 0, figures["error_examples"]
    assert figures["completed"] == 50 and figures["lost_turns"] == 0
    assert sum(per_server) == 100 + 2 * 0 and all(n > 0 for n in per_server)  # both servers took conversations


@needs_nginx
def test_deploy_examples_are_valid(tmp_path):
    """docs/deploy/nginx.conf passes `nginx -t`; kubernetes.yaml parses and has the pieces."""
    import subprocess

    yaml = pytest.importorskip("yaml")

    conf = nginx_conf_for_test((REPO / "docs" / "deploy" / "nginx.conf").read_text(), tmp_path, free_port(), free_port())
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-e", str(tmp_path / "err.log"), "-g", f"pid {tmp_path / 'pid'};"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all((REPO / "docs" / "deploy" / "kubernetes.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "csm-server"), ("Service", "csm-servers"), ("Deployment", "csm-nginx")} <= kinds
    server = next(d for d in docs if d["metadata"]["name"] == "csm-server")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(server["args"])  # the CLI takes them: a GPU server, compiled
    assert args.func.__name__ == "cmd_serve" and args.device == "cuda" and args.compile is True
    headless = next(d for d in docs if d["metadata"]["name"] == "csm-servers")
    assert headless["spec"]["clusterIP"] == "None"
    nginx_conf = next(d for d in docs if d["metadata"]["name"] == "csm-nginx")["data"]["nginx.conf"]
    assert "hash $csm_hash_key consistent;" in nginx_conf
    assert "listen 8443 ssl" in nginx_conf and "ssl_certificate " in nginx_conf  # TLS for clients


@needs_nginx
def test_tls_at_nginx(servers, workdir):
    """Clients speak wss:// to nginx (docs/deploy/nginx.conf's TLS listener); nginx to the server is HTTP."""
    import ssl

    (proc,) = servers(1)
    nginx = Nginx(workdir, [proc.port])
    try:
        nginx.wait_listening()

        async def main():
            await wait_ready(proc.url)
            trust = ssl.create_default_context(cafile=str(nginx.cert_file))
            backend = await RemoteBackend(nginx.tls_url, api_key=KEY, ssl=trust).start()
            conv = backend.conversation("call-tls")
            await conv.add_segment(1, "Is this line secure?")
            chunks = [c async for c in conv.speak("It is encrypted.", seed=1, max_audio_ms=240)]
            assert sum(c.num_frames for c in chunks) == 3 and len(conv.history) == 2
            await backend.close()
            async with aiohttp.ClientSession() as s:  # plain HTTP on the TLS port is refused
                async with s.get(f"http://127.0.0.1:{nginx.tls_port}/healthz") as r:
                    assert r.status == 400

        run(main())
    finally:
        nginx.stop()
