"""Run a server process: listen, and on SIGTERM (or SIGINT) drain, then exit 0.

Draining: /readyz turns 503 and new streams are refused with 503 (a load balancer moves them to
another replica), replies already running finish, then every socket is closed with 1001 and the
process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import torch
from aiohttp import web

from .app import create_app, drain
from .config import ServerConfig

log = logging.getLogger(__name__)


async def serve(config: ServerConfig, *, started=None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status. `started(port)` is called once listening."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if not config.binds_loopback_only:
        if config.allow_no_auth:
            log.warning("serving on %s WITHOUT authentication: anyone who can reach it can use the GPU", config.host)
        else:
            log.info("serving on %s (not loopback): API keys are required", config.host)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.port
    print(f"csm-plugin server listening on http://{config.host}:{port} (model {config.model})", flush=True)
    if started is not None:
        started(port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        print("csm-plugin server: draining", flush=True)
        finished = await drain(app, config.drain_timeout_s)
        print(f"csm-plugin server: drained ({'all replies finished' if finished else 'drain timeout'}); exiting", flush=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return 0


def main(config: ServerConfig) -> int:
    return asyncio.run(serve(config))
