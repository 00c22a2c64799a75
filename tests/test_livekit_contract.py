"""LiveKit Agents' contract for TTS plugins, point by point (livekit-agents 1.8).

Each test names the framework behaviour it mirrors: the retry loop of `tts.ChunkedStream` /
`tts.SynthesizeStream` (`_main_task`: an attempt bounded by `conn_options.timeout`, retried while
`APIError.retryable`), `APIStatusError`'s rule that 4xx are not retried, `TTS.prewarm` (called on
the job's event loop), `TTS.aclose`, and the official plugins (Cartesia, ElevenLabs), which
snapshot their options per stream and surface connection failures as `APIConnectionError`.
Offline: loopback servers only, a small random checkpoint.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("livekit.agents")

from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError  # noqa: E402
from livekit.plugins import csm  # noqa: E402

from csm_plugin.backend import shared_service  # noqa: E402

REPLY_MS = 480
ONE_TRY = APIConnectOptions(max_retry=0, timeout=2.0)


async def _silent_server():
    """Accepts TCP connections and never answers (a hung proxy or server)."""

    async def hold(reader, writer):
        try:
            await reader.read()  # until the client goes away
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _server(checkpoint, **config):
    from aiohttp import web

    from csm_plugin.server.app import create_app
    from csm_plugin.server.config import ServerConfig

    service = await shared_service(checkpoint)
    runner = web.AppRunner(create_app(ServerConfig(model=str(checkpoint), port=0, warmup=False, **config), service=service))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
@pytest.mark.slow
async def test_silent_server_times_out_within_conn_options_and_aclose_returns():
    """ChunkedStream._main_task: each attempt ends within conn_options.timeout with a retryable
    APITimeoutError (so a FallbackAdapter can switch), and TTS.aclose() does not wait on the
    hung connection."""
    server, port = await _silent_server()
    speech = csm.TTS(url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(APITimeoutError) as info:
            await asyncio.wait_for(speech.synthesize("Hello.", conn_options=ONE_TRY).collect(), 30)
        assert info.value.retryable
        await asyncio.wait_for(speech.aclose(), 10)
    finally:
        server.close()


@pytest.mark.asyncio
async def test_refused_connection_is_an_api_connection_error_at_once():
    """A connection refused is APIConnectionError (retryable), raised within the attempt, not
    after the client's own minute of reconnecting."""
    speech = csm.TTS(url=f"http://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(APIConnectionError) as info:
            await asyncio.wait_for(
                speech.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0, timeout=30)).collect(), 15
            )
        assert info.value.retryable and not isinstance(info.value, APITimeoutError)
    finally:
        await asyncio.wait_for(speech.aclose(), 10)


@pytest.mark.asyncio
async def test_wrong_api_key_is_a_401_status_error_never_retried(hf_checkpoint):
    """APIStatusError with a 4xx status is not retryable (livekit.agents._exceptions); the docs
    promise 401 for a refused key."""
    runner, port = await _server(hf_checkpoint, api_keys=["the-right-key-0123456789"])
    speech = csm.TTS(url=f"http://127.0.0.1:{port}", api_key="the-wrong-key-0123456789")
    errors = []
    speech.on("error", errors.append)
    try:
        with pytest.raises(APIStatusError) as info:
            await speech.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=2, retry_interval=0)).collect()
        assert info.value.status_code == 401 and not info.value.retryable
        assert len(errors) == 1 and not errors[0].recoverable  # no retry was attempted
    finally:
        await speech.aclose()
        await runner.cleanup()


@pytest.mark.slow
def test_prewarm_imports_the_model_code_off_the_event_loop(hf_checkpoint):
    """TTS.prewarm() runs on the job's event loop: it must not import torch or load the model
    there (LiveKit's loop monitor reports a 0.5 s block as an error)."""
    code = textwrap.dedent(
        f"""
        import asyncio, sys, threading
        from livekit.plugins import csm

        importers = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    importers.append(threading.current_thread() is threading.main_thread())
                return None

        sys.meta_path.insert(0, Spy())

        async def main():
            speech = csm.TTS(model={str(hf_checkpoint)!r}, follow_session=False)
            speech.prewarm()
            await asyncio.wait_for(speech._backend_task, 120)
            await speech.aclose()

        asyncio.run(main())
        assert importers and not any(importers), importers
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.asyncio
async def test_aclose_stops_open_streams_and_frees_the_conversation(hf_checkpoint):
    """TTS.aclose(): nothing keeps running for a closed TTS. An open stream stops (its history
    keeps what it delivered) and the conversation leaves the shared model."""
    service = await shared_service(hf_checkpoint)
    speech = csm.TTS(backend=service, seed=7, max_audio_ms=8000, follow_session=False)
    stream = speech.stream()
    stream.push_text("This sentence is long enough to keep the model busy for a while, on purpose.")
    stream.end_input()
    await asyncio.wait_for(stream.__anext__(), 60)  # it is speaking
    conversation_id = speech.conversation_id
    await asyncio.wait_for(speech.aclose(), 30)
    assert conversation_id not in service._conversations
    assert service.engine.cached_keys(conversation_id) == []
    assert not any(s.owner == conversation_id for s in service.engine.slots)
    await stream.aclose()


@pytest.mark.asyncio
async def test_options_are_snapshotted_per_stream(hf_checkpoint):
    """The official plugins copy their options when a stream is created: update_options() during
    a stream applies to the next one."""
    service = await shared_service(hf_checkpoint)
    speech = csm.TTS(backend=service, seed=7, max_audio_ms=REPLY_MS, follow_session=False)
    stream = speech.stream()
    speech.update_options(max_audio_ms=160)  # after the stream was created
    stream.push_text("Hello there my friend.")  # one clause
    stream.end_input()
    frames = [ev async for ev in stream]
    assert sum(ev.frame.samples_per_channel for ev in frames) == 6 * 1920  # REPLY_MS, not 160 ms
    frame = await speech.synthesize("And now?").collect()
    assert frame.samples_per_channel == 2 * 1920  # the next one uses the update
    await stream.aclose()
    await speech.aclose()
