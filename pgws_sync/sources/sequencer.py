"""The sequencer: the one process per log that numbers newly committed durable messages.

Every process with a durable endpoint runs a :class:`Sequencer` thread. The
one whose connection holds the session advisory lock ``<schema>.sequencer``
is elected: it calls ``<schema>.sequence`` every ``poll_interval`` seconds
(at once again while batches come back full). Under load it waits longer, up to
:data:`MAX_STRETCH` times ``poll_interval``, so that one call numbers about
:data:`FILL` messages or more: a call costs the database about as much as
numbering eighty messages (docs/performance.md), so busy logs are numbered in larger, cheaper
batches, while a quiet one is looked at every ``poll_interval``: after a call that
numbered nothing, with one prepared query (anything above ``numbered_upto``, or a gap)
instead of a call, which halves what an idle log costs the server. The others try to take the
lock every ``takeover_interval`` seconds, so when the elected process dies
its session ends, the lock goes with it, and another takes over within about
that long (a silent network is noticed within the TCP user timeout, on both
ends). Numbering itself is serial whoever calls it (a transaction lock inside
the function), so two sequencers at once are slower, never wrong.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Optional

import psycopg2

from .. import _metrics
from ..errors import first_line
from .._threads import gather
from . import log
from .postgres import close_quietly, connect

logger = logging.getLogger(__name__)

#: Messages one call should number before the sequencer stops waiting longer under load.
FILL = 4
#: The longest wait under load, in ``poll_interval``\ s.
MAX_STRETCH = 4.0


def pause(poll_interval: float, numbered: int) -> float:
    """Seconds to wait after a call that numbered ``numbered`` messages (see the module)."""
    return poll_interval * min(MAX_STRETCH, max(1.0, numbered / FILL))


class Sequencer:
    """Numbers the log in ``schema`` while this process is elected (see the module).

    :param dsn: the database holding the log.
    :param schema: the log's schema.
    :param poll_interval: seconds between two looks at the log's intake while elected.
    :param takeover_interval: seconds between two attempts to be elected.
    :param batch: the most messages one call numbers.
    """

    def __init__(self, dsn: str, *, schema: str, poll_interval: float = 0.005,
                 takeover_interval: float = 2.0, batch: int = log.SEQUENCE_BATCH) -> None:
        self.dsn = dsn
        self.schema = schema
        self.poll_interval = poll_interval
        self.takeover_interval = takeover_interval
        self.batch = batch
        #: Whether this process numbers the log now.
        self.elected = False
        self.error: Optional[str] = None
        #: time.monotonic() when a call to the database last came back.
        self.progress_at = time.monotonic()
        self._oldest: Optional[int] = None  # the intake's oldest seq when last watched
        self._quiet = False  # the last call numbered nothing: look before calling again
        self._prepared_on: Any = None  # the connection has_work is prepared on
        self._oldest_since = 0.0
        self._stop = threading.Event()
        self._pid: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()  # guards _pid and _thread

    def start(self) -> None:
        """Start this process's thread, if not yet."""
        with self._start_lock:
            if self._pid == os.getpid() or self._stop.is_set():
                return
            self._pid = os.getpid()
            self.elected, self.progress_at = False, time.monotonic()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"pgws-sequencer-{self._pid}")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (its session, and with it the election, ends)."""
        self._stop.set()
        thread = self._thread
        if self._pid == os.getpid():
            gather([thread], timeout)

    def stalled_for(self) -> float:
        """Seconds the log's numbering may have been stuck: since this thread's last answer
        from the database (it asks every ``poll_interval`` elected, every
        ``takeover_interval`` otherwise), or, not elected, since the intake's oldest
        message was first seen still waiting."""
        now = time.monotonic()
        silent = now - self.progress_at
        if self.elected or self._oldest is None:
            return silent
        return max(silent, now - self._oldest_since)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        conn: Any = None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if conn is None:
                        conn = connect(self.dsn,
                                       application_name=f"pgws_sync sequencer {os.getpid()}")
                    if self.elected or self._elect(conn):
                        numbered = self._number(conn)
                        failures = 0
                        if numbered >= self.batch:
                            continue
                        self._stop.wait(pause(self.poll_interval, numbered))
                    else:
                        self._watch(conn)
                        self._stop.wait(self.takeover_interval)
                except (psycopg2.Error, OSError) as exc:
                    self._lost(first_line(exc))
                    close_quietly(conn)
                    conn = None
                    failures += 1
                    self._stop.wait(min(10.0, 0.2 * 2 ** min(failures - 1, 6)))
        finally:
            if self.elected:
                self._set_elected(False)
            close_quietly(conn)

    def _elect(self, conn: Any) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                        (self.schema + ".sequencer",))
            if not cur.fetchone()[0]:
                self.progress_at = time.monotonic()
                return False
        self._set_elected(True)
        logger.info("this process numbers the durable log in schema %r (elected sequencer)",
                    self.schema)
        return True

    def _watch(self, conn: Any) -> None:
        """Not elected: note whether the log's intake moves (the elected one may be stuck)."""
        with conn.cursor() as cur:
            oldest = log.oldest_waiting(cur, self.schema)
        now = self.progress_at = time.monotonic()
        if oldest is None or oldest != self._oldest:
            self._oldest, self._oldest_since = oldest, now
        self.error = None

    def _number(self, conn: Any) -> int:
        """One call of the database's sequencer; how many messages it numbered. After a
        call that numbered nothing, only if :meth:`_has_work` says there is something."""
        count = 0
        if not self._quiet or self._has_work(conn):
            count = sum(n.numbered for n in log.sequence(conn, self.schema, self.batch))
            self._quiet = not count
            _metrics.inc("log_sequenced", count, log=self.schema)
        self.progress_at = time.monotonic()
        self._oldest = None
        self.error = None
        return count

    def _has_work(self, conn: Any) -> bool:
        """Whether a call would number anything (``log.has_work_sql``, prepared once per
        connection): on a quiet log, a fifth to a half of the server's CPU of a call."""
        with conn.cursor() as cur:
            if conn is not self._prepared_on:
                cur.execute("PREPARE pgws_has_work AS " + log.has_work_sql(self.schema, conn))
                self._prepared_on = conn
            cur.execute("EXECUTE pgws_has_work")
            return bool(cur.fetchone()[0])

    def _lost(self, reason: str) -> None:
        self.error = reason
        if self.elected:
            logger.warning("the durable log's sequencer lost its connection (%s); another "
                           "process takes over, or this one once it reconnects", reason)
            self._set_elected(False)
        else:
            logger.debug("sequencer: %s", reason)

    def _set_elected(self, elected: bool) -> None:
        self.elected = elected
        _metrics.set_gauge("log_sequencer_elected", 1.0 if elected else 0.0, log=self.schema)
