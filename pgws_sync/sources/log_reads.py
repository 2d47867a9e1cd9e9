"""Where a process reads the durable log: the primary, or a streaming replica that has replayed enough.

A standby cannot LISTEN, number or prune, so only the streams thread's reads
(catch-up, pages, heads) may go to it. A unit of that thread's work that only
follows wake-ups (:meth:`ReplicaReads.begin` with their heads) reads from the
replica once its ``streams`` rows have reached the heads the wake-ups named: the
numbering they announced is then visible there, and no query goes to the
primary. Any other work (subscribes, pages, the safety net) first asks the
primary how far its WAL is flushed (``pg_current_wal_flush_lsn()``, one call of
no table) and reads from the replica only once its
``pg_last_wal_replay_lsn()`` has reached that point: everything the primary had
committed when the work began is then visible there. Either way nothing is
delivered past what was replayed and no wake-up is spent on rows not replayed
yet. The replica gets ``max_wait`` seconds to get there; a replica further
behind, or one that cannot be reached, hands the reads to the primary (a WARNING
and a metric) until a probe, every few seconds while there is work, finds it
caught up again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import psycopg2
from psycopg2 import sql

from .. import _metrics
from ..errors import first_line
from .log import lsn
from .postgres import close_quietly, connect

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Per channel, the head a wake-up named and the primary's WAL position it gave.
Heads = Dict[str, Tuple[int, Optional[int]]]

#: Seconds between two probes of a replica that lagged or was lost, at first; doubled after
#: each failed probe up to :data:`PROBE_MAX`.
PROBE_FIRST = 1.0
PROBE_MAX = 10.0
#: The longest a probe waits for the replica to reach the primary's position.
PROBE_WAIT = 0.1
#: Seconds between two looks at the replica's replay position while waiting: at first, and
#: at most (doubled in between).
POLL_FIRST = 0.0005
POLL_MAX = 0.005
#: Seconds a unit of work that only follows wake-ups waits for the replica to reach their
#: heads before it asks the primary how far its WAL is flushed and waits for that instead
#: (a forged wake-up naming a head the log never reaches costs no more than this).
HEADS_WAIT = 0.05
#: Seconds connecting to the replica may take.
CONNECT_TIMEOUT = 2


class PrimaryReads:
    """Every read on the primary (the default)."""

    #: Where the reads of the current work go.
    source = "primary"

    def begin(self, heads: Optional[Heads] = None, epoch: Optional[str] = None) -> None:
        """New work: what it reads must include what the primary holds now, or, with
        ``heads``, those channels' heads in the log of ``epoch``."""

    def run(self, primary: Any, read: Callable[[Any], T]) -> T:
        """``read(cursor)`` on the chosen server (the primary here)."""
        with primary.cursor() as cur:
            return read(cur)

    def close(self) -> None:
        """Close what this holds open."""

    def status(self) -> Dict[str, Any]:
        return {"reads": self.source}


class ReplicaReads(PrimaryReads):
    """Reads on a streaming replica once it has replayed what the primary held when the work
    began, else on the primary (see the module).

    :param dsn: the replica.
    :param schema: the log's schema.
    :param max_wait: seconds a unit of work waits for the replica to replay that far before
        reading from the primary instead.
    :param label: the ``endpoint`` label of the metrics.
    :param pause: ``pause(seconds)`` waits that long, or less and returns True once the
        thread is to stop.
    """

    def __init__(self, dsn: str, *, schema: str, max_wait: float, label: str,
                 pause: Callable[[float], bool]) -> None:
        self.dsn = dsn
        self._reached = sql.SQL(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), (SELECT epoch FROM {s}.meta), "
            "(SELECT count(*) FROM unnest(%s::text[], %s::bigint[]) AS t(channel, head) "
            "JOIN {s}.streams s ON s.channel = t.channel AND s.head >= t.head)"
        ).format(s=sql.Identifier(schema))
        self.max_wait = max_wait
        self.label = label
        self.pause = pause
        self.source = "primary"
        #: Replica bytes behind the primary at the last look (None: not looked yet).
        self.lag_bytes: Optional[int] = None
        self._conn: Any = None
        self._on_replica: Optional[bool] = None  # where the current work reads, once chosen
        self._heads: Optional[Heads] = None  # what the current work waits for, if known
        self._epoch: Optional[str] = None
        self._usable = True  # False after a fallback, until a probe finds it caught up
        self._probe_at = 0.0
        self._probe_every = PROBE_FIRST

    def begin(self, heads: Optional[Heads] = None, epoch: Optional[str] = None) -> None:
        self._on_replica = None
        self._heads, self._epoch = (heads, epoch) if heads and epoch is not None else (None, None)

    def run(self, primary: Any, read: Callable[[Any], T]) -> T:
        if self._on_replica is None:
            self._on_replica = self._choose(primary)
        if self._on_replica:
            try:
                with self._conn.cursor() as cur:
                    result = read(cur)
                _metrics.inc("log_reads", endpoint=self.label, source="replica")
                return result
            except psycopg2.Error as exc:
                self._fall_back("lost", f"reading from the replica failed: {first_line(exc)}")
                self._on_replica = False
        with primary.cursor() as cur:
            result = read(cur)
        _metrics.inc("log_reads", endpoint=self.label, source="primary")
        return result

    def close(self) -> None:
        close_quietly(self._conn)
        self._conn = None

    def status(self) -> Dict[str, Any]:
        return {"reads": self.source, "replica_lag_bytes": self.lag_bytes}

    # ------------------------------------------------------------ choosing

    def _choose(self, primary: Any) -> bool:
        """Whether to read from the replica: it reaches the wake-ups' heads within
        :data:`HEADS_WAIT`, or else the primary's flushed position within the wait."""
        now = time.monotonic()
        if not self._usable and now < self._probe_at:
            return False
        wait = self.max_wait if self._usable else min(self.max_wait, PROBE_WAIT)
        if self._heads is not None:
            reached = self._try(0, min(wait, HEADS_WAIT))
            if reached is None or reached:
                return self._chosen(reached)
            # a replica lagging more than usual, or a head no numbering gave (anyone
            # connected may NOTIFY): what the primary has flushed decides, as for other work
            self._heads = None
        with primary.cursor() as cur:  # a failure here is the primary's: the caller's to handle
            cur.execute("SELECT pg_current_wal_flush_lsn()")
            target = lsn(cur.fetchone()[0])
        reached = self._try(target, wait)
        if reached is False:
            self._fall_back("lag", f"the replica is still {self.lag_bytes} bytes of WAL "
                            f"behind after waiting {wait:g} s")
            return False
        return self._chosen(reached)

    def _try(self, target: int, wait: float) -> Optional[bool]:
        """What :meth:`_wait_for` says, connecting first; a replica that cannot be reached
        is lost (None, after the fallback)."""
        try:
            if self._conn is None:
                self._conn = connect(self.dsn, connect_timeout=CONNECT_TIMEOUT,
                                     application_name="pgws_sync streams (replica)")
            return self._wait_for(target, wait)
        except psycopg2.Error as exc:
            self._fall_back("lost", f"the replica cannot be reached: {first_line(exc)}")
            self._heads = None
            return None

    def _chosen(self, reached: Optional[bool]) -> bool:
        """The replica reached what the work needs (True), or not (None: stopping or lost)."""
        if not reached:
            return False
        if not self._usable:
            logger.info("the replica has caught up: durable log reads of %s go to it again",
                        self.label)
        self._usable, self._probe_every = True, PROBE_FIRST
        self._set_source("replica")
        return True

    def _wait_for(self, target: int, wait: float) -> Optional[bool]:
        """Whether the replica replays up to ``target`` (or the heads of :meth:`begin`) within
        ``wait`` seconds (None: the thread is stopping). Raises psycopg2's errors, and for
        a server not in recovery."""
        deadline = time.monotonic() + wait
        delay = POLL_FIRST
        while True:
            if self._heads is None:
                reached, lag = self._replayed_upto(target)
            else:
                reached, lag = self._replayed_heads(self._heads)
            self.lag_bytes = lag
            _metrics.set_gauge("log_replica_lag_bytes", lag, endpoint=self.label)
            if reached:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.pause(min(delay, left)):
                return None
            delay = min(delay * 2, POLL_MAX)

    def _replayed_upto(self, target: int) -> Tuple[bool, int]:
        """Whether the replica has replayed up to the WAL position ``target``; its lag."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()")
            recovering, replayed = cur.fetchone()
        self._check_recovering(recovering)
        lag = max(0, target - lsn(replayed))
        return not lag, lag

    def _replayed_heads(self, heads: Heads) -> Tuple[bool, int]:
        """Whether the replica's ``streams`` rows reached ``heads`` in the same log; its lag
        (at least 1 byte while not: the numbering's commit is past the position it gave)."""
        channels = sorted(heads)
        with self._conn.cursor() as cur:
            cur.execute(self._reached, (channels, [heads[c][0] for c in channels]))
            recovering, replayed, epoch, found = cur.fetchone()
        self._check_recovering(recovering)
        if epoch == self._epoch and found == len(channels):
            return True, 0
        wal = max(w or 0 for _, w in heads.values())
        return False, max(1, wal - lsn(replayed))

    @staticmethod
    def _check_recovering(recovering: bool) -> None:
        if not recovering:
            raise psycopg2.OperationalError("log_read_dsn is not a standby (not in recovery)")

    def _fall_back(self, reason: str, why: str) -> None:
        """Read from the primary until a probe finds the replica caught up."""
        if reason == "lost":
            close_quietly(self._conn)
            self._conn = None
        if self._usable:
            logger.warning("durable log reads of %s go to the primary until the replica "
                           "catches up: %s", self.label, why)
            _metrics.inc("log_replica_fallbacks", endpoint=self.label, reason=reason)
        else:
            self._probe_every = min(PROBE_MAX, self._probe_every * 2)
        self._usable = False
        self._probe_at = time.monotonic() + self._probe_every
        self._set_source("primary")

    def _set_source(self, source: str) -> None:
        self.source = source
        _metrics.set_gauge("log_replica_in_use", 1.0 if source == "replica" else 0.0,
                           endpoint=self.label)
