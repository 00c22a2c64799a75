"""Run a server process: listen, load, say when ready, and on SIGTERM (or SIGINT) drain, then exit 0.

Startup: the socket is bound first (so /healthz and /readyz answer while the model loads), then
the model loads; "ready on http://host:port" is printed once it is loaded and warmed up. A model
that fails to load ends the process with status 2 and a one-line error. Each request is logged
by aiohttp's access logger (logger `aiohttp.access`, INFO).

Draining: /readyz turns 503 and new streams are refused with 503 (a load balancer moves them to
another replica), replies already running finish, then every socket is closed with 1001 and the
process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from aiohttp import web

from ..errors import CSMError
from ..threads import configure_threads
from .app import STATE, create_app, drain, make_site, runner_options, url_scheme
from .config import ServerConfig

log = logging.getLogger(__name__)

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'
LOAD_FAILED = 2  # the exit status when the model cannot be loaded


class _NoTracebackForCSMErrors(logging.Filter):
    """The app logs a failed load with its traceback; for a CSMError (a missing or bad checkpoint)
    the one-line message this module prints says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CSMError):
            return False
        return True


async def serve(config: ServerConfig, *, started=None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status. `started(port)` is called once listening."""
    threads = configure_threads(config.torch_threads)
    if not config.binds_loopback_only:
        if config.allow_no_auth:
            log.warning("serving on %s WITHOUT authentication: anyone who can reach it can use the GPU", config.host)
        else:
            log.info("serving on %s (not loopback): API keys are required", config.host)
    app = create_app(config)
    state = app[STATE]
    runner = web.AppRunner(app, handle_signals=False, access_log=logging.getLogger("aiohttp.access"),
                           access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=5.0, **runner_options(config))
    load_filter = _NoTracebackForCSMErrors()
    logging.getLogger("csm_plugin.server.app").addFilter(load_filter)
    loading_since = time.perf_counter()
    await runner.setup()
    try:
        site = make_site(runner, config)  # HTTPS/WSS with tls_cert_file and tls_key_file
        await site.start()
    except (OSError, CSMError) as e:
        await runner.cleanup()
        logging.getLogger("csm_plugin.server.app").removeFilter(load_filter)
        print(f"error: cannot listen on {config.host}:{config.port}: {getattr(e, 'strerror', None) or e}", file=sys.stderr, flush=True)
        return LOAD_FAILED
    port = runner.addresses[0][1] if runner.addresses else config.port
    url = f"{url_scheme(config)}://{config.host}:{port}"
    frames = {False: "uncompiled", True: "compiled", "graphs": "CUDA graphs"}[state.service.compile]
    print(f"csm-plugin server listening on {url} (model {config.model} on {config.device}, frames {frames}, "
          f"{threads} CPU thread(s)); loading the model...", flush=True)
    if started is not None:
        started(port)

    stop = asyncio.Event()
    status = 0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_load() -> None:
        nonlocal status
        while not state.ready and state.load_error is None and not state.draining:
            await asyncio.sleep(0.05)
        if state.load_error is not None:
            print(f"error: could not load the model {config.model}: {state.load_error}", file=sys.stderr, flush=True)
            status = LOAD_FAILED
            stop.set()
        elif state.ready:
            print(f"csm-plugin server ready on {url} (model loaded and warmed up in "
                  f"{time.perf_counter() - loading_since:.1f} s)", flush=True)

    watcher = asyncio.create_task(watch_load(), name="csm-watch-load")
    try:
        await stop.wait()
        if status == 0:
            print("csm-plugin server: draining", flush=True)
            finished = await drain(app, config.drain_timeout_s)
            print(f"csm-plugin server: drained ({'all replies finished' if finished else 'drain timeout'}); exiting", flush=True)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        logging.getLogger("csm_plugin.server.app").removeFilter(load_filter)
    return status


def main(config: ServerConfig) -> int:
    return asyncio.run(serve(config))
