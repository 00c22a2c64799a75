"""The aiohttp application: shared state, startup (load, register voices and styles, warm up), drain.

    app = create_app(ServerConfig.load(model="sesame/csm-1b", api_keys=[...]))
    web.run_app(app)  # or csm_plugin.server.run.serve(config) for SIGTERM draining

Routes live in routes.py (HTTP) and stream.py (the WebSocket conversation stream).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging

from aiohttp import web

from ..conversation.protocol import Code, ProtocolError
from ..service import CSMService
from ..voices import register
from .admission import Admission
from .auth import AuthThrottle, KeyRing
from .config import ServerConfig
from .metrics import Metrics
from .sessions import Sessions

log = logging.getLogger(__name__)

WARMUP_TEXT = "Hello, this is a warm-up."


class ServerState:
    """Everything the handlers share; one per application."""

    def __init__(self, config: ServerConfig, service: CSMService | None = None):
        self.config = config
        self.limits = config.limits
        self.keys = KeyRing(config.keys(), require=not config.allow_no_auth)
        self.auth_throttle = AuthThrottle(config.auth_failures_per_minute)
        self.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self.metrics_runner: web.AppRunner | None = None
        self.metrics_port: int | None = None  # where /metrics is served when it has a port of its own
        self.metrics = Metrics()
        self.metrics.watch_worker(lambda: self.service._worker)
        self.owns_service = service is None
        self.service = service or CSMService(
            config.model,
            device=config.device,
            dtype=config.dtype,
            quantize=config.quantize,
            compile=config.compile,
            max_cached_conversations=config.max_cached_conversations,
            context_budget=config.limits.context_positions,
            chunk_frames=config.chunk_frames,
            unknown_style_tags=config.unknown_style_tags,
        )
        self.sessions = Sessions(
            self.service, config.limits.retained_conversations, config.limits.idle_timeout_s, self.metrics.conversations.set
        )
        self.voice_names: set[str] = set()
        self.style_names: set[str] = set()
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.connections: set = set()  # stream.Connection
        self.connections_per_key: collections.Counter[str] = collections.Counter()
        limits = config.limits
        self.admission = Admission(
            limits.max_active_replies or self.service.max_cached_conversations, limits.max_streams_per_key,
            limits.max_queued_replies, limits.max_queued_per_key, limits.queue_timeout_s,
            on_change=self._admission_changed,
        )
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []

    def _admission_changed(self, active: int, queued: int, behind: int) -> None:
        self.metrics.queued.set(queued)
        self.metrics.behind.set(behind)

    # Stream accounting: the gauge and the drain read these (admission.py counts the places).
    def stream_started(self, key_id: str) -> None:
        self.active_streams += 1
        self.metrics.active_streams.set(self.active_streams)
        self._idle.clear()

    def stream_ended(self, key_id: str) -> None:
        self.active_streams -= 1
        self.metrics.active_streams.set(self.active_streams)
        if self.active_streams == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def load(self) -> None:
        """Load the model, register the operator's voices and styles, speak once: then ready."""
        try:
            await self.service.start()
            prompts = await asyncio.to_thread(self.config.prompts)  # the config's voices and voices files
            await register(self.service, prompts)
            self.voice_names.update(prompts.voices)
            self.style_names.update(prompts.styles)
            if self.config.warmup:
                conv = self.service.conversation("\x00warmup")
                async for _ in conv.speak(WARMUP_TEXT, seed=0, max_audio_ms=160):
                    pass
                await conv.close()
        except Exception as e:  # noqa: BLE001 - reported by /readyz and /healthz
            log.exception("loading the model failed")
            self.load_error = e
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("model %s loaded and warmed up; ready", self.config.model)


STATE = web.AppKey("csm_state", ServerState)


