"""Proof that notifications arrive: a NOTIFY each worker sends itself, and the start-up check."""

from __future__ import annotations

import logging
import os
import secrets
import select
import threading
import time
from typing import Any, Optional, Sequence, Tuple

import psycopg2
from psycopg2 import sql

from ..errors import ConfigError, first_line
from .._threads import gather
from .base import Notification
from .postgres import close_quietly, connect

logger = logging.getLogger(__name__)

#: What a listener DSN that goes through a transaction-mode pooler shows, and the fix.
POOLER_REFUSAL = (
    "notifications sent through {where} never came back to a session LISTENing there: a "
    "connection pooler in transaction mode (PgBouncer pool_mode = transaction) breaks LISTEN. "
    "Give the listener a direct session to PostgreSQL (or a pool in session mode)")

#: What a listener DSN pointing at a hot standby shows, and the fix.
STANDBY_REFUSAL = (
    "{where} is a hot standby (in recovery): it cannot LISTEN, and NOTIFYs sent on the primary "
    "never reach it. Point the listener (and publishing) at the primary")


def check_listening(dsn: str, *, timeout: float = 5.0, where: str = "the listener's database") -> bool:
    """Refuse a database address where LISTEN cannot work, with :class:`ConfigError` naming the
    cause and the fix: a hot standby, or a pooler in transaction mode (a NOTIFY sent there
    does not come back within ``timeout`` seconds).

    Returns True when the check ran and passed, False when the database could not be reached
    (then nothing is known; the listener keeps trying).
    """
    try:
        listening = connect(dsn, connect_timeout=max(1, int(timeout)))
    except psycopg2.Error as exc:
        logger.info("start-up check skipped, the database is not reachable: %s", first_line(exc))
        return False
    sender: Any = None
    try:
        with listening.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            if cur.fetchone()[0]:
                raise ConfigError(STANDBY_REFUSAL.format(where=where))
            channel = f"pgws_check_{os.getpid()}_{secrets.token_hex(4)}"
            cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        sender = connect(dsn, connect_timeout=max(1, int(timeout)))
        token = secrets.token_hex(8)
        with sender.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (channel, token))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([listening], [], [], max(0.0, deadline - time.monotonic()))
            listening.poll()
            if any(n.payload == token for n in listening.notifies):
                return True
        raise ConfigError(POOLER_REFUSAL.format(where=where))
    except psycopg2.Error as exc:
        logger.info("start-up check stopped by a database error: %s", first_line(exc))
        return False
    finally:
        close_quietly(sender)
        close_quietly(listening)


class Canary:
    """Every ``interval`` seconds a NOTIFY that this process sends itself through the database.

    It is registered as a sink of a listener on a channel of its own; it is
    *ready* while a canary came back within ``3 * interval`` seconds. It sends
    from a connection of its own, on a thread named ``pgws-canary-<pid>``.
    """

    def __init__(self, dsn: str, *, interval: float = 5.0) -> None:
        if interval <= 0:
            raise ConfigError(f"the canary interval must be positive seconds, got {interval}")
        self.dsn = dsn
        self.interval = interval
        self.channel = f"pgws_canary_{secrets.token_hex(6)}"
        self._lock = threading.Lock()  # guards the state below
        self._sent: Optional[Tuple[str, float]] = None  # (token, when) of the last canary
        self._last_ok: Optional[float] = None
        self._last_error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None

    # ---------------------------------------------------------------- sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        now = time.monotonic()
        with self._lock:
            if self._sent is not None and any(n.payload == self._sent[0] for n in batch):
                self._last_ok = now

    def on_resync(self, reason: str) -> None:
        """The listener reconnected: canaries sent meanwhile are lost, the next one tells."""

    # ---------------------------------------------------------------- state

    def readiness(self) -> Tuple[bool, Optional[str]]:
        """(ready, why not): ready while a canary came back recently."""
        now = time.monotonic()
        with self._lock:
            last_ok, sent, error = self._last_ok, self._sent, self._last_error
        if last_ok is not None and now - last_ok <= 3 * self.interval:
            return True, None
        if error is not None:
            return False, f"the canary could not be sent: {error}"
        if sent is None:
            return False, "no canary sent yet"
        return False, (f"no canary came back for {now - (last_ok or sent[1]):.0f}s: "
                       f"notifications are not arriving")

    # --------------------------------------------------------------- thread

    def start(self) -> None:
        """Start the sending thread in this process, if not yet."""
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pgws-canary-{pid}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread if self._pid == os.getpid() else None
        gather([thread], timeout)

    def _run(self) -> None:
        conn: Any = None
        try:
            while not self._stop.is_set():
                token = secrets.token_hex(8)
                try:
                    if conn is None:
                        conn = connect(self.dsn, connect_timeout=max(1, int(self.interval)),
                                       application_name="pgws_sync canary")
                    with self._lock:
                        self._sent = (token, time.monotonic())
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_notify(%s, %s)", (self.channel, token))
                    with self._lock:
                        self._last_error = None
                except psycopg2.Error as exc:
                    with self._lock:
                        self._last_error = first_line(exc)
                    close_quietly(conn)
                    conn = None
                self._stop.wait(self.interval)
        finally:
            close_quietly(conn)
