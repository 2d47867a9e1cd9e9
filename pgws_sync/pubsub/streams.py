"""Durable channels in one process: read the log once, feed live subscribers, page the others.

One named thread per process and endpoint owns every position: the newest
offset this process has read per channel, and for each subscriber either
"live" or the offset it has received up to. Live subscribers get each page
of new messages as one shared item. A subscriber that resumes (``since``) or
whose queue is full is paged from the log instead, a page at a time, each
page only once its queue is at most half full: its memory stays bounded and
nobody waits for it. It turns live again when it reaches the process's
position, on this same thread, so the seam has no gap and no duplicate.

Failures stay where they happen: each request, each channel's catch-up and
each page runs in its own ``try``; a request that keeps failing is answered
with one error frame and dropped, a row that cannot be framed goes out without
its bad field, and only a lost connection makes the thread reconnect (and do
the unfinished work again). Every database call is bounded by the connection's
timeouts, and the time the current one has run is what health reads.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from typing import (Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple,
                    Union)

import psycopg2

from .. import _metrics
from .._core.connection import APP_JSON, Connection, Delivered, Delivery
from .._core.hub import Hub
from .._threads import gather
from .._core.wire import Frame
from .._formats import dumps, error_frame
from ..errors import LogUnavailable, first_line
from ..sources import log
from ..sources.log_reads import PrimaryReads, ReplicaReads
from ..sources.postgres import close_quietly, connect
from ..sources.sequencer import Sequencer

logger = logging.getLogger(__name__)

#: Messages read per channel and round trip (live), and the most a page holds.
PAGE_SIZE = 256
#: The most bytes of frames one page holds (a page has at least one frame).
PAGE_BYTES = 1 << 20
#: The newest frames of each channel kept encoded in memory, so that subscribers a little
#: behind (a reconnect after a deploy, a slow reader) are paged without asking the database:
#: at most this many per channel, at most RECENT_BYTES of them, and at most
#: RECENT_TOTAL_BYTES for every channel of the process (the least recently used go first).
RECENT_FRAMES = 512
RECENT_BYTES = 1 << 20
RECENT_TOTAL_BYTES = 64 << 20
#: Seconds a database call of the delivery path may run before health calls it stalled.
STALL_SECONDS = 10.0
#: Attempts at a request that fails while the connection is lost, before it is dropped.
REQUEST_ATTEMPTS = 3
#: Seconds between two WARNINGs about wake-ups that named a head the log does not hold.
HEADS_WARNING_EVERY = 60.0
#: The most requests waiting for the streams thread; past it a request is answered busy.
MAX_PENDING_REQUESTS = 10_000


class Subscriber:
    """One socket's subscription to one durable channel."""

    __slots__ = ("conn", "channel", "cursor")

    def __init__(self, conn: Connection, channel: str, cursor: Optional[int]) -> None:
        self.conn = conn
        self.channel = channel
        #: None while live; else the offset it has been sent up to (it is being paged).
        self.cursor = cursor


class SubscribeAnswer(NamedTuple):
    """The frames answering a subscribe the server made on a client's behalf, where a
    protocol has its own (a Push ``joinRoom``): instead of ``subscribed`` and ``error``."""

    #: The frame for a socket subscribed live from ``offset`` of the log's ``epoch``.
    subscribed: Callable[[int, str], str]
    #: The frame for a subscribe that failed, from the reason.
    failed: Callable[[str], str]


#: How a subscribe is answered: True, the ``subscribed`` frame; False, none (a
#: ``resync_required`` or an error always goes); a :class:`SubscribeAnswer`, its frames.
Reply = Union[bool, SubscribeAnswer]


class Request:
    """A subscribe, unsubscribe or forget, handed from a socket's thread to the streams thread."""

    __slots__ = ("kind", "conn", "channel", "since", "epoch", "reply_to", "reply", "attempts")

    def __init__(self, kind: str, conn: Connection, channel: Optional[str] = None,
                 since: Optional[int] = None, epoch: Optional[str] = None,
                 reply_to: Any = None, reply: Reply = True) -> None:
        self.kind = kind
        self.conn = conn
        self.channel = channel
        self.since = since
        self.epoch = epoch
        self.reply_to = reply_to
        #: How to answer (see :data:`Reply`).
        self.reply = reply
        #: How many times the streams thread began it.
        self.attempts = 0


class Head(NamedTuple):
    """Where a channel stands in the log."""

    #: The newest numbered offset.
    offset: int
    #: The oldest offset still kept (``offset + 1`` when nothing is kept).
    low: int


#: (channel, row, epoch) -> the frame a subscriber receives.
FrameMaker = Callable[[log.Row, str], Frame]


class Streams:
    """The durable side of one endpoint in this process (see the module's docstring).

    :param dsn: the database holding the log.
    :param schema: the log's schema.
    :param hub: the endpoint's hub (subscriptions are also joined there as ``key(channel)``).
    :param key: a channel's hub key.
    :param make_frame: builds a message frame from a row and the epoch.
    :param label: the ``endpoint`` label of the metrics.
    :param retention_seconds: how long messages are kept.
    :param retention_messages: how many of a channel's newest messages are kept.
    :param prune_every: seconds between two pruning passes (None: never prune here).
    :param check_interval: seconds between two safety-net checks of every channel's head.
    :param max_queue: the sockets' queue bound in frames (a page fills at most half of it).
    :param max_queue_bytes: the same in bytes.
    :param sequencer_poll: seconds between two looks at the log's intake while this process
        is the elected sequencer.
    :param max_replay: the most messages one resume replays (further back: resync_required).
    :param replay_budget: the most messages one connection may have replayed in all.
    :param read_dsn: a streaming replica of ``dsn`` to read the log from (None: the primary).
    :param read_max_wait: seconds a read waits for the replica to replay what the primary
        held when the work began, before reading from the primary instead.
    """

    def __init__(self, dsn: str, *, schema: str, hub: Hub, key: Callable[[str], str],
                 make_frame: FrameMaker, label: str, retention_seconds: float,
                 retention_messages: int, prune_every: Optional[float] = 30.0,
                 check_interval: float = 30.0, max_queue: int = 1024,
                 max_queue_bytes: int = 4 << 20, sequencer_poll: float = 0.005,
                 max_replay: int = 10_000, replay_budget: int = 100_000,
                 read_dsn: Optional[str] = None, read_max_wait: float = 2.0) -> None:
        self.dsn = dsn
        self.read_dsn = read_dsn
        self.read_max_wait = read_max_wait
        self.schema = schema
        self.hub = hub
        self.key = key
        self.make_frame = make_frame
        self.label = label
        self.retention_seconds = retention_seconds
        self.retention_messages = retention_messages
        self.prune_every = prune_every
        self.check_interval = check_interval
        #: At most half a socket's queue, so a page never overfills it.
        self.page_size = max(1, min(PAGE_SIZE, max_queue // 2))
        self.page_bytes = max(1, min(PAGE_BYTES, max_queue_bytes // 2))
        self.sequencer = Sequencer(dsn, schema=schema, poll_interval=sequencer_poll)
        self.max_replay = max_replay
        self.replay_budget = replay_budget
        #: The log's epoch, once read.
        self.epoch: Optional[str] = None
        self.max_payload = log.DEFAULT_MAX_PAYLOAD
        self.error: Optional[str] = None
        self.connected = False
        #: time.monotonic() when the thread began work it has not finished yet (None: idle).
        self.busy_since: Optional[float] = None

        self._lock = threading.Lock()  # guards the seven fields below
        self._changed = threading.Condition(self._lock)
        self._requests: Deque[Request] = deque()
        self._dirty: Set[str] = set()
        #: Per woken channel, the head and WAL position its wake-up named (see ReplicaReads).
        self._targets: Dict[str, Tuple[int, Optional[int]]] = {}
        self._all_dirty = False
        self._ready: Set[Subscriber] = set()
        self._stopped = False
        #: Per socket, the channels it asked for and has not left (limits count these).
        self._claimed: Dict[Connection, Set[str]] = {}
        # Owned by the thread:
        self._positions: Dict[str, int] = {}
        #: Per channel, least recently used first: (first offset, frames of consecutive
        #: offsets from it, their bytes).
        self._recent: "OrderedDict[str, Tuple[int, Deque[Delivery], int]]" = OrderedDict()
        self._recent_bytes = 0
        self._subs: Dict[str, Dict[Connection, Subscriber]] = {}
        #: Per socket, the channels it is subscribed to here (a disconnect costs only these).
        self._by_conn: Dict[Connection, Set[str]] = {}
        #: Per socket, the messages its resumes have replayed so far.
        self._replayed: Dict[Connection, int] = {}
        self._warned: Set[str] = set()  # channels whose bad rows were logged already
        self._heads_warned_at = -HEADS_WARNING_EVERY  # when a forged wake-up was last logged
        self._conn: Any = None
        self._reads = self._make_reads()
        self._pid: Optional[int] = None
        self._threads: List[threading.Thread] = []
        self._stop_pruning = threading.Event()

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        """Start this process's threads, if not yet."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid or self._stopped:
                return
            self._pid = pid
            self._positions, self._subs, self._conn = {}, {}, None
            self._recent, self._recent_bytes, self._by_conn = OrderedDict(), 0, {}
            self._replayed = {}
            self._reads = self._make_reads()
            self._threads = [threading.Thread(target=self._run, name=f"pgws-streams-{pid}",
                                              daemon=True)]
            if self.prune_every is not None:
                self._threads.append(threading.Thread(target=self._prune_loop,
                                                      name=f"pgws-prune-{pid}", daemon=True))
        for thread in self._threads:
            thread.start()
        self.sequencer.start()

    def _make_reads(self) -> PrimaryReads:
        if self.read_dsn is None:
            return PrimaryReads()
        return ReplicaReads(self.read_dsn, schema=self.schema, max_wait=self.read_max_wait,
                            label=self.label, pause=self._pause)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less: True once stopping."""
        with self._lock:
            return self._changed.wait_for(lambda: self._stopped, seconds)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (waits up to ``timeout`` seconds)."""
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
        self._stop_pruning.set()
        self.sequencer.stop(timeout)
        if self._pid == os.getpid():
            gather(self._threads, timeout)

    def subscribe(self, conn: Connection, channel: str, *, since: Optional[int] = None,
                  epoch: Optional[str] = None, reply_to: Any = None, reply: Reply = True,
                  limit: Optional[int] = None) -> Optional[str]:
        """Subscribe ``conn``; the reply frame (see :data:`Reply`) follows on the streams
        thread.

        Returns None once the request is taken, else why it was refused at once:
        ``conn`` already asked for ``limit`` other channels, or too many requests wait
        (the log has not answered for a while).
        """
        with self._lock:
            claimed = self._claimed.setdefault(conn, set())
            if limit is not None and channel not in claimed and len(claimed) >= limit:
                return f"too many subscriptions: at most {limit} per connection"
            if len(self._requests) >= MAX_PENDING_REQUESTS:
                return "busy: the durable log is not answering; try again later"
            claimed.add(channel)
            self._requests.append(Request("subscribe", conn, channel, since, epoch, reply_to,
                                          reply))
            self._changed.notify()
        return None

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        with self._lock:
            claimed = self._claimed.get(conn)
            if claimed is not None:
                claimed.discard(channel)
        self._request(Request("unsubscribe", conn, channel))

    def forget(self, conn: Connection) -> None:
        """``conn`` is over: drop its subscriptions."""
        with self._lock:
            self._claimed.pop(conn, None)
        self._request(Request("forget", conn))

    def claimed(self, conn: Connection) -> Set[str]:
        """The channels ``conn`` asked for and has not left (some may still be answered)."""
        with self._lock:
            return set(self._claimed.get(conn, ()))

    def wake(self, payloads: Iterable[str]) -> None:
        """New messages were numbered: ``payloads`` are wake-up NOTIFYs' (``log.wake_target``)."""
        woken = [log.wake_target(payload) for payload in payloads]
        with self._lock:
            for target in woken:
                self._dirty.add(target.channel)
                if target.head is not None:
                    head, wal = self._targets.get(target.channel, (0, None))
                    self._targets[target.channel] = (
                        max(head, target.head), max(wal or 0, target.wal or 0) or None)
            self._changed.notify()

    def wake_all(self) -> None:
        """Wake-ups may have been lost (the listener reconnected): look at every channel."""
        with self._lock:
            self._all_dirty = True
            self._changed.notify()

    def stalled_for(self) -> float:
        """Seconds durable delivery has not moved although it had work to do: this thread's
        unfinished work (across reconnects), or the log's numbering."""
        busy = self.busy_since
        mine = 0.0 if busy is None else time.monotonic() - busy
        return max(mine, self.sequencer.stalled_for())

    def status(self) -> Dict[str, Any]:
        stalled = self.stalled_for() >= STALL_SECONDS
        return {"connected": self.connected, "error": None if self.connected else self.error,
                "epoch": self.epoch, "stalled": stalled,
                "sequencer": "elected" if self.sequencer.elected else "standby",
                **self._reads.status()}

    def prune(self) -> Optional[int]:
        """One pruning pass now, on this thread: rows deleted, or None if another process
        was pruning."""
        conn = connect(self.dsn, application_name="pgws_sync prune")
        try:
            return log.prune(conn, self.schema, max_age=self.retention_seconds,
                             keep=self.retention_messages)
        finally:
            close_quietly(conn)

    def check(self) -> bool:
        """Raise :class:`LogUnavailable` if the log is missing, of another version, or this
        role lacks a right it needs; False if the database cannot be reached (nothing known)."""
        try:
            conn = connect(self.dsn, connect_timeout=5, application_name="pgws_sync check")
        except psycopg2.Error:
            return False
        try:
            with conn.cursor() as cur:
                log.log_info(cur, self.schema)
                log.check_rights(cur, self.schema)
        finally:
            close_quietly(conn)
        return True

    def sample(self) -> None:
        """Record how many messages the log keeps and how old its oldest is (metrics)."""
        try:
            conn = connect(self.dsn, connect_timeout=2, application_name="pgws_sync sample")
        except psycopg2.Error:
            return
        try:
            with conn.cursor() as cur:
                kept, oldest = log.backlog(cur, self.schema)
                waiting, waited = log.intake(cur, self.schema)
        except psycopg2.Error:
            return
        finally:
            close_quietly(conn)
        _metrics.set_gauge("log_messages", kept, endpoint=self.label)
        _metrics.set_gauge("log_oldest_message_age_seconds", oldest, endpoint=self.label)
        _metrics.set_gauge("log_intake_messages", waiting, endpoint=self.label)
        _metrics.set_gauge("log_intake_age_seconds", waited, endpoint=self.label)
        _metrics.set_gauge("log_delivery_stalled_seconds", self.stalled_for(),
                           endpoint=self.label)

    def _request(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)
            self._changed.notify()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            close_quietly(self._conn)
            self._conn = None
            self._reads.close()
            self.connected = False

    def _serve(self) -> None:
        failures = 0
        while True:
            try:
                if self._conn is None:
                    self._open()
                while self._step():
                    failures = 0
                return
            except (psycopg2.Error, OSError, LogUnavailable) as exc:
                self._lost(exc)
            except Exception:  # a bug must not end delivery for good: log, reconnect
                logger.exception("durable streams failed; reconnecting")
                self._lost(None)
            failures += 1
            delay = min(10.0, 0.2 * 2 ** min(failures - 1, 6))
            with self._lock:
                if self._changed.wait_for(lambda: self._stopped, delay):
                    return

    def _lost(self, exc: Optional[BaseException]) -> None:
        self.connected = False
        self.error = first_line(exc) if exc is not None else "internal error"
        if exc is not None:
            logger.warning("durable streams: %s", self.error)
        close_quietly(self._conn)
        self._conn = None

    def _open(self) -> None:
        conn = connect(self.dsn, application_name="pgws_sync streams")
        try:
            info = log.log_info(conn.cursor(), self.schema)
        except BaseException:
            close_quietly(conn)
            raise
        self._conn = conn
        self._reads.begin()
        self.max_payload = info.max_payload
        if self.epoch is not None and info.epoch != self.epoch:
            self._new_epoch(info.epoch)
        self.epoch = info.epoch
        self.connected, self.error = True, None
        with self._lock:
            self._all_dirty = True  # whatever was committed while we were away

    def _step(self) -> bool:
        """Wait for work, then do it; False once stopped."""
        with self._lock:
            if not self._changed.wait_for(
                    lambda: (self._stopped or self._requests or self._dirty or self._all_dirty
                             or self._ready), self.check_interval):
                self._all_dirty = True  # the safety net: a wake-up can be missed
            if self._stopped:
                return False
            requests, self._requests = self._requests, deque()
            dirty, self._dirty = self._dirty, set()
            targets, self._targets = self._targets, {}
            for request in requests:
                request.attempts += 1
            if self._all_dirty:
                dirty, self._all_dirty = set(self._subs), False
                targets = {}
            ready, self._ready = self._ready, set()
        if self.busy_since is None:  # until this work is done, even across reconnects
            self.busy_since = time.monotonic()
        followed = dirty & set(self._subs)
        if not requests and not ready and followed and followed <= targets.keys():
            # only wake-ups that name their heads: what must be read is known
            self._reads.begin({c: targets[c] for c in followed}, self.epoch)
        else:
            self._reads.begin()
        for request in [r for r in requests  # only a subscribe needs the database
                        if r.kind == "subscribe" and r.attempts > REQUEST_ATTEMPTS]:
            requests.remove(request)
            self._fail(request, "the durable log did not answer in time; try again")
        try:
            lows = self._prepare_subscribes(requests)
            while requests:
                self._handle(requests[0], lows)
                requests.popleft()
            epoch = self.epoch
            self._catch_up(dirty & set(self._subs))
            if self.epoch == epoch:  # a new log's heads start again
                self._check_heads(targets, followed)
            while ready:
                sub = next(iter(ready))
                self._page_alone(sub)
                ready.discard(sub)
        except BaseException:
            with self._lock:  # nothing is lost when the database fails: do it all again
                self._requests.extendleft(reversed(requests))
                self._dirty |= dirty
                self._ready |= ready
            raise
        self.busy_since = None
        return True

    # ------------------------------------------------------------ requests

    def _prepare_subscribes(self, requests: Deque[Request]) -> Dict[str, int]:
        """Bring every channel these requests subscribe to up to date, in two round trips
        for all of them: channels followed here are caught up, new ones get their head.
        Returns the oldest kept offset of the channels asked for with ``since``."""
        wanted = {r.channel for r in requests if r.kind == "subscribe" and r.channel is not None}
        if not wanted:
            return {}
        self._catch_up(wanted & set(self._subs))
        fresh = {c for c in wanted if c not in self._subs}
        resuming = {r.channel for r in requests if r.kind == "subscribe" and r.since is not None
                    and r.channel is not None}
        found = self._heads(sorted(fresh | resuming)) if fresh or resuming else {}
        for channel in fresh:
            self._positions[channel] = found[channel].offset
        return {channel: found[channel].low for channel in resuming}

    def _handle(self, request: Request, lows: Dict[str, int]) -> None:
        """Do one request; a failure other than the database's fails it alone."""
        conn, channel = request.conn, request.channel
        if request.kind == "forget":
            for name in self._by_conn.pop(conn, set()):
                self._remove(conn, name)
            self._replayed.pop(conn, None)
            return
        assert channel is not None
        if request.kind == "unsubscribe":
            self._remove(conn, channel)
            return
        try:
            if not self._subscribe(request, channel, lows):
                self._unclaim(conn, channel)
        except psycopg2.Error:
            raise  # the connection: reconnect and do it again (a bounded number of times)
        except Exception:  # a bug must not stop every other subscriber: this request fails
            logger.exception("durable subscribe to %r failed", channel)
            self._fail(request, "internal error")

    def _fail(self, request: Request, reason: str) -> None:
        """Answer a request that cannot be done once, and forget it."""
        if request.kind == "subscribe" and request.channel is not None:
            self._unclaim(request.conn, request.channel)
            self._drop_position_if_unused(request.channel)
            text = f"subscribe to {request.channel!r} failed: {reason}"
            answer = request.reply
            request.conn.send(answer.failed(text) if isinstance(answer, SubscribeAnswer) else
                              error_frame(text, channel=request.channel,
                                          reply_to=request.reply_to))

    def _unclaim(self, conn: Connection, channel: str) -> None:
        with self._lock:
            claimed = self._claimed.get(conn)
            if claimed is not None:
                claimed.discard(channel)

    def _subscribe(self, request: Request, channel: str, lows: Dict[str, int]) -> bool:
        """Subscribe as ``request`` asks, at the position :meth:`_prepare_subscribes` found."""
        conn = request.conn
        if channel not in self._positions:  # an earlier request of this batch dropped it
            self._positions[channel] = self._heads([channel])[channel].offset
        if conn.closed.is_set():
            self._drop_position_if_unused(channel)
            return False
        head = self._positions[channel]
        since, epoch = request.since, request.epoch
        reply: Dict[str, Any] = {"event": "subscribed", "channel": channel, "epoch": self.epoch,
                                 "offset": head}
        cursor: Optional[int] = None
        if since is not None:
            if epoch is not None and epoch != self.epoch:
                reply = self._resync_required(channel, "epoch: the log was recreated since "
                                              "that offset was read", head)
            elif since > head:
                conn.send(error_frame(f"invalid 'since': {since} is beyond the channel's newest "
                                      f"offset ({head})", reply_to=request.reply_to))
                self._drop_position_if_unused(channel)
                return False
            else:
                low = lows[channel] if channel in lows else self._heads([channel])[channel].low
                used = self._replayed.get(conn, 0)
                if since < low - 1:
                    reply = self._resync_required(
                        channel, f"retention: offsets up to {low - 1} are no longer kept", head)
                elif head - since > self.max_replay:
                    reply = self._resync_required(
                        channel, f"replay limit: {head - since} messages to replay, at most "
                        f"{self.max_replay} per resume", head)
                elif used + head - since > self.replay_budget:
                    reply = self._resync_required(
                        channel, f"replay budget: this connection has replayed {used} "
                        f"messages, at most {self.replay_budget}", head)
                elif since < head:
                    cursor = since
                    self._replayed[conn] = used + head - since
        if not self.hub.join(conn, self.key(channel)):
            self._drop_position_if_unused(channel)
            return False  # the socket is gone
        if request.reply_to is not None:
            reply["reply_to"] = request.reply_to
        if isinstance(request.reply, SubscribeAnswer) and reply["event"] == "subscribed":
            conn.send(request.reply.subscribed(head, reply["epoch"]))
        elif request.reply or reply["event"] != "subscribed":
            conn.send(dumps(reply))
        sub = Subscriber(conn, channel, cursor)
        self._subs.setdefault(channel, {})[conn] = sub
        self._by_conn.setdefault(conn, set()).add(channel)
        if cursor is not None:
            with self._lock:  # paged after the requests, on its own: it may fail alone
                self._ready.add(sub)
        return True

    def _resync_required(self, channel: str, reason: str, head: int) -> Dict[str, Any]:
        _metrics.inc("control_frames", endpoint=self.label, event="resync_required")
        return {"event": "resync_required", "channel": channel, "reason": reason,
                "epoch": self.epoch, "offset": head}

    def _remove(self, conn: Connection, channel: str) -> None:
        subs = self._subs.get(channel)
        if subs is not None and subs.pop(conn, None) is not None:
            self.hub.leave(conn, self.key(channel))
            mine = self._by_conn.get(conn)
            if mine is not None:
                mine.discard(channel)
                if not mine:
                    del self._by_conn[conn]
            if not subs:
                del self._subs[channel]
                self._positions.pop(channel, None)
                self._forget_recent(channel)

    def _drop_position_if_unused(self, channel: str) -> None:
        if channel not in self._subs:
            self._positions.pop(channel, None)

    def _new_epoch(self, epoch: str) -> None:
        """The log was recreated: every subscriber starts again from the new log's head."""
        logger.warning("the durable log in schema %r was recreated (epoch %s -> %s): every "
                       "subscriber gets resync_required", self.schema, self.epoch, epoch)
        self.epoch = epoch
        self._recent.clear()
        self._recent_bytes = 0
        heads = self._heads(list(self._subs))
        for channel, subs in self._subs.items():
            head = heads[channel].offset
            self._positions[channel] = head
            frame = dumps(self._resync_required(channel, "epoch: the log was recreated", head))
            for sub in subs.values():
                sub.cursor = None
                sub.conn.send(frame)

    # ------------------------------------------------------------ delivery

    def _heads(self, channels: List[str]) -> Dict[str, Head]:
        found = self._reads.run(self._conn, lambda cur: log.heads(cur, self.schema, channels))
        return {channel: Head(*head) for channel, head in found.items()}

    def _read(self, positions: List[Tuple[str, int]], limit: int) -> Dict[str, List[log.Row]]:
        """What :func:`log.read_after` finds; nothing if the log was recreated meanwhile
        (every subscriber then starts again from the new log, see :meth:`_new_epoch`)."""
        epoch, found = self._reads.run(self._conn, lambda cur: log.read_after(
            cur, self.schema, positions, limit, self.page_bytes))
        if epoch != self.epoch:
            self._new_epoch(epoch)
            return {}
        return found

    def _catch_up(self, channels: Set[str]) -> None:
        """Read what is new on ``channels`` and hand it to their live subscribers, page by page."""
        while channels:
            found = self._read([(c, self._positions[c]) for c in sorted(channels)],
                               self.page_size)
            full = set()
            for channel in sorted(channels):
                rows = found.get(channel, [])
                if rows and channel in self._subs:
                    self._deliver_live_alone(channel, rows)
                    if len(rows) == self.page_size or rows[-1].running_bytes >= self.page_bytes:
                        full.add(channel)
            channels = full

    def _check_heads(self, targets: Dict[str, Tuple[int, Optional[int]]],
                     followed: Set[str]) -> None:
        """Once caught up: a wake-up that named a head past what the log holds was not the
        sequencer's (anyone who can log in may NOTIFY). Logged, at most once a minute."""
        past = sorted((c, targets[c][0]) for c in followed & targets.keys()
                      if c in self._positions and self._positions[c] < targets[c][0])
        now = time.monotonic()
        if not past or now < self._heads_warned_at + HEADS_WARNING_EVERY:
            return
        self._heads_warned_at = now
        channel, head = past[0]
        logger.warning("a wake-up on %r named offset %d of channel %r, past the %d the log "
                       "holds (%d such channels): something other than the sequencer NOTIFYs "
                       "on that channel; it delivers nothing, but costs every worker a read",
                       log.wake_channel_for(self.schema), head, channel,
                       self._positions[channel], len(past))

    def _deliver_live_alone(self, channel: str, rows: List[log.Row]) -> None:
        """Run :meth:`_deliver_live`; a failure (a bug) costs this channel's subscribers these
        messages, with a ``resync_required``, and nobody else anything."""
        try:
            self._deliver_live(channel, rows)
        except Exception:
            logger.exception("delivering durable messages of %r failed", channel)
            self._positions[channel] = rows[-1].offset
            frame = dumps(self._resync_required(channel, "internal error: messages could not "
                                                "be delivered", rows[-1].offset))
            for sub in self._subs.get(channel, {}).values():
                sub.cursor = None
                sub.conn.send(frame)

    def _deliver_live(self, channel: str, rows: List[log.Row]) -> None:
        before = self._positions[channel]
        subs = self._subs[channel]
        if rows[0].offset != before + 1:  # pruned before this process read them
            frame = dumps(self._resync_required(
                channel, f"retention: offsets {before + 1} to {rows[0].offset - 1} were pruned "
                f"before they could be delivered", rows[0].offset - 1))
            for sub in subs.values():
                if sub.cursor is None:
                    sub.conn.send(frame)
        parts = self._frames(rows)  # before the position moves: built, or nothing moves
        self._positions[channel] = rows[-1].offset
        self._remember(channel, rows[0].offset, parts, continues=rows[0].offset == before + 1)
        item = Delivery.join(parts)
        queued = written = 0
        for sub in list(subs.values()):
            if sub.cursor is not None:
                continue  # being paged: it reads these from the log in turn
            done = sub.conn.deliver(item)
            if done is Delivered.WRITTEN:
                written += 1
            elif done is Delivered.QUEUED:
                queued += 1
            else:  # its queue is full: page it from the log instead of dropping it
                sub.cursor = rows[0].offset - 1
                self._wait_for_room(sub)
        if _metrics.enabled():
            _metrics.inc("messages_delivered", (queued + written) * len(rows),
                         endpoint=self.label)
            _metrics.inc("socket_writes", queued, endpoint=self.label, how="queued")
            _metrics.inc("socket_writes", written, endpoint=self.label, how="direct")
            lag = max(0.0, time.time() - rows[-1].published)
            _metrics.observe("delivery_lag_seconds", lag, endpoint=self.label)

    def _frames(self, rows: List[log.Row]) -> List[Delivery]:
        """Each row's frame, encoded once for every recipient; never raises (see _frame)."""
        return [Delivery.of(self._frame(row), APP_JSON) for row in rows]

    def _frame(self, row: log.Row) -> Frame:
        """A row's frame. A row the publish function would have refused (written into the
        table by hand) goes out without its bad ``reply_to``, or as text; logged once per
        channel."""
        try:
            return self.make_frame(row, self.epoch or "")
        except Exception as exc:  # any bad field of any row: never stop the page
            if row.channel not in self._warned:
                self._warned.add(row.channel)
                logger.warning("durable message %d of %r cannot be framed as written (%s); "
                               "it goes out without its bad fields", row.offset, row.channel,
                               first_line(exc))
        try:
            return self.make_frame(row._replace(reply_to=None), self.epoch or "")
        except Exception:
            return self.make_frame(row._replace(reply_to=None, type="text"), self.epoch or "")

    def _remember(self, channel: str, first: int, parts: List[Delivery], *,
                  continues: bool) -> None:
        """Keep the newest frames of ``channel`` (offsets ``first``...) for paging, within the
        per-channel and per-process bounds (least recently used channels go first)."""
        start, frames, size = self._forget_recent(channel) or (first, deque(), 0)
        if not continues or start + len(frames) != first:
            start, frames, size = first, deque(), 0
        for part in parts:
            frames.append(part)
            size += len(part.wire)
        while frames and (len(frames) > RECENT_FRAMES or size > RECENT_BYTES):
            size -= len(frames.popleft().wire)
            start += 1
        self._recent[channel] = (start, frames, size)
        self._recent_bytes += size
        while self._recent_bytes > RECENT_TOTAL_BYTES and self._recent:
            self._forget_recent(next(iter(self._recent)))

    def _forget_recent(self, channel: str) -> Optional[Tuple[int, Deque[Delivery], int]]:
        kept = self._recent.pop(channel, None)
        if kept is not None:
            self._recent_bytes -= kept[2]
        return kept

    def _recent_page(self, channel: str, after: int, limit: int) -> Optional[List[Delivery]]:
        """Up to ``limit`` frames (and :attr:`page_bytes`) of offsets ``after + 1``... from
        memory, or None if the first of them is not kept."""
        start, frames, _size = self._recent.get(channel, (0, deque(), 0))
        if not start <= after + 1 < start + len(frames):
            return None
        self._recent.move_to_end(channel)
        skip = after + 1 - start
        return self._cut(list(itertools.islice(frames, skip, skip + limit)))

    def _cut(self, parts: List[Delivery]) -> List[Delivery]:
        """The first of ``parts`` that fit :attr:`page_bytes` (at least one)."""
        size = 0
        for i, part in enumerate(parts):
            size += len(part.wire)
            if size > self.page_bytes and i:
                return parts[:i]
        return parts

    def _wait_for_room(self, sub: Subscriber) -> None:
        def ready() -> None:
            with self._lock:
                self._ready.add(sub)
                self._changed.notify()
        sub.conn.when_room(ready)

    def _page_alone(self, sub: Subscriber) -> None:
        """Run :meth:`_page`; a failure other than the database's drops this subscription only."""
        try:
            self._page(sub)
        except psycopg2.Error:
            raise
        except Exception:
            logger.exception("paging durable messages of %r failed", sub.channel)
            self._remove(sub.conn, sub.channel)
            self._unclaim(sub.conn, sub.channel)
            sub.conn.send(error_frame(f"subscription to {sub.channel!r} ended: internal error",
                                      channel=sub.channel))

    def _page(self, sub: Subscriber) -> None:
        """Send ``sub`` its next page from the log; live again once it has caught up."""
        subs = self._subs.get(sub.channel)
        if sub.cursor is None or subs is None or subs.get(sub.conn) is not sub:
            return  # live already, or unsubscribed meanwhile
        position = self._positions[sub.channel]
        if sub.cursor >= position:
            sub.cursor = None
            return
        if not sub.conn.has_room:
            self._wait_for_room(sub)
            return
        limit = min(self.page_size, position - sub.cursor)
        parts = self._recent_page(sub.channel, sub.cursor, limit)
        if parts is None:
            rows = self._read([(sub.channel, sub.cursor)], limit).get(sub.channel, [])
            if sub.cursor is None:
                return  # the log was recreated: it is live at the new log's head
            rows = [row for row in rows if row.offset <= position]
            if not rows or rows[0].offset != sub.cursor + 1:  # pruned while it was behind
                sub.cursor = None
                sub.conn.send(dumps(self._resync_required(
                    sub.channel, "retention: messages after the subscriber's offset were "
                    "pruned before it could read them", position)))
                return
            parts = self._cut(self._frames(rows))
        if not sub.conn.deliver(Delivery.join(parts)):
            self._wait_for_room(sub)
            return
        _metrics.inc("messages_replayed", len(parts), endpoint=self.label)
        sub.cursor += len(parts)
        if sub.cursor >= position:
            sub.cursor = None  # caught up: live from the next page on
        else:
            self._wait_for_room(sub)

    # ------------------------------------------------------------ pruning

    def _prune_loop(self) -> None:
        assert self.prune_every is not None
        while not self._stop_pruning.wait(self.prune_every):
            try:
                deleted = self.prune()
            except (psycopg2.Error, OSError) as exc:
                logger.warning("pruning the durable log failed: %s", first_line(exc))
                continue
            if deleted:
                logger.info("pruned %d messages from the durable log", deleted)
