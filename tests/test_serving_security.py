"""Security basics: TLS on the server (and a TLS handshake that must finish in time), failed
authentication throttled per client address, `--no-auth` with keys configured refused, and
metrics on a port of their own."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl

import aiohttp
import pytest

from csm_plugin.client import AuthenticationError, RemoteBackend
from csm_plugin.server.auth import AuthThrottle, client_address
from csm_plugin.server.config import ConfigError, ServerConfig
from test_server_support import AUTH, KEY, running_server, self_signed


def run(coro):
    return asyncio.run(coro)


def test_tls_serves_wss_and_drops_a_handshake_that_does_not_finish(hf_checkpoint, tmp_path):
    cert_file, key_file = self_signed(tmp_path)

    async def main():
        async with running_server(hf_checkpoint, tls_cert_file=cert_file, tls_key_file=key_file, header_timeout_s=0.5) as (url, state):
            assert url.startswith("https://")
            trust = ssl.create_default_context(cafile=str(cert_file))
            backend = await RemoteBackend(url, api_key=KEY, ssl=trust).start()
            conv = backend.conversation("secure")
            await conv.add_segment(1, "Over TLS.")
            chunks = [c async for c in conv.speak("Encrypted audio.", seed=1, max_audio_ms=160)]
            assert sum(c.num_frames for c in chunks) == 2 and len(conv.history) == 2
            await backend.close()
            # a client that does not trust the certificate cannot talk to it
            untrusting = RemoteBackend(url, api_key=KEY, ready_timeout=0.5)
            with pytest.raises(Exception):
                await untrusting.start()
            # a TCP connection that never starts its handshake is closed
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(100), 10) == b""
            writer.close()

    run(main())


def test_tls_config_needs_both_files_and_readable_ones(tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    with pytest.raises(ConfigError, match="both"):
        ServerConfig.load(environ={"CSM_TLS_CERT_FILE": str(cert_file)})
    config = ServerConfig.load(environ={"CSM_TLS_CERT_FILE": str(cert_file), "CSM_TLS_KEY_FILE": str(key_file)})
    assert config.tls and config.ssl_context().minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="cannot load"):
        ServerConfig.load(environ={}, tls_cert_file=key_file, tls_key_file=cert_file).ssl_context()


def test_no_auth_with_keys_configured_refuses_to_start(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    with pytest.raises(ConfigError, match="refusing") as e:
        ServerConfig.load(environ={"CSM_API_KEYS": KEY}, allow_no_auth=True).keys()
    assert "CSM_API_KEYS" in str(e.value)
    with pytest.raises(ConfigError, match=str(keys)):
        ServerConfig.load(environ={}, api_keys_file=keys, allow_no_auth=True).keys()
    assert ServerConfig.load(environ={}, allow_no_auth=True).keys() == []


def test_auth_throttle_and_client_address():
    throttle = AuthThrottle(limit=3, window_s=60)
    for t in range(3):
        assert throttle.retry_after_s("1.2.3.4", now=100.0 + t) is None
        throttle.failed("1.2.3.4", now=100.0 + t)
    assert throttle.retry_after_s("1.2.3.4", now=103.0) == pytest.approx(59.0)
    assert throttle.retry_after_s("5.6.7.8", now=103.0) is None  # another address is not affected
    assert throttle.retry_after_s("1.2.3.4", now=161.0) is None  # the oldest failure left the window
    proxies = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("10.0.0.5", "9.9.9.9, 10.0.0.7", proxies) == "9.9.9.9"
    assert client_address("8.8.8.8", "9.9.9.9", proxies) == "8.8.8.8"  # not a trusted proxy: its header is ignored
    assert client_address("10.0.0.5", None, proxies) == "10.0.0.5"
    assert client_address("10.0.0.5", "9.9.9.9", []) == "10.0.0.5"


def test_failed_authentication_is_throttled_per_address(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, auth_failures_per_minute=3, trusted_proxies=["127.0.0.1"]) as (url, state), \
                aiohttp.ClientSession() as s:
            wrong = {"Authorization": "Bearer wrong-key-0123456789abcdef"}
            for _ in range(3):
                async with s.get(url + "/v1/info", headers=wrong) as r:
                    assert r.status == 401
            # this address is now refused, the right key too, without the key being looked at
            async with s.get(url + "/v1/info", headers=AUTH) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "too_many_auth_failures"
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(url + "/v1/conversations/c/stream", headers=wrong)
            assert e.value.status == 429
            # another client behind the trusted proxy (127.0.0.1) is not held up
            async with s.get(url + "/v1/info", headers={**AUTH, "X-Forwarded-For": "203.0.113.9"}) as r:
                assert r.status == 200
            backend = RemoteBackend(url, api_key=KEY, ready_timeout=1)
            with pytest.raises(AuthenticationError):  # a throttled client gets a clear error, not a hang
                await backend.start()

    run(main())


def test_metrics_on_their_own_port(hf_checkpoint):
    async def main():
        async with running_server(hf_checkpoint, metrics_port=0) as (url, state), aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                assert r.status == 404
            assert state.metrics_port and f":{state.metrics_port}" not in url
            async with s.get(f"http://127.0.0.1:{state.metrics_port}/metrics") as r:
                assert r.status == 200 and "csm_ready 1.0" in await r.text()
            async with s.get(f"http://127.0.0.1:{state.metrics_port}/v1/info", headers=AUTH) as r:
                assert r.status == 404  # nothing else there

    run(main())
