"""PostgreSQL as a source: the listener (one LISTEN connection per process), and start-up checks."""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .._dsn import Dsn, libpq_dsn
from .._formats import validate_channel
from ..errors import DatabaseUnreachable, first_line
from .base import NoAnswer, Notification, SourceThread, Stopping

logger = logging.getLogger(__name__)

_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_READ = psycopg2.extensions.POLL_READ

# Kept alive on purpose: connections inherited from a parent process. Closing
# one in a child would end the parent's session (it shares the socket).
_inherited_connections: List[Any] = []

class Listener(SourceThread):
    """Owns the one LISTEN connection of this process and the thread that polls it.

    Any number of endpoints share one listener; its thread starts on first use
    in each process. Notifications arriving faster than one per ``coalesce``
    seconds are handed on together, at most once per ``coalesce``.

    :param dsn: libpq connection string or URI ("": libpq's environment), or the app's
        SQLAlchemy URL (``postgresql+psycopg2://``, ``postgresql+psycopg://``, a ``URL``).
    :param min_reconnect: first delay, in seconds, before reconnecting.
    :param max_reconnect: longest delay, in seconds, between reconnection attempts.
    :param heartbeat_interval: seconds within which a silently dead connection is noticed.
    :param connect_timeout: seconds connecting (and subscribing) may take.
    :param coalesce: seconds over which a stream of messages is gathered (0: none).
    :param application_name: what ``pg_stat_activity`` shows for the connection.
    """

    _thread_prefix = "pgws-listener"
    _what = "listener"
    _log = logger
    _stopped_message = "this listener was stopped; create a new Listener"
    _connect_errors = (psycopg2.Error, OSError, NoAnswer, ValueError)
    _serve_errors = (psycopg2.Error, OSError, NoAnswer)

    def __init__(
        self,
        dsn: Dsn = "",
        *,
        min_reconnect: float = 10.0,
        max_reconnect: float = 60.0,
        heartbeat_interval: float = 10.0,
        connect_timeout: float = 10.0,
        coalesce: float = 0.010,
        application_name: str = "pgws_sync listener",
    ) -> None:
        super().__init__(min_reconnect=min_reconnect, max_reconnect=max_reconnect,
                         heartbeat_interval=heartbeat_interval,
                         connect_timeout=connect_timeout, coalesce=coalesce)
        self.dsn = libpq_dsn(dsn or "")
        self.application_name = application_name
        self._backend_pid: Optional[int] = None

    def _describe(self) -> Dict[str, Any]:
        return {"backend_pid": self._backend_pid}

    # ------------------------------------------------------ SourceThread hooks

    def _validate_channel(self, channel: str) -> str:
        return validate_channel(channel)

    def _reset_for_this_process(self) -> None:
        if self._conn is not None:  # inherited through fork: never touch it here
            _inherited_connections.append(self._conn)
            self._conn = None

    def _on_disconnected(self) -> None:
        self._backend_pid = None

    def _open(self) -> None:
        self._conn = self._connect()
        self._reconcile(self._conn)
        info = self._conn.info  # named: a DSN left empty takes libpq's defaults, silently
        logger.info(
            "listener connected to database %r on %s as %r (backend pid %s), listening on %s",
            info.dbname, f"{info.host}:{info.port}" if info.host and info.host[0] != "/"
            else f"the socket in {info.host or 'the default directory'}", info.user,
            self._backend_pid, sorted(self._listening),
        )

    def _serve(self) -> None:
        conn = self._conn
        half = self.heartbeat_interval / 2
        with selectors.DefaultSelector() as sel:
            sel.register(conn.fileno(), selectors.EVENT_READ, "db")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                self._poll_loop(conn, sel, half)
            finally:
                self._dispatch(conn)  # what was held back to coalesce is not lost with the connection

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def _lost_reason(self, exc: BaseException) -> str:
        return _fatal_notice(self._conn) or super()._lost_reason(exc)

    # --------------------------------------------------------------- internals

    def _connect(self) -> Any:
        params = session_params(self.dsn, application_name=self.application_name,
                                connect_timeout=None,
                                tcp_user_timeout=self.heartbeat_interval + 20.0)
        try:
            return self._connect_with({**params, "options": params.get("options", "") +
                                       " -c idle_session_timeout=0"})
        except psycopg2.OperationalError as exc:
            if "idle_session_timeout" not in str(exc):
                raise
            # PostgreSQL before 14 has no idle session timeout to turn off.
            return self._connect_with(params)

    def _connect_with(self, params: Dict[str, Any]) -> Any:
        conn = psycopg2.connect(async_=True, **params)
        try:
            self._complete(conn, time.monotonic() + self.connect_timeout)
        except BaseException:
            conn.close()
            raise
        self._backend_pid = conn.get_backend_pid()
        return conn

    def _complete(self, conn: Any, deadline: float) -> None:
        """Drive an asynchronous operation to its end, honouring stop() and the deadline."""
        while True:
            state = conn.poll()
            if state == _POLL_OK:
                return
            events = selectors.EVENT_READ if state == _POLL_READ else selectors.EVENT_WRITE
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer("the database did not answer in time")
            with selectors.DefaultSelector() as sel:
                sel.register(conn.fileno(), events)
                sel.register(self._wake_r, selectors.EVENT_READ)
                sel.select(left)
            if self._stopped:
                raise Stopping()

    def _query(self, conn: Any, statement: Any, timeout: float) -> None:
        with conn.cursor() as cur:
            cur.execute(statement)
            self._complete(conn, time.monotonic() + timeout)
        self._dispatch(conn)

    def _reconcile(self, conn: Any) -> None:
        """LISTEN and UNLISTEN until the connection listens to exactly what sinks want."""
        while True:
            with self._lock:
                wanted = self._wanted()
                have = self._listening
            if wanted == have:
                return
            for channel in sorted(wanted - have):
                self._query(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)),
                            self.connect_timeout)
            for channel in sorted(have - wanted):
                self._query(conn, sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)),
                            self.connect_timeout)
            with self._lock:
                self._listening = wanted
                self._changed.notify_all()

    def _poll_loop(self, conn: Any, sel: selectors.BaseSelector, half: float) -> None:
        last_traffic = time.monotonic()
        last_dispatch = 0.0
        while True:
            if self._stopped:
                raise Stopping()
            now = time.monotonic()
            timeout = max(0.0, last_traffic + half - now)
            if conn.notifies:  # held back to coalesce: read more until it is due
                timeout = min(timeout, max(0.0, last_dispatch + self.coalesce - now))
            for key, _ in sel.select(timeout):
                if key.data == "wake":  # stop(), or sinks changed their channels
                    self._drain_wake()
                    self._reconcile(conn)
                else:
                    conn.poll()
                    last_traffic = time.monotonic()
            if conn.notifies and time.monotonic() >= last_dispatch + self.coalesce:
                last_dispatch = time.monotonic()
                # _dispatch(conn), written out: the hot path makes one call per batch, as before
                batch = [Notification(n.channel, n.payload, n.pid) for n in conn.notifies]
                del conn.notifies[:]
                self._deliver(batch)
            if time.monotonic() - last_traffic >= half:
                self._query(conn, "SELECT 1", half)
                last_traffic = time.monotonic()

    def _dispatch(self, conn: Any) -> None:
        """Hand on the notifications waiting in ``conn.notifies``, if any."""
        if conn.notifies:
            batch = [Notification(n.channel, n.payload, n.pid) for n in conn.notifies]
            del conn.notifies[:]
            self._deliver(batch)


