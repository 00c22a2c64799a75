"""Server settings: pydantic models filled from (lowest to highest precedence) defaults, a JSON
config file, CSM_* environment variables and command-line flags.

Everything a client could abuse is bounded here, and nothing here is chosen by a client: the
model, voice files and key files come from the operator only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ..errors import CSMError

if TYPE_CHECKING:
    from ..voices import Prompts

ENV_PREFIX = "CSM_"


class ConfigError(CSMError, ValueError):
    """The server configuration is invalid (bad file, bad value, or no API keys)."""


class Limits(BaseModel):
    """Per-message, per-conversation and per-key bounds. Every limit has a clear error code."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest WebSocket message or HTTP body")
    max_text_chars: int = Field(2000, ge=1, description="longest text of a segment or a reply")
    max_audio_seconds: float = Field(60.0, gt=0, description="longest input audio (or codes) of one segment")
    max_reply_ms: float = Field(60_000.0, ge=80, description="cap on one reply's audio")
    context_positions: int | None = Field(None, ge=64, description="context budget in model positions (None: the model's)")
    # A conversation's history is bounded by its context budget (csm_plugin.conversation.History):
    # every turn takes at least 4 positions, so 2048 positions hold at most 513 turns, and the
    # default admits every history a server can hold (a failover replay is never refused).
    max_history_segments: int = Field(1000, ge=1, description="most segments a restore may carry")
    max_conversations_per_key: int = Field(64, ge=1, description="open conversation streams per API key")
    max_streams_per_key: int = Field(16, ge=1, description="replies generating at once per API key (more wait in the queue)")
    max_active_replies: int | None = Field(None, ge=1, description="replies generating at once in all (None: one per KV-cache slot)")
    max_queued_replies: int = Field(256, ge=0, description="replies waiting for a place, in all (beyond: busy)")
    max_queued_per_key: int = Field(64, ge=0, description="replies of one API key waiting for a place (beyond: busy)")
    queue_timeout_s: float = Field(30.0, gt=0, description="longest a reply waits for a place before it is refused with busy")
    reader_lag_s: float = Field(2.0, gt=0, description="how far a reader may fall behind real-time playback before it counts as behind")
    max_connections: int = Field(1024, ge=1, description="open WebSocket streams in all")
    retained_conversations: int = Field(1024, ge=1, description="detached conversations kept for a reconnect")
    idle_timeout_s: float = Field(1800.0, gt=0, description="a detached conversation is forgotten after this")
    send_timeout_s: float = Field(10.0, gt=0, description="a reply whose reader stays behind this long ends with slow_consumer")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must finish its TLS handshake and request headers within this "
        "(before any authentication), and an idle keep-alive connection is closed after it"
    )
    stream_idle_timeout_s: float | None = Field(
        600.0, gt=0, description="a conversation stream with no client message and no reply for this long is closed "
        "(code 4002; the client reopens it on its next request); None: never"
    )
    send_buffer_bytes: int = Field(
        65536, ge=0, description="kernel send buffer of a stream's socket (0: the kernel's autotuning, up to megabytes "
        "that hide a stalled reader for minutes of audio)"
    )


