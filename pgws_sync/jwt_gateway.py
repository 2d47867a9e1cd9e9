"""The postgres-websockets compatible gateway: JWT-authorised channels both ways, its settings."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import psycopg2
import psycopg2.extensions
from werkzeug.exceptions import NotFound
from werkzeug.utils import send_from_directory
from werkzeug.wrappers import Request, Response

from .assets import client_js_response
from .channels import validate_channel
from .connection import Connection, Frame
from .endpoint import StartResponse, WSGIEnviron
from .errors import ConfigError, PayloadTooLarge, PgwsError, first_line
from .jwt_auth import Grant, JwtAuth, split_request
from .jwt_messages import (
    CONNECTION_CLOSE,
    CONNECTION_OPEN,
    DEFAULT_LISTEN_CHANNEL,
    WEBSOCKET_MESSAGE,
    error_frame,
    event_payload,
    target_channel,
    too_large_reason,
)
from .listener import Listener
from .listening import ListeningEndpoint
from .messages import Notification, resync_frame
from .pool import NotifyFailed, NotifyPool

logger = logging.getLogger(__name__)

#: The close code and reason postgres-websockets uses when a token expires mid-connection.
CLOSE_JWT_EXPIRED = 3001
JWT_EXPIRED_REASON = "JWT expired"

#: Hub keys of channel readers carry this prefix (audiences never do).
CHANNEL_KEY = "channel:"

WSGIApp = Callable[[WSGIEnviron, StartResponse], Any]


class WriteFailed(NotifyFailed):
    """A browser's message could not be NOTIFYed; the sender gets the reason in an error frame."""


# --------------------------------------------------------------------- endpoint


