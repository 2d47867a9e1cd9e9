"""The NOTIFY pool: a few connections per process, opened on demand, that send NOTIFYs."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import psycopg2
import psycopg2.extensions
import psycopg2.sql

from .._dsn import Dsn
from .. import _metrics
from ..errors import ConfigError, NotifyFailed, first_line
from .postgres import STATEMENT_TIMEOUT, close_quietly, open_session, session_params

logger = logging.getLogger(__name__)

#: How full PostgreSQL's notification queue may be before the library's publishers refuse.
DEFAULT_MAX_QUEUE_USAGE = 0.5

#: Seconds before a full queue is asked again (publishing is refused meanwhile).
QUEUE_RECHECK_SECONDS = 1.0


class NotifyPool:
    """Up to ``size`` autocommit connections of this process, never the listener's, for NOTIFY.

    Connections are opened on first use in the process that uses them (after
    a fork the parent's are left alone), reused, and replaced when they break.
    :meth:`notify` waits at most ``wait_timeout`` seconds for a free
    connection; ``connect_timeout`` bounds connecting and ``statement_timeout``
    (``None``: no limit) each NOTIFY, in seconds. Failures raise ``error`` (a
    :class:`NotifyFailed` class) with a one-line reason; ``size_name`` is how
    users know ``size`` (e.g. a setting), named when the pool is too small.
    """

    def __init__(
        self,
        dsn: Dsn = "",
        *,
        size: int = 4,
        wait_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        statement_timeout: Optional[float] = STATEMENT_TIMEOUT,
        application_name: str = "pgws_sync notify",
        size_name: str = "size",
        error: Type[NotifyFailed] = NotifyFailed,
        kind: str = "notify",
        max_queue_usage: Optional[float] = None,
    ) -> None:
        if size < 1:
            raise ConfigError(f"{size_name} must be at least 1, got {size}")
        self.size = size
        self.wait_timeout = wait_timeout
        self.size_name = size_name
        self.error = error
        #: The ``kind`` label of this pool's metrics (``publish``, ``write``, ...).
        self.kind = kind
        if max_queue_usage is not None and not 0 < max_queue_usage <= 1:
            raise ConfigError(f"max_queue_usage must be above 0 and at most 1, got "
                              f"{max_queue_usage!r}")
        self.max_queue_usage = max_queue_usage
        self._usage = 0.0  # pg_notification_queue_usage() when last seen
        self._usage_at = float("-inf")
        self._warned_at = float("-inf")
        # Settings in the DSN win, except the name this pool's connections show.
        self._params: Dict[str, Any] = session_params(
            dsn, application_name=application_name, connect_timeout=connect_timeout,
            statement_timeout=statement_timeout)
        self._lock = threading.Lock()  # guards the pool state below
        self._free = threading.Condition(self._lock)
        self._idle: List[Any] = []
        self._open = 0
        self._pid = os.getpid()
        self._closed = False

    def notify(self, channel: str, payloads: Sequence[str]) -> None:
        """NOTIFY each payload on ``channel``, in order and in one transaction: all or none.

        A connection that died while idle (a database restart) is noticed before
        anything is sent and replaced; nothing is ever sent twice.
        """
        if not payloads:
            return
        # Statements sent in one query run as one transaction, even in autocommit:
        # one round trip, and a failure sends nothing.
        query = "; ".join(["SELECT pg_notify(%s, %s)"] * len(payloads))
        args = [value for payload in payloads for value in (channel, payload)]
        self._counted(len(payloads), lambda: self._execute(query, args, "NOTIFY"))

    def select(self, expression: Any, args: Sequence[Any], *, what: str) -> Any:
        """``SELECT expression`` (a ``psycopg2.sql`` object, e.g. a function that NOTIFYs)
        like :meth:`notify`: checked, on a live connection, counted. Returns its
        value; failures raise ``error`` saying ``what`` failed."""
        query = psycopg2.sql.SQL("SELECT ") + expression
        return self._counted(1, lambda: self._execute(query, args, what, result=True))

    def _counted(self, count: int, run: Callable[[], Any]) -> Any:
        """``run()`` after the queue check, recorded in the publish metrics."""
        started = time.monotonic()
        try:
            self._check_queue()
            value = run()
        except NotifyFailed as exc:
            _metrics.inc("publish_failures", kind=self.kind, cause=exc.cause)
            raise
        _metrics.inc("publishes", count, kind=self.kind)
        _metrics.observe("publish_seconds", time.monotonic() - started, kind=self.kind)
        return value

    def _execute(self, query: Any, args: Sequence[Any], what: str, *,
                 result: bool = False) -> Any:
        """Run ``query`` on a pooled connection, asking the queue's usage in the same round
        trip; with ``result`` (a ``SELECT``), the value of its first column."""
        check = self.max_queue_usage is not None
        if check and result:
            query = query + psycopg2.sql.SQL(", pg_notification_queue_usage()")
        elif check:
            query += "; SELECT pg_notification_queue_usage()"
        # Never retried: once sent, a statement may have run (a durable message committed)
        # even when its answer was lost. A connection that died while idle is replaced first.
        conn = self._acquire()
        value = None
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                if result or check:
                    row = cur.fetchone()
                    value = row[0] if result else None
                    if check:
                        self._saw_usage(float(row[-1]))
        except psycopg2.Error as exc:
            self._release(conn, broken=bool(conn.closed))
            raise self.error(f"{what} failed: {first_line(exc)}") from exc
        self._release(conn)
        return value

    def close(self) -> None:
        """Close this process's idle connections (busy ones when they come back); later
        :meth:`notify` calls fail."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            mine = self._pid == os.getpid()
            self._free.notify_all()
        if mine:  # closing a parent's connection would end its session too
            for conn in idle:
                close_quietly(conn)

    # --------------------------------------------------------- internals

    def _acquire(self) -> Any:
        """A live connection: an idle one that still answers, or a new one."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            conn = self._take(deadline)
            if conn is None:
                break
            if _idle_and_alive(conn):
                return conn
            self._release(conn, broken=True)  # died while idle: nothing was sent on it
        try:
            conn = open_session(self._params)
        except psycopg2.Error as exc:
            self._release(None, broken=True)  # frees the slot taken above
            raise self._failure("unreachable",
                                f"cannot connect to the database: {first_line(exc)}") from exc
        conn.autocommit = True
        return conn

    def _take(self, deadline: float) -> Any:
        """An idle connection, or None once a slot for a new one is reserved."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                self._pid, self._idle, self._open = os.getpid(), [], 0
            while True:
                if self._closed:
                    raise self._failure("closed", "the connection pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.size:
                    self._open += 1
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._failure("busy", f"the database is busy: all {self.size} "
                                                f"connections are in use ({self.size_name})")
                self._free.wait(left)

    def _check_queue(self) -> None:
        """Refuse to publish while PostgreSQL's notification queue is fuller than
        ``max_queue_usage``: past it, every NOTIFYing transaction fails at commit."""
        limit = self.max_queue_usage
        if limit is None or self._usage < limit:
            return
        usage = self._usage
        if time.monotonic() - self._usage_at >= QUEUE_RECHECK_SECONDS:
            usage = self._sample_usage()
        if usage < limit:
            return
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            logger.warning("refusing to publish: PostgreSQL's notification queue is %.0f%% full",
                           usage * 100)
        raise self._failure("queue_full", (
            f"PostgreSQL's notification queue is {usage:.0%} full (max_queue_usage "
            f"{limit:.0%}): a session that LISTENs is probably stuck in a long transaction "
            f"(see pg_stat_activity). Publishing is refused until the queue drains; past 100% "
            f"every NOTIFYing transaction would fail at commit"))

    def _sample_usage(self) -> float:
        conn = self._acquire()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_notification_queue_usage()")
                usage = float(cur.fetchone()[0])
        except psycopg2.Error as exc:
            self._release(conn, broken=bool(conn.closed))
            raise self._failure("refused", f"cannot ask the queue's usage: {first_line(exc)}") \
                from exc
        self._release(conn)
        self._saw_usage(usage)
        return usage

    def _saw_usage(self, usage: float) -> None:
        self._usage, self._usage_at = usage, time.monotonic()
        _metrics.set_gauge("notification_queue_usage", usage)

    def _failure(self, cause: str, reason: str) -> NotifyFailed:
        failure = self.error(reason)
        failure.cause = cause
        return failure

    def _release(self, conn: Any, *, broken: bool = False) -> None:
        """Give ``conn`` back; a broken one (or any, once closed) is closed and its slot freed."""
        with self._lock:
            keep = not broken and not self._closed
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._free.notify()
        if not keep:
            close_quietly(conn)


def _idle_and_alive(conn: Any) -> bool:
    """Whether an idle connection can still be used. The server sends an idle session that
    does not LISTEN nothing but its goodbye (a FATAL message, then EOF), or rarely a setting
    that changed: anything readable retires it (a fresh one costs a reconnect, no more)."""
    if conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
