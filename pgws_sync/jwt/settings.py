"""The gateway ``pgws-sync serve`` runs in JWT mode, configured by postgres-websockets' variables."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .._core.assets import static_files
from .._formats import validate_channel
from ..errors import ConfigError, InvalidChannel
from ..sources.postgres import Listener
from .auth import JwtAuth
from .endpoint import JwtGateway
from .messages import DEFAULT_LISTEN_CHANNEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    """postgres-websockets' configuration, read from its environment variables."""

    dsn: str
    secret: str
    secret_is_base64: bool = False
    listen_channel: str = DEFAULT_LISTEN_CHANNEL
    meta_channel: Optional[str] = None
    root_path: Optional[str] = None
    host: str = "*4"
    port: int = 3000
    pool_size: int = 10
    retries: int = 5
    #: PGWS_CHECK_LISTENER_INTERVAL: milliseconds between checks of the listener (0: default).
    check_listener_ms: int = 0

    @property
    def heartbeat_interval(self) -> float:
        """The listener's ``heartbeat_interval`` (it checks after half of it without traffic)."""
        return 2 * self.check_listener_ms / 1000 if self.check_listener_ms else 10.0

    @property
    def bind(self) -> str:
        """``host:port`` for gunicorn (Warp's ``*4``/``*``/``*6`` become wildcards)."""
        host = {"*": "0.0.0.0", "*4": "0.0.0.0", "!4": "0.0.0.0", "*6": "[::]",
                "!6": "[::]"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


def _int_setting(environ: Mapping[str, str], name: str, default: int, low: int,
                 high: Optional[int] = None) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        limits = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise ConfigError(f"{name} must be {limits}, got {value}")
    return value


def _bool_setting(environ: Mapping[str, str], name: str) -> bool:
    text = environ.get(name, "").strip().lower()
    if text in ("", "false", "0", "no", "off"):
        return False
    if text in ("true", "1", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be true or false, got {environ[name]!r}")


def settings_from_environ(environ: Mapping[str, str], *, dsn: str,
                          secret: Optional[str] = None) -> GatewaySettings:
    """Read the PGWS_* variables of postgres-websockets; ``secret`` overrides PGWS_JWT_SECRET.

    ``dsn`` is resolved by the caller (PGWS_DB_URI and its ``@file``). Raises
    :class:`ConfigError` naming the variable that is missing or wrong.
    """
    if secret is None:
        secret = environ.get("PGWS_JWT_SECRET")
    if not secret:
        raise ConfigError(f"PGWS_JWT_SECRET is {'empty' if secret == '' else 'not set'}: give "
                          f"the JWT secret (a string, a JWK or a JWKS; @FILE reads it from FILE)")
    listen = environ.get("PGWS_LISTEN_CHANNEL") or DEFAULT_LISTEN_CHANNEL
    try:
        validate_channel(listen)
    except InvalidChannel as exc:
        raise ConfigError(f"PGWS_LISTEN_CHANNEL: {exc}") from None
    root = environ.get("PGWS_ROOT_PATH") or None
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"PGWS_ROOT_PATH names {root!r}, which is not a readable folder")
    check_ms = _int_setting(environ, "PGWS_CHECK_LISTENER_INTERVAL", 0, 0)
    if 0 < check_ms < 100:
        raise ConfigError(f"PGWS_CHECK_LISTENER_INTERVAL must be 0 (the default, 5000) or at "
                          f"least 100 milliseconds, got {check_ms}")
    return GatewaySettings(
        dsn=dsn,
        secret=secret,
        secret_is_base64=_bool_setting(environ, "PGWS_JWT_SECRET_BASE64"),
        listen_channel=listen,
        meta_channel=environ.get("PGWS_META_CHANNEL") or None,
        root_path=root,
        host=environ.get("PGWS_HOST") or "*4",
        port=_int_setting(environ, "PGWS_PORT", 3000, 1, 65535),
        pool_size=_int_setting(environ, "PGWS_POOL_SIZE", 10, 1),
        retries=_int_setting(environ, "PGWS_RETRIES", 5, 0),
        check_listener_ms=check_ms,
    )


def load_auth(settings: GatewaySettings) -> JwtAuth:
    """The JwtAuth of ``settings`` (reads an ``@file`` secret); ConfigError names the variable."""
    return JwtAuth.from_setting(settings.secret, is_base64=settings.secret_is_base64)


def create_gateway_app(settings: GatewaySettings, auth: Optional[JwtAuth] = None, *,
                       metrics: bool = False, health_detail: bool = False) -> JwtGateway:
    """The gateway ``pgws-sync serve`` runs: one listener, the endpoint, static files.

    Create it in the process that serves it (after any fork).
    """
    listener = Listener(settings.dsn, min_reconnect=1.0, max_reconnect=32.0,
                        heartbeat_interval=settings.heartbeat_interval)
    fallback = static_files(settings.root_path) if settings.root_path else None
    gateway = JwtGateway(listener, auth or load_auth(settings),
                         listen_channel=settings.listen_channel,
                         meta_channel=settings.meta_channel, pool_size=settings.pool_size,
                         fallback=fallback, metrics_path="/metrics" if metrics else None,
                         health_detail=health_detail)
    logger.info("JWT gateway listening to NOTIFY channel %r", settings.listen_channel)
    return gateway
