"""JwtGateway: postgres-websockets' endpoint, JWT-authorised channels to and from the database."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple

from werkzeug.wrappers import Request

from .._dsn import Dsn
from .._core.assets import StartResponse, WSGIApp, WSGIEnviron, client_js_response
from .._core.connection import APP_TEXT, Connection
from .._core.wire import Frame
from .._formats import error_frame, validate_channel
from .._listening import ListeningEndpoint, listener_dsn
from ..errors import ConfigError, PayloadTooLarge, WriteFailed
from ..sources.base import Notification, Source
from ..sources.notify_pool import DEFAULT_MAX_QUEUE_USAGE, NotifyPool
from .auth import Grant, JwtAuth, split_request
from .messages import (
    CONNECTION_CLOSE,
    CONNECTION_OPEN,
    DEFAULT_LISTEN_CHANNEL,
    WEBSOCKET_MESSAGE,
    event_payload,
    target_channel,
    too_large_reason,
)

logger = logging.getLogger(__name__)

#: The close code and reason postgres-websockets uses when a token expires mid-connection.
CLOSE_JWT_EXPIRED = 3001
JWT_EXPIRED_REASON = "JWT expired"

#: Hub keys of channel readers carry this prefix (audiences never do).
CHANNEL_KEY = "channel:"


class JwtGateway(ListeningEndpoint):
    """postgres-websockets as a WSGI app: JWT-authorised channels to and from the database.

    Sockets open as ``/<channel>/<jwt>`` or ``/<jwt>`` (or with the token in
    ``Authorization: Bearer`` or ``Sec-WebSocket-Protocol``); ``auth`` decides
    their channels and mode. A NOTIFY on ``listen_channel`` whose payload is a
    JSON object with a string ``channel`` reaches that channel's readers as
    its raw text; any other reaches readers of the channel named like
    ``listen_channel``. Each text frame from a writer becomes one NOTIFY per
    channel. Other requests go to ``fallback``.

    :param listener: the source of the NOTIFYs on ``listen_channel``.
    :param auth: decides each socket's channels and mode from its token.
    :param dsn: database for writes (default: the listener's).
    :param listen_channel: the NOTIFY channel read and written.
    :param meta_channel: channel for ``ConnectionOpen``/``ConnectionClose`` events (None: none).
    :param pool_size: connections per process for writes.
    :param fallback: WSGI app for other requests (e.g. :func:`static_files`).
    :param client_path: where pgws.js is served (None: not served).
    :param **options: those of :class:`WebSocketEndpoint`; ``allowed_origins`` defaults to
        any origin, since tokens, not cookies, authorise sockets.
    """

    def __init__(self, listener: Source, auth: JwtAuth, *, dsn: Optional[Dsn] = None,
                 listen_channel: str = DEFAULT_LISTEN_CHANNEL,
                 meta_channel: Optional[str] = None, pool_size: int = 10,
                 fallback: Optional[WSGIApp] = None,
                 client_path: Optional[str] = "/pgws.js", **options: Any) -> None:
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
        self.pool = NotifyPool(listener_dsn(listener, dsn, "JwtGateway"), size=pool_size,
                               wait_timeout=self.write_timeout, statement_timeout=10.0,
                               application_name="pgws_sync writer",
                               size_name="PGWS_POOL_SIZE", error=WriteFailed, kind="write",
                               max_queue_usage=DEFAULT_MAX_QUEUE_USAGE)

    # ---------------------------------------------------------------- WSGI

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        request = Request(environ)
        upgrade = environ.get("HTTP_UPGRADE", "").lower() == "websocket"
        service = None if upgrade else self.service_response(request)
        if upgrade:
            response = self.handle(request)
        elif service is not None:
            response = service
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
            conn.send(error_frame(str(exc), compact=True))

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
        self.hub.fan_out(messages, kind=APP_TEXT)

    def resync_channels(self, conn: Connection) -> Optional[Sequence[str]]:
        """A reading socket's channels; None for a socket that may only write."""
        grant: Optional[Grant] = conn.metadata.get("grant")
        return grant.channels if grant is not None and grant.can_read else None

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