class JwtGateway(ListeningEndpoint):
    """postgres-websockets as a WSGI app: JWT-authorised channels to and from the database.

    Sockets open as ``/<channel>/<jwt>`` or ``/<jwt>`` (or with the token in
    ``Authorization: Bearer`` or ``Sec-WebSocket-Protocol``); ``auth`` decides
    their channels and mode. A NOTIFY on ``listen_channel`` whose payload is a
    JSON object with a string ``channel`` reaches that channel's readers as
    its raw text; any other payload reaches readers of the channel named like
    ``listen_channel``. Each text frame from a writer becomes one NOTIFY per
    channel, sent through a pool of ``pool_size`` connections to ``dsn``
    (default: the listener's). With ``meta_channel``, ``ConnectionOpen`` and
    ``ConnectionClose`` events are NOTIFYed for that channel's readers.
    The browser client pgws.js is served on ``client_path`` (``None``: not
    served); other requests go to ``fallback`` (a WSGI app, e.g. :func:`static_files`).
    Keyword options are those of :class:`WebSocketEndpoint`; ``allowed_origins``
    defaults to any origin, since tokens, not cookies, authorise sockets.
    """

    def __init__(self, listener: Listener, auth: JwtAuth, *, dsn: Optional[str] = None,
                 listen_channel: str = DEFAULT_LISTEN_CHANNEL,
                 meta_channel: Optional[str] = None, pool_size: int = 10,
                 fallback: Optional[WSGIApp] = None,
                 client_path: Optional[str] = "/pgws.js", **options: Any) -> None:
        if not isinstance(listener, Listener):
            raise ConfigError("JwtGateway(listener, auth): the first argument must be a Listener")
        if not isinstance(auth, JwtAuth):
            raise ConfigError("JwtGateway(listener, auth): auth must be a JwtAuth")
        validate_channel(listen_channel)
        if meta_channel is not None and not meta_channel:
            raise ConfigError("meta_channel must be a channel name or None")
        options.setdefault("allowed_origins", ("*",))
        self.auth = auth
        self.listen_channel = listen_channel
        self.meta_channel = meta_channel
        self.fallback = fallback
        self.client_path = client_path
        self._opened = 0
        self._opened_changed = threading.Condition()  # guards _opened
        super().__init__(listener, [listen_channel], **options)
        self.pool = NotifyPool(listener.dsn if dsn is None else dsn, size=pool_size,
                               wait_timeout=self.write_timeout, statement_timeout=10.0,
                               application_name="pgws_sync writer",
                               size_name="PGWS_POOL_SIZE", error=WriteFailed)

    # ---------------------------------------------------------------- WSGI

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        request = Request(environ)
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            response = self.handle(request)
        elif self.health_path is not None and request.path == self.health_path:
            response = self.health_response()
        elif (self.client_path is not None and request.path == self.client_path
              and request.method in ("GET", "HEAD")):
            response = client_js_response(request)
        elif self.fallback is not None:
            return self.fallback(environ, start_response)
        else:
            response = self.handle(request)  # explains that this URL serves WebSockets
        return response(environ, start_response)

    # ---------------------------------------------------------------- hooks

    def connection_audiences(self, request: Request) -> Sequence[str]:
        return []  # readers join their channels' keys in on_connect

    def on_connect(self, conn: Connection, request: Request) -> None:
        wanted = split_request(request.path, request.headers.get("Authorization"),
                               request.headers.get("Sec-WebSocket-Protocol"))
        grant = self.auth.authorize(wanted.token, wanted.channel)  # TokenRefused: HTTP 400
        conn.metadata["grant"] = grant
        if wanted.subprotocol is not None:
            conn.subprotocol = wanted.subprotocol
        if grant.expires_at is not None:
            conn.close_at(grant.expires_at, CLOSE_JWT_EXPIRED, JWT_EXPIRED_REASON)
        if grant.can_read:
            for channel in grant.channels:
                self.hub.join(conn, CHANNEL_KEY + channel)

    def on_open(self, conn: Connection) -> None:
        grant: Grant = conn.metadata["grant"]
        with self._opened_changed:
            self._opened += 1
        conn.metadata["opened"] = True
        logger.info("socket %s open: mode %s, channels %s", conn.id, grant.mode,
                    ", ".join(grant.channels))
        self._meta_event(CONNECTION_OPEN, grant)

    def on_message(self, conn: Connection, data: Frame) -> None:
        grant: Grant = conn.metadata["grant"]
        try:
            self.relay(grant, data)
        except WriteFailed as exc:
            conn.send(error_frame(str(exc)))

    def on_disconnect(self, conn: Connection) -> None:
        if not conn.metadata.get("opened"):
            return
        try:
            self._meta_event(CONNECTION_CLOSE, conn.metadata["grant"])
        finally:
            with self._opened_changed:
                self._opened -= 1
                self._opened_changed.notify_all()

    # ---------------------------------------------------------------- writes

    def relay(self, grant: Grant, data: Frame) -> None:
        """NOTIFY one message from a socket with ``grant``, once per channel; WriteFailed if not."""
        if not grant.can_write:
            raise WriteFailed("this socket may only read (mode r): the message was not sent")
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise WriteFailed("a binary frame that is not UTF-8 text cannot be sent") from None
        else:
            text = data
        now = time.time()
        payloads = []
        for channel in grant.channels:
            try:
                payloads.append(event_payload(WEBSOCKET_MESSAGE, channel, text, grant.claims, now))
            except PayloadTooLarge as exc:
                raise WriteFailed(too_large_reason(exc)) from None
        self.pool.notify(self.listen_channel, payloads)

    def _meta_event(self, event: str, grant: Grant) -> None:
        if self.meta_channel is None:
            return
        try:
            payload = event_payload(event, self.meta_channel, ",".join(grant.channels),
                                    grant.claims, time.time())
            self.pool.notify(self.listen_channel, [payload])
        except (WriteFailed, PayloadTooLarge) as exc:
            logger.warning("could not send %s to the meta channel %r: %s", event,
                           self.meta_channel, exc)

    # ---------------------------------------------------------- listener sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Hand each payload, as raw text, to the readers of the channel it names."""
        messages: List[Tuple[str, str]] = []
        for note in batch:  # the listener hands us the listen channel's notifications only
            messages.append((CHANNEL_KEY + target_channel(note.payload, self.listen_channel),
                             note.payload))
        self.hub.fan_out(messages)

    def on_resync(self, reason: str) -> None:
        """Tell every reading socket that notifications may have been lost."""
        for conn in self.hub.connections():
            grant: Optional[Grant] = conn.metadata.get("grant")
            if grant is not None and grant.can_read:
                conn.send(resync_frame(grant.channels, reason))

    # ------------------------------------------------------------------ close

    def on_closed(self) -> None:
        super().on_closed()
        # Let the sockets just closed send their ConnectionClose before the pool goes.
        deadline = time.monotonic() + 2.0
        with self._opened_changed:
            while self._opened > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("%d sockets had not finished closing", self._opened)
                    break
                self._opened_changed.wait(left)
        self.pool.close()


# ----------------------------------------------------------------- static files


def static_files(root: str) -> WSGIApp:
    """A WSGI app serving the files under ``root`` (``index.html`` for folders), GET and HEAD."""
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"{root!r} is not a folder")

    def app(environ: WSGIEnviron, start_response: StartResponse) -> Any:
        request = Request(environ)
        if request.method not in ("GET", "HEAD"):
            response = Response("method not allowed\n", status=405, mimetype="text/plain",
                                headers={"Allow": "GET, HEAD"})
            return response(environ, start_response)
        path = request.path.lstrip("/")
        tries = [path + "index.html"] if path == "" or path.endswith("/") else [
            path, path + "/index.html"]
        for candidate in tries:
            try:
                response = send_from_directory(folder, candidate, environ)
            except NotFound:
                continue
            return response(environ, start_response)
        return Response("not found\n", status=404, mimetype="text/plain")(environ, start_response)

    return app


# --------------------------------------------------------------------- settings


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
    except ConfigError as exc:
        raise ConfigError(f"PGWS_LISTEN_CHANNEL: {exc}") from None
    root = environ.get("PGWS_ROOT_PATH") or None
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"PGWS_ROOT_PATH names {root!r}, which is not a readable folder")
    interval = environ.get("PGWS_CHECK_LISTENER_INTERVAL", "").strip()
    if interval:
        _int_setting(environ, "PGWS_CHECK_LISTENER_INTERVAL", 0, 0)
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
    )


def load_auth(settings: GatewaySettings) -> JwtAuth:
    """The JwtAuth of ``settings`` (reads an ``@file`` secret); ConfigError names the variable."""
    return JwtAuth.from_setting(settings.secret, is_base64=settings.secret_is_base64)


def create_gateway_app(settings: GatewaySettings, auth: Optional[JwtAuth] = None) -> JwtGateway:
    """The gateway ``pgws-sync serve`` runs: one listener, the endpoint, static files.

    Create it in the process that serves it (after any fork).
    """
    listener = Listener(settings.dsn, min_reconnect=1.0, max_reconnect=32.0)
    fallback = static_files(settings.root_path) if settings.root_path else None
    gateway = JwtGateway(listener, auth or load_auth(settings),
                         listen_channel=settings.listen_channel,
                         meta_channel=settings.meta_channel, pool_size=settings.pool_size,
                         fallback=fallback)
    logger.info("JWT gateway listening to NOTIFY channel %r", settings.listen_channel)
    return gateway


# ------------------------------------------------------------------ start-up


class DatabaseUnreachable(PgwsError):
    """The database did not answer within the start-up attempts (PGWS_RETRIES)."""


def wait_for_database(dsn: str, retries: int, *, first_delay: float = 1.0,
                      max_delay: float = 32.0, connect_timeout: int = 10,
                      stop: Optional[threading.Event] = None,
                      on_retry: Optional[Callable[[int, str, float], None]] = None) -> int:
    """Connect to ``dsn`` until it works: ``retries`` attempts (0: forever), delays doubling.

    Returns the number of attempts it took. Raises :class:`DatabaseUnreachable`
    after the last failed attempt (or when ``stop`` is set while waiting).
    ``on_retry(attempt, reason, delay)`` is called after each failure that is retried.
    """
    stop = stop or threading.Event()
    params: Dict[str, Any] = {}
    if "connect_timeout" not in (psycopg2.extensions.parse_dsn(dsn) if dsn else {}):
        params["connect_timeout"] = connect_timeout
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            conn = psycopg2.connect(dsn, **params)
        except psycopg2.Error as exc:
            reason = first_line(exc)
        else:
            conn.close()
            return attempt
        if retries and attempt >= retries:
            raise DatabaseUnreachable(
                f"cannot reach the database after {attempt} attempt{'s' if attempt > 1 else ''} "
                f"(PGWS_RETRIES={retries}): {reason}")
        if on_retry is not None:
            on_retry(attempt, reason, delay)
        if stop.wait(delay):
            raise DatabaseUnreachable(f"stopped while waiting for the database: {reason}")
        delay = min(max_delay, delay * 2)