class VoiceConfig(BaseModel):
    """A voice prompt the operator registers at startup; clients may only name it. The same
    entry as a voices file's (csm_plugin.voices), written inline; a relative audio path is
    relative to the working directory."""

    model_config = ConfigDict(extra="forbid")

    name: str
    text: str
    audio: Path


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "sesame/csm-1b"
    device: str = "cpu"
    dtype: str = "float32"
    quantize: Literal["int8"] | None = Field(None, description="int8 linear layers (CPU, float32)")
    compile: bool | Literal["graphs"] | None = Field(
        None, description='the frame steps at startup: true compiles them (CUDA graphs on GPUs), "graphs" captures the '
                          'CUDA graphs without torch.compile (seconds), false neither; default: "graphs" on a GPU, false on a CPU'
    )
    max_cached_conversations: int = Field(8, ge=1, description="KV-cache slots")
    chunk_frames: int = Field(1, ge=1, description="80 ms frames per audio message")
    torch_threads: int | None = Field(None, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list)
    api_keys_file: Path | None = None
    allow_no_auth: bool = False
    metrics_require_auth: bool = False
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port (on metrics_host) and not on the main port"
    )
    metrics_host: str | None = Field(None, description="address for metrics_port (default: host)")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve HTTPS/WSS (with tls_key_file)")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    auth_failures_per_minute: int = Field(
        30, ge=1, description="failed authentications one client address may make in a minute; then 429 for a minute"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses/networks of proxies (nginx) whose X-Forwarded-For names the client"
    )
    voices: list[VoiceConfig] = Field(default_factory=list)
    voices_file: list[Path] = Field(
        default_factory=list, description="voices and styles files (docs/voices.md) registered at startup; one path or a list"
    )
    unknown_style_tags: Literal["drop", "speak"] = Field(
        "drop", description="a reply's leading [name] tag that names no registered style: dropped, or spoken as text"
    )
    warmup: bool = True
    drain_timeout_s: float = Field(60.0, ge=0, description="on SIGTERM: how long running replies may take to finish")
    heartbeat_s: float = Field(30.0, gt=0, description="WebSocket ping interval")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        if not host:
            raise ValueError("host is empty")
        return host

    @field_validator("voices_file", mode="before")
    @classmethod
    def _voices_files(cls, value: Any) -> Any:
        if isinstance(value, str):  # one path, or several separated by os.pathsep (CSM_VOICES_FILE=a.json:b.toml)
            return [p for p in value.split(os.pathsep) if p]
        if isinstance(value, os.PathLike):
            return [value]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            ipaddress.ip_network(proxy, strict=False)  # ValueError names the bad one
        return proxies

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file (CSM_TLS_CERT_FILE, CSM_TLS_KEY_FILE)")
        return self

    def prompts(self) -> Prompts:
        """The voices and styles to register: the inline `voices`, then every `voices_file`,
        each checked and its audio read (csm_plugin.voices); VoicesFileError names what is
        wrong, and a name defined twice is one."""
        from ..voices import Prompts, VoicesFileError, from_mapping, load

        names = [v.name for v in self.voices]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise VoicesFileError(f"the server config's voices: voice {twice[0]!r} is defined twice")
        prompts = Prompts()
        if self.voices:
            inline = {"voices": {v.name: {"text": v.text, "audio": str(v.audio)} for v in self.voices}}
            prompts = from_mapping(inline, base=Path("."), source="the server config's voices")
        for path in self.voices_file:
            prompts = prompts.merged(load(path))
        return prompts

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (TLS 1.2 or later), or None without TLS; ConfigError if the
        certificate or key cannot be loaded."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the TLS certificate {self.tls_cert_file} / key {self.tls_key_file}: {e}") from e
        return context

    @property
    def binds_loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def keys(self) -> list[str]:
        """The accepted bearer tokens: inline ones plus those in api_keys_file (one per line, # comments)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            keys += read_keys_file(self.api_keys_file)
        keys = [k for k in keys if k]
        if keys and self.allow_no_auth:
            sources = [what for what, given in (
                ("api_keys (CSM_API_KEYS or the config file)", self.api_keys), (f"the keys file {self.api_keys_file}", self.api_keys_file),
            ) if given]
            raise ConfigError(
                f"--no-auth (allow_no_auth) but {len(keys)} API key(s) are configured in {' and '.join(sources)}: "
                "refusing to start rather than ignore them; remove the keys or drop --no-auth"
            )
        if not keys and not self.allow_no_auth:
            raise ConfigError(
                "no API keys: set CSM_API_KEYS (comma-separated), CSM_API_KEYS_FILE or --api-keys-file; "
                "or run without authentication with --no-auth (not recommended beyond loopback)"
            )
        if any(len(k) < 16 for k in keys):
            raise ConfigError("API keys must be at least 16 characters long")
        return keys

    @classmethod
    def load(
        cls, config_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServerConfig:
        """Defaults < JSON config file < environment < overrides (None values are ignored)."""
        environ = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        config_file = config_file or environ.get(ENV_PREFIX + "SERVER_CONFIG")
        if config_file:
            try:
                data = json.loads(Path(config_file).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"cannot read server config {config_file}: {e}") from e
            if not isinstance(data, dict):
                raise ConfigError(f"{config_file}: expected a JSON object")
        data.update(_from_env(environ))
        for key, value in overrides.items():
            if value is None:
                continue
            if key in Limits.model_fields:
                data.setdefault("limits", {})[key] = value
            else:
                data[key] = value
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"invalid server configuration: {e}") from e


_ENV_FIELDS = {
    "MODEL": "model",
    "DEVICE": "device",
    "DTYPE": "dtype",
    "QUANTIZE": "quantize",
    "COMPILE": "compile",
    "HOST": "host",
    "PORT": "port",
    "API_KEYS_FILE": "api_keys_file",
    "TORCH_THREADS": "torch_threads",
    "MAX_CACHED_CONVERSATIONS": "max_cached_conversations",
    "DRAIN_TIMEOUT_S": "drain_timeout_s",
    "TLS_CERT_FILE": "tls_cert_file",
    "TLS_KEY_FILE": "tls_key_file",
    "METRICS_PORT": "metrics_port",
    "METRICS_HOST": "metrics_host",
    "VOICES_FILE": "voices_file",
    "UNKNOWN_STYLE_TAGS": "unknown_style_tags",
}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for suffix, name in _ENV_FIELDS.items():
        if environ.get(ENV_PREFIX + suffix):
            data[name] = environ[ENV_PREFIX + suffix]
    if environ.get(ENV_PREFIX + "API_KEYS"):
        data["api_keys"] = [k.strip() for k in environ[ENV_PREFIX + "API_KEYS"].split(",") if k.strip()]
    for name in Limits.model_fields:
        value = environ.get(ENV_PREFIX + "LIMIT_" + name.upper())
        if value:
            data.setdefault("limits", {})[name] = value
    return data


def read_keys_file(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read API keys file {path}: {e}") from e
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

