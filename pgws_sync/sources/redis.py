"""The Redis source: one pub/sub connection per process that SUBSCRIBEs and hands messages on."""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from typing import Any, Dict, FrozenSet, List, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._formats import validate_name
from ..errors import ConfigError, InvalidPayload, RedisPublishFailed, first_line
from .base import NoAnswer, Notification, SourceThread, Stopping

logger = logging.getLogger(__name__)

#: The name the source's connections show in Redis's ``CLIENT LIST``.
CLIENT_NAME = "pgws_sync-redis-source"

#: Replies read in one go before the thread looks at its other duties (stop, dispatch, PING).
_READ_BUDGET = 1000


def redact_url(url: str) -> str:
    """``url`` with its password (user part or ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}"
        query = parts.query
        if "password" in query:
            query = urlencode([(k, "***" if k == "password" else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)])
        if (netloc, query) == (parts.netloc, parts.query):
            return url  # nothing to hide (and unix:///path keeps its slashes)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable Redis URL>"


def _import_redis() -> Any:
    try:
        import redis
        import redis.backoff
        import redis.connection
        import redis.retry
    except ImportError as exc:
        raise ConfigError(
            f"RedisSource needs the redis package ({exc}): install pgws_sync with its redis "
            f"extra (from a checkout: pip install '.[redis]'), or pip install redis"
        ) from None
    return redis


class RedisSource(SourceThread):
    """Owns the one SUBSCRIBE connection to Redis of this process and the thread that reads it.

    It feeds endpoints exactly as a :class:`~pgws_sync.Listener` does (payloads
    decoded as UTF-8; a message that is not UTF-8 is dropped with a warning),
    and :meth:`publish` sends from the caller's thread on a separate client.
    SUBSCRIBE is literal: ``*`` and ``?`` in a channel name are not patterns.

    :param url: ``redis://``, ``rediss://`` or ``unix://`` URL of the server.
    :param min_reconnect: first delay, in seconds, before reconnecting.
    :param max_reconnect: longest delay, in seconds, between reconnection attempts.
    :param heartbeat_interval: seconds within which a silently dead connection is noticed.
    :param connect_timeout: seconds connecting (and subscribing) may take; also bounds
        :meth:`publish`.
    :param coalesce: seconds over which a stream of messages is gathered (0: none).
    """

    _thread_prefix = "pgws-redis"
    _what = "redis source"
    _log = logger
    _stopped_message = "this RedisSource was stopped; create a new RedisSource"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        min_reconnect: float = 1.0,
        max_reconnect: float = 30.0,
        heartbeat_interval: float = 10.0,
        connect_timeout: float = 5.0,
        coalesce: float = 0.010,
    ) -> None:
        super().__init__(min_reconnect=min_reconnect, max_reconnect=max_reconnect,
                         heartbeat_interval=heartbeat_interval,
                         connect_timeout=connect_timeout, coalesce=coalesce)
        self._redis = _import_redis()
        self.url = url
        self.redacted_url = redact_url(url)
        self._conn_class, self._conn_kwargs = self._connection_settings()
        self._connect_errors = self._serve_errors = (self._redis.RedisError, OSError, NoAnswer)

        # Used by the source's thread alone (beside _conn):
        self._sel: Any = None  # the selector of _conn and the wake-up pipe, made by _open()
        self._sent: FrozenSet[str] = frozenset()  # what SUBSCRIBE/UNSUBSCRIBE asked for so far
        self._pending: List[Notification] = []  # read, not handed on yet
        self._more = False  # replies may wait in the parser's buffer, where select() cannot see

        self._publish_lock = threading.Lock()  # guards the publishing client below
        self._client: Any = None
        self._client_pid: Optional[int] = None

    # ----------------------------------------------------------------- public

    def publish(self, channel: str, text: str) -> int:
        """PUBLISH ``text`` on ``channel``; return how many subscribers received it.

        Sent from the calling thread on this process's publishing client
        (created on first use, shared by threads), never on the SUBSCRIBE
        connection. Raises :class:`RedisPublishFailed` when Redis cannot be
        reached within ``connect_timeout`` or refuses the command.
        """
        channel = validate_name(channel)
        if not isinstance(text, str):
            raise InvalidPayload(f"a Redis message must be text (str), got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPayload("a Redis message must be encodable as UTF-8 "
                                 "(it contains a lone surrogate)") from None
        client = self._publisher(channel)
        try:
            return int(client.publish(channel, data))
        except (self._redis.RedisError, OSError) as exc:
            raise RedisPublishFailed(channel, first_line(exc), self.redacted_url) from exc

    # ------------------------------------------------------ SourceThread hooks

    def _validate_channel(self, channel: str) -> str:
        return validate_name(channel)

    def _describe(self) -> Dict[str, Any]:
        return {"url": self.redacted_url}  # password redacted

    def _reset_for_this_process(self) -> None:
        # A connection inherited through fork belongs to the parent's thread. It is
        # dropped, never used: redis-py closes only this process's copy of the socket
        # (no shutdown) when the object goes, so the parent's session is untouched.
        self._conn = None
        self._sel = None
        self._sent = frozenset()
        self._pending = []
        self._more = False

    def _on_stop(self) -> None:
        with self._publish_lock:
            client = self._client if self._client_pid == os.getpid() else None
            self._client = None
        if client is not None:
            client.close()

    def _open(self) -> None:
        """Connect, SUBSCRIBE to every wanted channel and wait until Redis confirmed them."""
        self._sent = frozenset()
        self._pending = []
        self._more = False
        self._sel = sel = selectors.DefaultSelector()
        self._conn = conn = self._conn_class(**self._conn_kwargs)
        conn.connect()  # blocking, each step bounded by connect_timeout
        # redis-py has no public accessor for the socket; ``_sock`` has held it from 4.x on.
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise ConfigError("this redis-py version keeps its socket elsewhere: "
                              "RedisSource cannot wait on it")
        sel.register(sock, selectors.EVENT_READ, "redis")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._reconcile(conn)
        deadline = time.monotonic() + self.connect_timeout
        while not self._sent <= self._listening:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer(f"Redis did not confirm SUBSCRIBE within "
                               f"{self.connect_timeout:.1f}s")
            self._pump(conn, sel, left)
        logger.info("redis source connected to %s, subscribed to %s",
                    self.redacted_url, sorted(self._listening))

    def _serve(self) -> None:
        try:
            self._read_loop(self._conn, self._sel, self.heartbeat_interval / 2)
        finally:
            if self._pending:  # what was held back to coalesce is not lost with the connection
                batch, self._pending = self._pending, []
                self._deliver(batch)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        sel, self._sel = self._sel, None
        if sel is not None:
            sel.close()
        if conn is not None:
            try:
                conn.disconnect()
            except (self._redis.RedisError, OSError):
                pass

    def _log_cannot_connect(self, reason: str) -> None:
        logger.warning("redis source cannot connect to %s: %s", self.redacted_url, reason)

    # --------------------------------------------------------------- internals

    def _connection_settings(self) -> Tuple[Any, Dict[str, Any]]:
        """The redis-py connection class and arguments for the SUBSCRIBE connection."""
        redis = self._redis
        try:
            kwargs = redis.connection.parse_url(self.url)  # what from_url() reads from a URL
        except ValueError as exc:
            raise ConfigError(f"cannot use Redis URL {self.redacted_url}: {exc}") from None
        connection_class = kwargs.pop("connection_class", redis.connection.Connection)
        kwargs.update(
            socket_timeout=self.connect_timeout,  # only ever waits for the rest of a started reply
            client_name=CLIENT_NAME,
            health_check_interval=0,  # the thread sends its own PINGs
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),  # the thread does the retrying
            decode_responses=False,  # payloads are decoded here, so bad UTF-8 drops one message
        )
        if int(redis.__version__.split(".")[0]) >= 5:
            kwargs["protocol"] = 2  # pub/sub replies as plain arrays (redis-py 5+ may choose 3)
        else:
            kwargs.pop("protocol", None)  # redis-py 4 speaks RESP2 only
        if issubclass(connection_class, redis.connection.Connection):
            # TCP only: redis-py 4's unix socket connection takes neither option.
            kwargs.update(socket_connect_timeout=self.connect_timeout, socket_keepalive=True)
        try:
            connection_class(**kwargs)  # no I/O: only checks the URL's options now, not later
        except (TypeError, ValueError, redis.RedisError) as exc:
            raise ConfigError(f"cannot use Redis URL {self.redacted_url}: {exc}") from None
        return connection_class, kwargs

    def _publisher(self, channel: str) -> Any:
        pid = os.getpid()
        with self._publish_lock:
            if self._stopped:
                raise RedisPublishFailed(channel, "this RedisSource was stopped",
                                         self.redacted_url, "Publish through a new RedisSource.")
            if self._client is None or self._client_pid != pid:
                redis = self._redis
                # Creating the client does no I/O: it connects on first use.
                options: Dict[str, Any] = {"socket_timeout": self.connect_timeout}
                if issubclass(self._conn_class, redis.connection.Connection):  # TCP
                    options["socket_connect_timeout"] = self.connect_timeout
                self._client = redis.Redis.from_url(
                    self.url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **options
                )
                self._client_pid = pid
            return self._client

    def _read_loop(self, conn: Any, sel: selectors.BaseSelector, half: float) -> None:
        last_traffic = time.monotonic()
        ping_sent: Optional[float] = None
        last_dispatch = 0.0
        while True:
            now = time.monotonic()
            timeout = max(0.0, (last_traffic if ping_sent is None else ping_sent) + half - now)
            if self._pending:  # held back to coalesce: read more until it is due
                timeout = min(timeout, max(0.0, last_dispatch + self.coalesce - now))
            if self._pump(conn, sel, timeout):
                last_traffic = time.monotonic()
                ping_sent = None  # anything that arrives shows the connection is alive
            now = time.monotonic()
            if self._pending and now >= last_dispatch + self.coalesce:
                last_dispatch = now
                batch, self._pending = self._pending, []
                self._deliver(batch)
            now = time.monotonic()
            if ping_sent is not None and now - ping_sent >= half:
                raise NoAnswer(f"Redis did not answer a PING within {half:.1f}s")
            if ping_sent is None and now - last_traffic >= half:
                conn.send_command("PING")
                ping_sent = now

    def _pump(self, conn: Any, sel: selectors.BaseSelector, timeout: float) -> bool:
        """Wait up to ``timeout`` for Redis or a wake-up and handle both; True if Redis sent."""
        readable = self._more
        for key, _ in sel.select(0.0 if self._more else timeout):
            if key.data == "wake":  # stop(), or sinks changed their channels
                self._drain_wake()
                if self._stopped:
                    raise Stopping()
                self._reconcile(conn)
            else:
                readable = True
        if self._stopped:
            raise Stopping()
        if readable:
            self._more = self._read(conn)
        return readable

    def _read(self, conn: Any) -> bool:
        """Handle what Redis sent; True if more may wait in the parser's buffer."""
        for _ in range(_READ_BUDGET):
            self._handle(conn.read_response())
            if not conn.can_read(timeout=0):
                return False
        return True

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return  # PONG outside subscribed mode (no channel wanted)
        kind = reply[0]
        channel = reply[1].decode("utf-8", "replace") if isinstance(reply[1], bytes) else ""
        if kind == b"message":
            try:
                payload = reply[2].decode("utf-8")
            except UnicodeDecodeError as exc:
                logger.warning("dropped a message on Redis channel %r: its payload is not "
                               "valid UTF-8 (%s)", channel, exc)
                return
            self._pending.append(Notification(channel, payload, 0))
        elif kind == b"subscribe":
            with self._lock:
                self._listening = self._listening | {channel}
                self._changed.notify_all()
        elif kind == b"unsubscribe":
            with self._lock:
                self._listening = self._listening - {channel}
                self._changed.notify_all()
        # b"pong": only its arrival matters

    def _reconcile(self, conn: Any) -> None:
        """Send SUBSCRIBE and UNSUBSCRIBE so the connection asks for exactly what sinks want."""
        with self._lock:
            wanted = self._wanted()
        add = sorted(wanted - self._sent)
        drop = sorted(self._sent - wanted)
        if add:
            conn.send_command("SUBSCRIBE", *add)
        if drop:  # never without names: a bare UNSUBSCRIBE drops every channel
            conn.send_command("UNSUBSCRIBE", *drop)
        self._sent = wanted