def _fatal_notice(conn: Any) -> Optional[str]:
    """The server's own words when it ended the session (a FATAL notice), if it said any."""
    for notice in reversed(getattr(conn, "notices", None) or []):
        if notice.startswith("FATAL:"):
            return str(notice[len("FATAL:"):]).strip()
    return None


def close_quietly(conn: Any) -> None:
    """Close a psycopg2 connection, ignoring that it may be broken already."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def notification_queue_usage(dsn: Dsn) -> Optional[float]:
    """``pg_notification_queue_usage()`` of the database (0 to 1), or None if it cannot be asked."""
    try:
        conn = connect(dsn, connect_timeout=2)
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_notification_queue_usage()")
            return float(cur.fetchone()[0])
    except psycopg2.Error:
        return None
    finally:
        close_quietly(conn)


#: Seconds a statement of the library's own connections may run (``statement_timeout``).
STATEMENT_TIMEOUT = 30.0
#: Seconds a statement of the library's own connections may wait for a lock (``lock_timeout``).
LOCK_TIMEOUT = 10.0
#: Seconds unacknowledged data may sit on a connection before it counts as dead
#: (``tcp_user_timeout``, client and server side), and the TCP keepalive timings.
TCP_USER_TIMEOUT = 30.0
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
               "keepalives_count": 3}


def session_params(dsn: Dsn, *, application_name: Optional[str] = None,
                   connect_timeout: Optional[float] = 10.0,
                   statement_timeout: Optional[float] = STATEMENT_TIMEOUT,
                   lock_timeout: Optional[float] = LOCK_TIMEOUT,
                   tcp_user_timeout: Optional[float] = TCP_USER_TIMEOUT,
                   server_options: str = "") -> Dict[str, Any]:
    """``psycopg2.connect`` keywords for a connection of the library: keepalives and a TCP
    user timeout on both ends, statement and lock timeouts, a bounded connect (seconds;
    None: not set). Whatever the DSN (or ``PGCONNECT_TIMEOUT``) sets wins, except
    ``application_name``."""
    dsn = libpq_dsn(dsn)
    params: Dict[str, Any] = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
    options = [params.pop("options", "")]
    settings = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout,
                "tcp_user_timeout": tcp_user_timeout}
    for name, seconds in settings.items():
        if seconds is not None and f"{name}=" not in options[0]:
            options.append(f"-c {name}={int(seconds * 1000)}")
    if tcp_user_timeout is not None:  # the server drops a dead client (and its locks) in time
        options.append("-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
                       "-c tcp_keepalives_count=3")
        params.setdefault("tcp_user_timeout", int(tcp_user_timeout * 1000))
        for key, value in _KEEPALIVES.items():
            params.setdefault(key, value)
    options.append(server_options)
    if connect_timeout is not None and not os.environ.get("PGCONNECT_TIMEOUT"):
        params.setdefault("connect_timeout", max(1, int(connect_timeout)))
    if application_name is not None:
        params["application_name"] = application_name
    joined = " ".join(o.strip() for o in options if o.strip())
    if joined:
        params["options"] = joined
    return params


def open_session(params: Dict[str, Any]) -> Any:
    """``psycopg2.connect(**params)``; a server that takes no startup ``options`` (PgBouncer)
    gets the connection without them: the keepalives and TCP timeout stay (libpq's), the
    statement and lock timeouts are not set (a SET would outlive the session in a pool)."""
    try:
        return psycopg2.connect(**params)
    except psycopg2.OperationalError as exc:
        if "options" not in params or "unsupported startup parameter" not in str(exc):
            raise
    logger.debug("the server takes no startup options (a connection pooler?): the library's "
                "statement and lock timeouts are not set on its connections there")
    return psycopg2.connect(**{k: v for k, v in params.items() if k != "options"})


def connect(dsn: Dsn, *, connect_timeout: int = 10,
            application_name: Optional[str] = None,
            statement_timeout: Optional[float] = STATEMENT_TIMEOUT,
            lock_timeout: Optional[float] = LOCK_TIMEOUT) -> Any:
    """An autocommit psycopg2 connection with the library's timeouts (:func:`session_params`);
    it gives up connecting after ``connect_timeout`` seconds, unless the DSN or
    ``PGCONNECT_TIMEOUT`` says otherwise."""
    conn = open_session(session_params(
        dsn, application_name=application_name, connect_timeout=connect_timeout,
        statement_timeout=statement_timeout, lock_timeout=lock_timeout))
    conn.autocommit = True
    return conn


def wait_for_database(dsn: Dsn, retries: int, *, first_delay: float = 1.0,
                      max_delay: float = 32.0, connect_timeout: int = 10,
                      stop: Optional[threading.Event] = None,
                      on_retry: Optional[Callable[[int, str, float], None]] = None,
                      setting: str = "retries") -> int:
    """Connect to ``dsn`` until it works: ``retries`` attempts (0: forever), delays doubling.

    Returns the number of attempts it took. Raises :class:`DatabaseUnreachable`
    after the last failed attempt (or when ``stop`` is set while waiting).
    ``on_retry(attempt, reason, delay)`` is called after each failure that is retried;
    ``setting`` names where ``retries`` came from, in the error.
    """
    stop = stop or threading.Event()
    dsn = libpq_dsn(dsn)
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
                f"({setting}={retries}): {reason}")
        if on_retry is not None:
            on_retry(attempt, reason, delay)
        if stop.wait(delay):
            raise DatabaseUnreachable(f"stopped while waiting for the database: {reason}")
        delay = min(max_delay, delay * 2)
