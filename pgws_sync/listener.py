"""The listener: one PostgreSQL connection per process that LISTENs and hands notifications on."""

from __future__ import annotations

import logging
import os
import random
import selectors
import threading
import time
import weakref
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Protocol, Sequence

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from .channels import validate_channel
from .errors import ConfigError, ListenerStopped, first_line
from .messages import Notification

logger = logging.getLogger(__name__)

_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_READ = psycopg2.extensions.POLL_READ
_POLL_WRITE = psycopg2.extensions.POLL_WRITE

# Kept alive on purpose: connections inherited from a parent process. Closing
# one in a child would end the parent's session (it shares the socket).
_inherited_connections: List[Any] = []

_live_listeners: "weakref.WeakSet[Listener]" = weakref.WeakSet()


def live_listeners() -> List["Listener"]:
    """Every listener created in this process that still exists."""
    return list(_live_listeners)


class Sink(Protocol):
    """What the listener hands notifications to (the endpoints implement it)."""

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Called on the listener thread with everything that arrived together, in order."""

    def on_resync(self, reason: str) -> None:
        """Called on the listener thread after a reconnect: notifications may have been lost."""


class _Stopping(Exception):
    """Raised inside the listener thread when stop() was called."""


class _Timeout(Exception):
    """The database did not answer in time."""


class Listener:
    """Owns the one LISTEN connection of this process and the thread that polls it.

    Any number of endpoints share one listener. The connection is opened by
    the listener thread, used by it alone, and reopened with exponential
    backoff between ``min_reconnect`` and ``max_reconnect`` seconds whenever
    it fails. A silently dead connection is noticed within
    ``heartbeat_interval`` seconds: after half of it without traffic a
    ``SELECT 1`` is sent, and an answer must come within the other half.

    Under a stream of notifications faster than one per ``coalesce``
    seconds, they are handed on at most once per ``coalesce`` seconds, all
    that arrived together: each socket then gets one write for several
    messages instead of one each. The first notification after a quiet spell
    is handed on at once; ``0`` hands every poll on immediately.

    The thread starts on first use in each process (``start()`` is cheap and
    idempotent), so a listener created while a preloading gunicorn master
    imports the app still gets one thread and one connection per worker.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        min_reconnect: float = 10.0,
        max_reconnect: float = 60.0,
        heartbeat_interval: float = 10.0,
        connect_timeout: float = 10.0,
        coalesce: float = 0.010,
        application_name: str = "pgws_sync listener",
    ) -> None:
        if min_reconnect <= 0 or max_reconnect < min_reconnect:
            raise ConfigError(
                f"need 0 < min_reconnect <= max_reconnect, got {min_reconnect} and {max_reconnect}"
            )
        if heartbeat_interval <= 0 or connect_timeout <= 0:
            raise ConfigError("heartbeat_interval and connect_timeout must be positive seconds")
        if coalesce < 0 or coalesce >= heartbeat_interval / 2:
            raise ConfigError(f"coalesce must be at least 0 and well under heartbeat_interval, "
                              f"got {coalesce}")
        self.dsn = dsn or ""
        self.min_reconnect = float(min_reconnect)
        self.max_reconnect = float(max_reconnect)
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        self.coalesce = float(coalesce)
        self.application_name = application_name

        self._lock = threading.Lock()  # guards _sinks, _stopped and the state below
        self._pipe_lock = threading.Lock()  # guards the wake-up pipe's descriptors
        self._changed = threading.Condition(self._lock)
        self._sinks: Dict[Sink, FrozenSet[str]] = {}
        self._stopped = False
        self._connected = False
        self._listening: FrozenSet[str] = frozenset()
        self._last_error: Optional[str] = None
        self._backend_pid: Optional[int] = None

        self._pid: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r = -1
        self._wake_w = -1
        self._conn: Any = None
        _live_listeners.add(self)

    # ----------------------------------------------------------------- public

    def add_sink(self, sink: Sink, channels: Iterable[str]) -> None:
        """Deliver notifications on ``channels`` to ``sink`` (LISTEN happens on the thread)."""
        names = frozenset(validate_channel(c) for c in channels)
        with self._lock:
            self._sinks[sink] = names
        self._wake()

    def remove_sink(self, sink: Sink) -> None:
        """Stop delivering to ``sink``; channels nobody needs any more are UNLISTENed."""
        with self._lock:
            self._sinks.pop(sink, None)
        self._wake()

    def start(self) -> "Listener":
        """Start the listener thread in this process, if it is not running yet."""
        pid = os.getpid()
        if self._pid == pid and not self._stopped:
            return self
        with self._lock:
            if self._stopped:
                raise ListenerStopped("this listener was stopped; create a new Listener")
            if self._pid == pid:
                return self
            if self._conn is not None:  # inherited through fork: never touch it here
                _inherited_connections.append(self._conn)
                self._conn = None
            self._connected = False
            self._listening = frozenset()
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            with self._pipe_lock:
                self._wake_r, self._wake_w = wake_r, wake_w
            self._thread = threading.Thread(
                target=self._run, name=f"pgws-listener-{pid}", daemon=True
            )
            self._pid = pid
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the connection; waits up to ``timeout`` seconds."""
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
        thread = self._thread if self._pid == os.getpid() else None
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("listener thread %s did not stop within %.1fs", thread.name, timeout)

    @property
    def connected(self) -> bool:
        """True while the connection is up and every wanted channel is LISTENed."""
        return self._connected

    @property
    def listening(self) -> FrozenSet[str]:
        """The channels LISTENed on the current connection."""
        return self._listening

    @property
    def last_error(self) -> Optional[str]:
        """Why the last connection attempt failed or the last connection ended."""
        return self._last_error

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and listening (starting the thread if needed)."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._lock:
            while not (self._connected and self._wanted() <= self._listening):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._changed.wait(left)
            return True

    def status(self) -> Dict[str, Any]:
        """A small dict for health checks and logs."""
        return {
            "connected": self._connected,
            "channels": sorted(self._listening),
            "backend_pid": self._backend_pid,
            "error": None if self._connected else self._last_error,
        }

    # --------------------------------------------------------------- internals

    def _wanted(self) -> FrozenSet[str]:
        return frozenset().union(*self._sinks.values()) if self._sinks else frozenset()

    def _wake(self) -> None:
        if self._pid != os.getpid():
            return
        # A non-blocking write of one byte: the lock only keeps the descriptor open meanwhile.
        with self._pipe_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway

    def _set_state(self, connected: bool, error: Optional[str] = None) -> None:
        with self._lock:
            self._connected = connected
            if not connected:
                self._listening = frozenset()
                self._backend_pid = None
            if error is not None:
                self._last_error = error
            self._changed.notify_all()

    def _run(self) -> None:
        failures = 0
        missed_reason: Optional[str] = None
        first = True
        try:
            while not self._stopped:
                if not first:
                    delay = 0.0
                    if failures:
                        delay = min(self.max_reconnect, self.min_reconnect * 2 ** (failures - 1))
                        delay = min(self.max_reconnect, delay * random.uniform(1.0, 1.1))
                        logger.info("listener reconnecting in %.2fs", delay)
                    self._sleep(delay)
                first = False
                try:
                    self._conn = self._connect()
                    self._reconcile(self._conn)
                except (psycopg2.Error, OSError, _Timeout, ValueError) as exc:
                    failures += 1
                    reason = first_line(exc)
                    missed_reason = missed_reason or reason
                    logger.warning("listener cannot connect: %s", reason)
                    self._close_conn()
                    self._set_state(False, reason)
                    continue
                failures = 0
                logger.info(
                    "listener connected (backend pid %s), listening on %s",
                    self._backend_pid, sorted(self._listening),
                )
                self._set_state(True)
                if missed_reason is not None:
                    self._resync(f"listener reconnected after: {missed_reason}")
                    missed_reason = None
                try:
                    self._serve(self._conn)
                except (psycopg2.Error, OSError, _Timeout) as exc:
                    missed_reason = _fatal_notice(self._conn) or first_line(exc)
                    logger.warning("listener connection lost: %s", missed_reason)
                except _Stopping:
                    raise
                except Exception as exc:  # a bug must not end delivery for good: log, reconnect
                    missed_reason = first_line(exc)
                    logger.exception("listener failed; reconnecting")
                finally:
                    self._close_conn()
                    self._set_state(False, missed_reason)
        except _Stopping:
            pass
        finally:
            self._close_conn()
            self._set_state(False)
            with self._pipe_lock:  # no _wake() may write to a closed (reused) descriptor
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)
            logger.info("listener stopped")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self._stopped:
                raise _Stopping()
            if left <= 0:
                return
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ)
                if sel.select(left):
                    self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _connect(self) -> Any:
        params = psycopg2.extensions.parse_dsn(self.dsn) if self.dsn else {}
        options = params.get("options", "")
        params.update(
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=int(self.heartbeat_interval * 1000) + 20000,
            application_name=self.application_name,
            options=(options + " -c idle_session_timeout=0").strip(),
        )
        try:
            return self._open(params)
        except psycopg2.OperationalError as exc:
            if "idle_session_timeout" not in str(exc):
                raise
            # PostgreSQL before 14 has no idle session timeout to turn off.
            params["options"] = options
            return self._open(params)

    def _open(self, params: Dict[str, Any]) -> Any:
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
                raise _Timeout("the database did not answer in time")
            with selectors.DefaultSelector() as sel:
                sel.register(conn.fileno(), events)
                sel.register(self._wake_r, selectors.EVENT_READ)
                sel.select(left)
            if self._stopped:
                raise _Stopping()

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

    def _serve(self, conn: Any) -> None:
        half = self.heartbeat_interval / 2
        with selectors.DefaultSelector() as sel:
            sel.register(conn.fileno(), selectors.EVENT_READ, "db")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                self._poll_loop(conn, sel, half)
            finally:
                self._dispatch(conn)  # what was held back to coalesce is not lost with the connection

    def _poll_loop(self, conn: Any, sel: selectors.BaseSelector, half: float) -> None:
        last_traffic = time.monotonic()
        last_dispatch = 0.0
        while True:
            if self._stopped:
                raise _Stopping()
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
                self._dispatch(conn)
            if time.monotonic() - last_traffic >= half:
                self._query(conn, "SELECT 1", half)
                last_traffic = time.monotonic()

    def _dispatch(self, conn: Any) -> None:
        if not conn.notifies:
            return
        batch = [Notification(n.channel, n.payload, n.pid) for n in conn.notifies]
        del conn.notifies[:]
        with self._lock:
            sinks = list(self._sinks.items())
        for sink, channels in sinks:
            mine = [n for n in batch if n.channel in channels]
            if not mine:
                continue
            try:
                sink.on_notifications(mine)
            except Exception:  # a broken sink must not stop the listener
                logger.exception("notification handler %r failed", sink)

    def _resync(self, reason: str) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.on_resync(reason)
            except Exception:
                logger.exception("resync handler %r failed", sink)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)


def _fatal_notice(conn: Any) -> Optional[str]:
    """The server's own words when it ended the session (a FATAL notice), if it said any."""
    for notice in reversed(getattr(conn, "notices", None) or []):
        if notice.startswith("FATAL:"):
            return notice[len("FATAL:"):].strip()
    return None


def close_quietly(conn: Any) -> None:
    """Close a psycopg2 connection, ignoring that it may be broken already."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass
