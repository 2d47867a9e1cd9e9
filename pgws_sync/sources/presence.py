"""Presence in PostgreSQL: who is subscribed where, in every worker and host, and its upkeep.

Two tables in the library's schema (:func:`presence_sql`, run by ``pgws-sync migrate`` and,
idempotently, by the first presence thread): ``presence_workers`` (one row per live worker
process, its heartbeat) and ``presence`` (one row per member: scope, channel, client,
worker, info). One thread per process and endpoint (:class:`PresenceStore`) owns a
connection of its own and does all the writing: it takes joins, leaves and queries from
a queue, writes a batch in one transaction that also NOTIFYs the changes on the scope
(the endpoint's control channel, which every worker listens to), answers the queries
after it, beats its worker's heartbeat (one UPDATE of one row per interval, whatever the
number of members) and deletes the members of workers whose heartbeat is older than the
timeout (a worker SIGKILLed, a host lost), announcing them as leaves. Nothing here knows
sockets: answers and failures go to callbacks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import psycopg2

from .._dsn import Dsn, libpq_dsn
from .._formats import check_notify_size, dumps
from .._threads import gather
from ..errors import PayloadTooLarge
from .postgres import close_quietly, connect

logger = logging.getLogger(__name__)

#: The bytes of one member's info, as JSON, the store keeps (more: ``{}`` and a warning).
MAX_INFO_BYTES = 1024
#: The most changes one NOTIFY carries (and it stays under PostgreSQL's 8000 bytes).
NOTIFY_BUDGET = 7000
#: Seconds a presence answer is reused for the same channel, unless a change of it is
#: announced first (the listener then forgets it).
ANSWER_TTL = 1.0


class Member(NamedTuple):
    """One socket subscribed to one channel."""

    client: str
    info: Dict[str, Any]
    #: A join that takes the place of a member a drain closed: that member's client id.
    replaces: Optional[str] = None

    def frame_value(self) -> Dict[str, Any]:
        value: Dict[str, Any] = {"client": self.client, "info": self.info}
        if self.replaces is not None:
            value["replaces"] = self.replaces
        return value


class Change(NamedTuple):
    """What a presence NOTIFY says of one channel: who joined, who left, how many are there."""

    channel: str
    joins: List[Member]
    leaves: List[Member]
    #: The channel's members after the change.
    total: int


class Answer(NamedTuple):
    """A presence query's answer: the exact count and up to the limit of members."""

    total: int
    members: List[Member]


def presence_sql(schema: str) -> List[str]:
    """The statements that create the presence tables (idempotent)."""
    s = _quoted(schema)
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.presence_workers ("
        f" worker text PRIMARY KEY,"
        f" heartbeat_at timestamptz NOT NULL DEFAULT now())",
        f"CREATE TABLE IF NOT EXISTS {s}.presence ("
        f" scope text NOT NULL, channel text NOT NULL, client text NOT NULL,"
        f" worker text NOT NULL, info jsonb NOT NULL DEFAULT '{{}}',"
        f" joined_at timestamptz NOT NULL DEFAULT now(),"
        f" PRIMARY KEY (scope, channel, client))",
        # a member whose socket a drain closed: kept for the grace, for its return to replace
        f"ALTER TABLE {s}.presence ADD COLUMN IF NOT EXISTS leaving_at timestamptz",
        f"CREATE INDEX IF NOT EXISTS presence_by_worker ON {s}.presence (worker)",
        f"CREATE INDEX IF NOT EXISTS presence_leaving ON {s}.presence (scope, channel)"
        f" WHERE leaving_at IS NOT NULL",
    ]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def setup(conn: Any, schema: str) -> None:
    """Create the presence tables if they are missing (one process at a time; a role without
    the right to create them is fine once ``pgws-sync migrate`` has)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AND EXISTS (SELECT FROM pg_attribute "
                    "WHERE attrelid = to_regclass(%s) AND attname = 'leaving_at')",
                    (f"{_quoted(schema)}.presence_workers", f"{_quoted(schema)}.presence"))
        if cur.fetchone()[0]:
            return
        cur.execute("BEGIN")
        try:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema + ".presence",))
            for statement in presence_sql(schema):
                cur.execute(statement)
            cur.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def grant_presence_sql(schema: str, role: str) -> List[str]:
    """What ``role`` needs to keep presence (an app's role, beside the log's grants)."""
    s = _quoted(schema)
    return [f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.presence, {s}.presence_workers "
            f"TO {_quoted(role)}"]


def info_value(info: Any) -> Dict[str, Any]:
    """``info`` if the store keeps it (a JSON object of at most :data:`MAX_INFO_BYTES`), else
    ``{}`` (logged)."""
    if not isinstance(info, dict):
        logger.warning("presence_info returned %s, not a dict; the member's info is {}",
                       type(info).__name__)
        return {}
    try:
        text = dumps(info, compact=True)
    except (TypeError, ValueError) as exc:
        logger.warning("presence_info returned a dict that is not JSON (%s); the member's "
                       "info is {}", exc)
        return {}
    if len(text.encode("utf-8")) > MAX_INFO_BYTES:
        logger.warning("presence_info returned %d bytes of JSON; at most %d are kept, the "
                       "member's info is {}", len(text.encode("utf-8")), MAX_INFO_BYTES)
        return {}
    return dict(json.loads(text))


def format_changes(changes: Iterable[Change]) -> List[str]:
    """The NOTIFY payloads announcing ``changes``, each under PostgreSQL's limit: a channel
    with many changes is split over several, each with the count after all of them."""
    payloads: List[str] = []
    for change in changes:
        items = [("joins", m) for m in change.joins] + [("leaves", m) for m in change.leaves]
        start = 0
        while True:
            body: Dict[str, Any] = {"op": "presence", "channel": change.channel, "joins": [],
                                    "leaves": [], "count": change.total}
            size = len(dumps(body).encode("utf-8"))
            i = start
            while i < len(items):
                kind, member = items[i]
                add = len(dumps(member.frame_value()).encode("utf-8")) + 2
                if size + add > NOTIFY_BUDGET and i > start:
                    break
                body[kind].append(member.frame_value())
                size += add
                i += 1
            try:
                payloads.append(check_notify_size(dumps(body)))
            except PayloadTooLarge:  # one member alone too large: its info cannot be sent
                logger.warning("a presence change on channel %r is too large to announce",
                               change.channel)
            start = i
            if start >= len(items):
                break
    return payloads


class _Op(NamedTuple):
    kind: str  # join | leave | gone | query
    scope: str
    channel: str
    client: str
    info: Dict[str, Any] = {}
    limit: int = 0
    answer: Optional[Callable[[Optional[Answer]], None]] = None


class PresenceStore:
    """One process's presence thread for one scope (an endpoint's control channel).

    :param dsn: the database.
    :param schema: the schema of the presence tables.
    :param scope: what this endpoint's rows are filed under, and the NOTIFY channel the
        changes are announced on.
    :param timeout: seconds after which a worker whose heartbeat stopped counts as gone;
        heartbeats go every third of it.
    :param max_queue: joins, leaves and queries waiting; past it a query is answered None
        (busy) and a join or leave is dropped with a warning.
    :param grace: seconds a member whose socket a drain closed stays (unannounced) for the
        socket's return to take its place; then it leaves.
    """

    def __init__(self, dsn: Dsn, *, schema: str, scope: str, timeout: float = 30.0,
                 max_queue: int = 100_000, grace: float = 10.0) -> None:
        self.dsn = libpq_dsn(dsn)
        self.grace = grace
        self.schema = schema
        self.scope = scope
        self.timeout = timeout
        self.interval = timeout / 3.0
        self._queue: "queue.Queue[_Op]" = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._lock = threading.Lock()  # guards _thread and _pid
        self.worker = ""
        #: This process's members: client -> channel -> info (written again after a reconnect,
        #: or after another worker expired this one while it was stalled).
        self._mine: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._conn: Any = None
        #: Writes that failed, done again before the next ones.
        self._pending: List[_Op] = []
        #: (channel, limit) -> (when, answer): presence answers until the channel changes.
        self._answers: Dict[Tuple[str, int], Tuple[float, Answer]] = {}
        self._beat_at = 0.0
        self.error: Optional[str] = None
        self._t = _tables(schema)

    # ------------------------------------------------------------ the API

    def start(self) -> None:
        """Start this process's thread (again after a fork)."""
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._stop.is_set():
                return
            self._pid = os.getpid()
            self.worker = f"{os.getpid()}-{secrets.token_hex(6)}"
            self._mine = {}
            self._conn = None
            self._thread = threading.Thread(target=self._run, name="pgws-presence", daemon=True)
            self._thread.start()

    def join(self, channel: str, client: str, info: Dict[str, Any]) -> None:
        self._put(_Op("join", self.scope, channel, client, info))

    def leave(self, channel: str, client: str) -> None:
        self._put(_Op("leave", self.scope, channel, client))

    def gone(self, client: str, *, drained: bool = False) -> None:
        """``client`` closed: it leaves every channel. ``drained``: a drain closed it, so it
        is expected back; its memberships wait ``grace`` seconds, unannounced, for a join of
        equal info on the channel to take their place (else they leave then)."""
        self._put(_Op("drained" if drained else "gone", self.scope, "", client))

    def query(self, channel: str, limit: int, answer: Callable[[Optional[Answer]], None]) -> None:
        """Call ``answer`` on the presence thread with the channel's members (None: the
        database could not answer, or the queue is full)."""
        try:
            self._queue.put_nowait(_Op("query", self.scope, channel, "", limit=limit,
                                       answer=answer))
        except queue.Full:
            answer(None)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, delete this worker's members (announced as leaves), end."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and self._pid == os.getpid():
            gather([thread], timeout)

    # ------------------------------------------------------------ the thread

    def _put(self, op: _Op) -> None:
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            logger.warning("the presence queue is full: a %s of channel %r was dropped",
                           op.kind, op.channel)

    def _run(self) -> None:
        while not self._stop.is_set():
            ops = self._take(min(1.0, self.interval))
            self._work(ops)
        self._work(self._take(0.0))
        self._leave_everything()
        close_quietly(self._conn)

    def _take(self, wait: float) -> List[_Op]:
        ops: List[_Op] = []
        try:
            ops.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            while len(ops) < 5000:
                ops.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return ops

    def _work(self, ops: List[_Op]) -> None:
        # writes that failed go again first (each is idempotent), so no leave is lost
        writes = self._pending + [op for op in ops if op.kind != "query"]
        self._pending = []
        queries = [op for op in ops if op.kind == "query"]
        try:
            conn = self._connection()
            beat = time.monotonic() - self._beat_at >= self.interval
            if writes or beat:
                self._write(conn, writes, beat=beat)
            if beat:  # each worker looks for the others' stopped heartbeats as often
                self._expire(conn)
            for op in queries:
                self._answer(conn, op)
            self.error = None
        except psycopg2.Error as exc:
            error = str(exc).strip()
            (logger.warning if error != self.error else logger.debug)(
                "presence: the database failed (%s); retrying", error)
            self.error = error
            close_quietly(self._conn)
            self._conn = None
            self._pending = writes[-self._queue.maxsize:]
            for op in queries:
                self._call(op, None)
            self._stop.wait(1.0)

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = connect(self.dsn, application_name="pgws_sync presence")
            setup(conn, self.schema)
            self._conn = conn
            self._beat_at = 0.0
            self._rewrite(conn)
        return self._conn

    def _write(self, conn: Any, ops: Sequence[_Op], *, beat: bool) -> None:
        """One transaction: the heartbeat, the joins and leaves, their announcements."""
        joins: Dict[str, Dict[str, Dict[str, Any]]] = {}  # client -> channel -> info
        leaves: List[Tuple[str, str]] = []
        gone: List[str] = []
        drained: List[str] = []
        for op in ops:
            if op.kind == "join":
                self._mine.setdefault(op.client, {})[op.channel] = op.info
                joins.setdefault(op.client, {})[op.channel] = op.info
            elif op.kind == "leave":
                _discard(self._mine, op.client, op.channel)
                _discard(joins, op.client, op.channel)
                leaves.append((op.channel, op.client))
            else:
                self._mine.pop(op.client, None)
                joins.pop(op.client, None)
                (drained if op.kind == "drained" else gone).append(op.client)
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                rewrite = False
                if beat:
                    cur.execute(self._t["beat"], (self.worker,))
                    rewrite = bool(cur.fetchone()[0])  # expired by another worker meanwhile
                left: List[Tuple[str, str, Dict[str, Any]]] = []
                if leaves:  # deletes first: a leave then a join of one key ends joined
                    cur.execute(self._t["leave"], ([c for c, _ in leaves],
                                                   [k for _, k in leaves], self.scope,
                                                   self.worker))
                    left += cur.fetchall()
                if gone:
                    cur.execute(self._t["gone"], (self.scope, self.worker, gone))
                    left += cur.fetchall()
                if drained:  # not announced: the socket is expected back
                    cur.execute(self._t["drained"], (self.scope, self.worker, drained))
                joined = self._insert(cur, joins)
                self._announce(cur, self.scope, joined, left)
                for channel in {r[0] for r in list(joined) + list(left)}:
                    self.changed(channel)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        if beat:
            self._beat_at = time.monotonic()
            if rewrite and self._mine:
                logger.warning("presence: this worker's members had been expired (a stall "
                               "longer than %.0fs?); writing them again", self.timeout)
                self._rewrite(conn)

    def _insert(self, cur: Any, joins: Dict[str, Dict[str, Dict[str, Any]]]
                ) -> List[Tuple[str, str, Dict[str, Any], Optional[str]]]:
        """Write the joins; each takes the place of a drained member of equal info on its
        channel if there is one (the announcement names it: ``replaces``)."""
        rows = [(channel, client, dumps(info)) for client, channels in joins.items()
                for channel, info in channels.items()]
        if not rows:
            return []
        replaced: Dict[Tuple[str, str], str] = {}
        cur.execute(self._t["any_leaving"], (self.scope, list({r[0] for r in rows})))
        if cur.fetchone()[0]:  # after a drain only: one claim per join
            for channel, client, info in rows:
                cur.execute(self._t["claim"], (self.scope, channel, info))
                found = cur.fetchone()
                if found is not None:
                    replaced[(channel, client)] = found[0]
        cur.execute(self._t["join"], (self.scope, self.worker, [r[0] for r in rows],
                                      [r[1] for r in rows], [r[2] for r in rows]))
        return [(channel, client, info, replaced.get((channel, client)))
                for channel, client, info in cur.fetchall()]

    def _rewrite(self, conn: Any) -> None:
        """Write every member of this process again (after a reconnect, or an expiry)."""
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute(self._t["beat"], (self.worker,))
                joined = self._insert(cur, self._mine)
                self._announce(cur, self.scope, joined, [])
                cur.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        self._beat_at = time.monotonic()

    def _announce(self, cur: Any, scope: str, joined: Sequence[Tuple[Any, ...]],
                  left: Sequence[Tuple[Any, ...]]) -> None:
        """NOTIFY the changes (in the writing transaction: they go out at its commit)."""
        if not joined and not left:
            return
        by_channel: Dict[str, Change] = {}
        for rows, kind in ((joined, "joins"), (left, "leaves")):
            for channel, client, info, *replaces in rows:
                change = by_channel.setdefault(channel, Change(channel, [], [], 0))
                getattr(change, kind).append(Member(client, info, *replaces))
        channels = list(by_channel)
        cur.execute(self._t["counts"], (scope, channels))
        counts = dict(cur.fetchall())
        changes = [c._replace(total=int(counts.get(c.channel, 0))) for c in by_channel.values()]
        for payload in format_changes(changes):
            cur.execute("SELECT pg_notify(%s, %s)", (scope, payload))

    def _expire(self, conn: Any) -> None:
        """Delete the members of workers whose heartbeat is older than the timeout (of every
        scope), announced as leaves on each one's scope."""
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute(self._t["expire"], (self.timeout,))
                cur.execute(self._t["orphans"], (self.grace,))
                by_scope: Dict[str, List[Tuple[str, str, Any]]] = {}
                for scope, channel, client, info in cur.fetchall():
                    by_scope.setdefault(scope, []).append((channel, client, info))
                for scope, left in by_scope.items():
                    logger.info("presence: %d members of stopped workers left %r", len(left),
                                scope)
                    self._announce(cur, scope, [], left)
                cur.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def _answer(self, conn: Any, op: _Op) -> None:
        """Answer from the cache while no change of the channel was seen since (many clients
        asking about one channel cost the database one query), else from the database."""
        key = (op.channel, op.limit)
        cached = self._answers.get(key)
        if cached is not None and time.monotonic() - cached[0] < ANSWER_TTL:
            self._call(op, cached[1])
            return
        with conn.cursor() as cur:
            cur.execute(self._t["count"], (op.scope, op.channel))
            count = int(cur.fetchone()[0])
            cur.execute(self._t["members"], (op.scope, op.channel, op.limit))
            members = [Member(client, info) for client, info in cur.fetchall()]
        answer = Answer(count, members)
        if len(self._answers) >= 1000:
            self._answers.clear()
        self._answers[key] = (time.monotonic(), answer)
        self._call(op, answer)

    def changed(self, channel: str) -> None:
        """A change of ``channel`` was announced (by any worker): forget its cached answers.
        Called from the listener's thread."""
        for key in [k for k in list(self._answers) if k[0] == channel]:
            self._answers.pop(key, None)

    def _call(self, op: _Op, answer: Optional[Answer]) -> None:
        if op.answer is None:
            return
        try:
            op.answer(answer)
        except Exception:  # a callback's failure stays with its socket
            logger.exception("a presence answer failed")

    def _leave_everything(self) -> None:
        """On stop: this worker's members leave (announced), its heartbeat row goes."""
        if self._conn is None or self._conn.closed:
            return
        try:
            with self._conn.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute(self._t["retire"], (self.worker,))
                left = cur.fetchall()
                self._announce(cur, self.scope, [], left)
                cur.execute(self._t["forget_worker"], (self.worker,))
                cur.execute("COMMIT")
            logger.info("presence: %d members of this worker left on stop", len(left))
        except psycopg2.Error as exc:
            logger.warning("presence: could not remove this worker's members on stop (%s); "
                           "they expire after %.0fs", str(exc).strip(), self.timeout)

    def status(self) -> Dict[str, Any]:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
        return {"running": alive, "members": sum(len(c) for c in list(self._mine.values())),
                "error": self.error,
                "queued": self._queue.qsize()}


def _discard(members: Dict[str, Dict[str, Dict[str, Any]]], client: str, channel: str) -> None:
    channels = members.get(client)
    if channels is not None:
        channels.pop(channel, None)
        if not channels:
            members.pop(client, None)


def _rollback(conn: Any) -> None:
    if not conn.closed:
        try:
            conn.cursor().execute("ROLLBACK")
        except psycopg2.Error:
            pass


def _tables(schema: str) -> Dict[str, str]:
    s = _quoted(schema)
    return {
        # true when the worker's row was missing (first beat, or expired by another worker)
        "beat": f"INSERT INTO {s}.presence_workers AS w (worker) VALUES (%s) "
                f"ON CONFLICT (worker) DO UPDATE SET heartbeat_at = now() "
                f"RETURNING (xmax = 0)",
        "join": f"INSERT INTO {s}.presence (scope, channel, client, worker, info) "
                f"SELECT %s, c, k, %s, i::jsonb FROM unnest(%s::text[], %s::text[], "
                f"%s::text[]) AS j(c, k, i) ON CONFLICT DO NOTHING "
                f"RETURNING channel, client, info",
        "leave": f"DELETE FROM {s}.presence p USING unnest(%s::text[], %s::text[]) AS d(c, k) "
                 f"WHERE p.scope = %s AND p.channel = d.c AND p.client = d.k "
                 f"AND p.worker = %s RETURNING p.channel, p.client, p.info",
        "gone": f"DELETE FROM {s}.presence WHERE scope = %s AND worker = %s "
                f"AND client = ANY(%s::text[]) RETURNING channel, client, info",
        "counts": f"SELECT channel, count(*) FROM {s}.presence WHERE scope = %s "
                  f"AND channel = ANY(%s::text[]) GROUP BY channel",
        "count": f"SELECT count(*) FROM {s}.presence WHERE scope = %s AND channel = %s",
        "members": f"SELECT client, info FROM {s}.presence WHERE scope = %s AND channel = %s "
                   f"ORDER BY joined_at, client LIMIT %s",
        "expire": f"DELETE FROM {s}.presence_workers "
                  f"WHERE heartbeat_at < now() - make_interval(secs => %s)",
        # members of no live worker: an expired one's (and a stalled one's, written again
        # once it beats)
        # and drained members whose grace is over
        "orphans": f"DELETE FROM {s}.presence p WHERE CASE WHEN p.leaving_at IS NULL "
                   f"THEN NOT EXISTS (SELECT FROM {s}.presence_workers w "
                   f"WHERE w.worker = p.worker) "
                   f"ELSE p.leaving_at < now() - make_interval(secs => %s) END "
                   f"RETURNING p.scope, p.channel, p.client, p.info",
        "drained": f"UPDATE {s}.presence SET leaving_at = now() WHERE scope = %s "
                   f"AND worker = %s AND client = ANY(%s::text[])",
        "any_leaving": f"SELECT EXISTS (SELECT FROM {s}.presence WHERE scope = %s "
                       f"AND channel = ANY(%s::text[]) AND leaving_at IS NOT NULL)",
        "claim": f"DELETE FROM {s}.presence WHERE ctid = (SELECT ctid FROM {s}.presence "
                 f"WHERE scope = %s AND channel = %s AND info = %s::jsonb "
                 f"AND leaving_at IS NOT NULL ORDER BY leaving_at LIMIT 1 "
                 f"FOR UPDATE SKIP LOCKED) RETURNING client",
        # a stopping worker's members leave; its drained ones wait for their grace
        "retire": f"DELETE FROM {s}.presence WHERE worker = %s AND leaving_at IS NULL "
                  f"RETURNING channel, client, info",
        "forget_worker": f"DELETE FROM {s}.presence_workers WHERE worker = %s",
    }