def create_app(config: ServerConfig, *, service: CSMService | None = None) -> web.Application:
    """The application for `config`. Pass a started `service` to share one (tests, embedding)."""
    from . import routes, stream

    state = ServerState(config, service)
    app = web.Application(client_max_size=config.limits.max_message_bytes, middlewares=[routes.error_middleware])
    app[STATE] = state
    routes.add_routes(app)
    app.router.add_get("/v1/conversations/{conversation_id}/stream", stream.conversation_stream)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


def runner_options(config: ServerConfig) -> dict:
    """Keyword arguments for the app's web.AppRunner. aiohttp's keep-alive timer also runs from
    the moment a connection is accepted and closes it if no whole request has arrived by then:
    that is the header timeout before authentication (a slow or half-open client is dropped)."""
    return {"keepalive_timeout": config.limits.header_timeout_s}


class _Site(web.TCPSite):
    """A TCP site whose TLS handshake must end within the header timeout (asyncio's default is 60 s)."""

    def __init__(self, runner, host, port, *, ssl_context, handshake_timeout: float):
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        kwargs = {"ssl_handshake_timeout": self._handshake_timeout} if self._ssl_context is not None else {}
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, self._host, self._port, ssl=self._ssl_context, reuse_address=True, **kwargs
        )


def make_site(runner: web.AppRunner, config: ServerConfig, host: str | None = None, port: int | None = None) -> web.TCPSite:
    """The listening site for `runner`: HTTPS/WSS when the config has a certificate and key."""
    return _Site(runner, host or config.host, config.port if port is None else port,
                 ssl_context=config.ssl_context(), handshake_timeout=config.limits.header_timeout_s)


def url_scheme(config: ServerConfig) -> str:
    return "https" if config.tls else "http"


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    state._tasks.append(asyncio.create_task(state.load(), name="csm-load"))
    state._tasks.append(asyncio.create_task(state.sessions.run_sweeper(), name="csm-sweeper"))
    if state.config.metrics_port is not None:
        await _serve_metrics(state)


async def _serve_metrics(state: ServerState) -> None:
    """/metrics on a port of its own (metrics_host, default the main host), plain HTTP, so that
    it can be bound to an internal address and never reaches the public listener."""
    from .routes import error_middleware, metrics

    config = state.config
    metrics_app = web.Application(middlewares=[error_middleware])
    metrics_app[STATE] = state
    metrics_app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(metrics_app, access_log=None, **runner_options(config))
    await runner.setup()
    host = config.metrics_host or config.host
    site = web.TCPSite(runner, host, config.metrics_port, reuse_address=True)
    await site.start()
    state.metrics_runner = runner
    state.metrics_port = runner.addresses[0][1] if runner.addresses else config.metrics_port
    log.info("metrics on http://%s:%d/metrics", host, state.metrics_port)


async def drain(app: web.Application, timeout: float) -> bool:
    """Stop taking new replies, let running ones finish (up to `timeout` s), then close every
    stream with 1001 (going away). True if every reply finished."""
    state = app[STATE]
    state.draining = True
    state.ready = False
    state.metrics.ready.set(0)
    state.admission.close(ProtocolError(Code.DRAINING, "the server is shutting down; reconnect (another replica will take over)"))
    log.info("draining: %d replies running", state.active_streams)
    finished = await state.wait_idle(timeout)
    if not finished:
        log.warning("drain timeout: %d replies still running are cut off", state.active_streams)
    await _close_connections(state)
    return finished


async def _close_connections(state: ServerState) -> None:
    connections = list(state.connections)
    await asyncio.gather(*(c.shut_down() for c in connections), return_exceptions=True)


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.draining = True
    state.admission.close(ProtocolError(Code.DRAINING, "the server is shutting down; reconnect (another replica will take over)"))
    await _close_connections(state)


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    if state.metrics_runner is not None:
        await state.metrics_runner.cleanup()
    for task in state._tasks:
        task.cancel()
    await asyncio.gather(*state._tasks, return_exceptions=True)
    if state.owns_service:
        await state.service.close()
