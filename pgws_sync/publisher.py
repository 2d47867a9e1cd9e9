"""Publishing side: send publications as NOTIFY, in the caller's transaction or from a small pool."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, List, Optional

import psycopg2
import psycopg2.extensions

from .channels import validate_channel
from .errors import PgwsError, first_line
from .listener import close_quietly
from .messages import new_message_id
from .publication import DEFAULT_PUBSUB_CHANNEL, format_publication, message_body

logger = logging.getLogger(__name__)


class PublishFailed(PgwsError, RuntimeError):
    """The database did not take a NOTIFY (it is unreachable, or refused it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"could not publish: {reason}")


def build_publication(
    channel: Optional[str],
    message: Any,
    *,
    type: str = "json",
    to: Optional[str] = None,
    message_id: Optional[str] = None,
) -> str:
    """The NOTIFY payload publishing ``message`` would send (checks type and size)."""
    return format_publication(channel, message_body(message, type), type=type, target=to,
                              message_id=message_id or new_message_id())


def publish(
    conn: Any,
    channel: Optional[str],
    message: Any,
    *,
    type: str = "json",
    to: Optional[str] = None,
    pubsub_channel: str = DEFAULT_PUBSUB_CHANNEL,
) -> str:
    """Publish ``message`` to ``channel``'s subscribers in every process, inside ``conn``'s
    transaction (it leaves at commit; at once in autocommit). Returns the message id.

    ``type`` is ``json`` (any JSON value), ``text`` (a str) or ``binary``
    (bytes). With ``to`` (a connection id) and ``channel`` None it reaches only
    that connection, wherever it is connected. Raises
    :class:`~pgws_sync.PayloadTooLarge` before sending anything PostgreSQL would
    refuse and :class:`~pgws_sync.InvalidPayload` for a message that does not
    fit its type.
    """
    validate_channel(pubsub_channel)
    message_id = new_message_id()
    text = build_publication(channel, message, type=type, to=to, message_id=message_id)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notify(%s, %s)", (pubsub_channel, text))
    return message_id


class Publisher:
    """Sends publications from up to ``pool_size`` autocommit connections of this process.

    Connections are opened on demand (after any fork: each process has its
    own), reused, and replaced when they break; never the listener's.
    ``timeout`` bounds both connecting and waiting for a free connection.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        pubsub_channel: str = DEFAULT_PUBSUB_CHANNEL,
        pool_size: int = 4,
        timeout: float = 10.0,
        application_name: str = "pgws_sync publisher",
    ) -> None:
        if pool_size < 1:
            raise PgwsError(f"pool_size must be at least 1, got {pool_size}")
        self.dsn = dsn or ""
        self.pubsub_channel = validate_channel(pubsub_channel)
        self.pool_size = pool_size
        self.timeout = timeout
        self.application_name = application_name
        self._lock = threading.Lock()  # guards the pool state below
        self._free = threading.Condition(self._lock)
        self._idle: List[Any] = []
        self._open = 0
        self._pid = os.getpid()
        self._closed = False

    def publish(self, channel: Optional[str], message: Any, *, type: str = "json",
                to: Optional[str] = None) -> str:
        """Publish ``message`` (see :func:`publish`) at once; returns the message id.

        Raises :class:`PublishFailed` when the database cannot be reached or
        refuses the NOTIFY (after one retry on a fresh connection).
        """
        message_id = new_message_id()
        self.notify(build_publication(channel, message, type=type, to=to, message_id=message_id))
        return message_id

    def notify(self, text: str) -> None:
        """Send one already-built publication."""
        for attempt in (1, 2):
            conn = self._acquire()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_notify(%s, %s)", (self.pubsub_channel, text))
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._discard(conn)
                if attempt == 2:
                    raise PublishFailed(first_line(exc)) from exc
                continue
            except psycopg2.Error as exc:
                self._release(conn)
                raise PublishFailed(first_line(exc)) from exc
            self._release(conn)
            return

    def close(self) -> None:
        """Close this process's connections; later publishing raises :class:`PublishFailed`."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._free.notify_all()
        if self._pid == os.getpid():
            for conn in idle:
                close_quietly(conn)

    # --------------------------------------------------------- internals

    def _acquire(self) -> Any:
        deadline = time.monotonic() + self.timeout
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                self._pid, self._idle, self._open = os.getpid(), [], 0
            while True:
                if self._closed:
                    raise PublishFailed("the publisher is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.pool_size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishFailed(f"no free connection within {self.timeout:g}s")
                self._free.wait(left)
        try:
            return self._connect()
        except psycopg2.Error as exc:
            with self._lock:
                self._open -= 1
                self._free.notify()
            raise PublishFailed(first_line(exc)) from exc

    def _connect(self) -> Any:
        conn = psycopg2.connect(self.dsn, connect_timeout=max(1, int(self.timeout)),
                                application_name=self.application_name)
        conn.autocommit = True
        return conn

    def _release(self, conn: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                self._free.notify()
                return
            self._open -= 1
        close_quietly(conn)

    def _discard(self, conn: Any) -> None:
        with self._lock:
            self._open -= 1
            self._free.notify()
        close_quietly(conn)

