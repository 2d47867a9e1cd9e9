"""Durable channels in one process: read the log once, feed live subscribers, page the others.

One named thread per process and endpoint owns every position: the newest
offset this process has read per channel, and for each subscriber either
"live" or the offset it has received up to. Live subscribers get each page
of new messages as one shared item. A subscriber that resumes (``since``) or
whose queue is full is paged from the log instead, a page at a time, each
page only once its queue is at most half full: its memory stays bounded and
nobody waits for it. It turns live again when it reaches the process's
position, on this same thread, so the seam has no gap and no duplicate.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

import psycopg2

from .. import _metrics
from .._core.connection import QUEUED, WRITTEN, Connection, Delivery
from .._core.hub import Hub
from .._core.wire import Frame
from .._formats import dumps, error_frame
from ..errors import LogUnavailable, first_line
from ..sources import log
from ..sources.postgres import close_quietly, connect

logger = logging.getLogger(__name__)

#: Messages read per channel and round trip (live), and the most a page holds.
PAGE_SIZE = 256
#: The newest frames of each channel kept encoded in memory, so that subscribers a little
#: behind (a reconnect after a deploy, a slow reader) are paged without asking the database:
#: at most this many per channel, and at most RECENT_BYTES of them.
RECENT_FRAMES = 512
RECENT_BYTES = 1 << 20


class Subscriber:
    """One socket's subscription to one durable channel."""

    __slots__ = ("conn", "channel", "cursor")

    def __init__(self, conn: Connection, channel: str, cursor: Optional[int]) -> None:
        self.conn = conn
        self.channel = channel
        #: None while live; else the offset it has been sent up to (it is being paged).
        self.cursor = cursor


class Request:
    """A subscribe, unsubscribe or forget, handed from a socket's thread to the streams thread."""

    __slots__ = ("kind", "conn", "channel", "since", "epoch", "reply_to", "reply")

    def __init__(self, kind: str, conn: Connection, channel: Optional[str] = None,
                 since: Optional[int] = None, epoch: Optional[str] = None,
                 reply_to: Any = None, reply: bool = True) -> None:
        self.kind = kind
        self.conn = conn
        self.channel = channel
        self.since = since
        self.epoch = epoch
        self.reply_to = reply_to
        #: Send the ``subscribed`` frame (a ``resync_required`` or an error always goes).
        self.reply = reply


#: (channel, row, epoch) -> the frame a subscriber receives.
FrameMaker = Callable[[log.Row, str], Frame]


class Streams:
    """The durable side of one endpoint in this process (see the module's docstring).

    :param dsn: the database holding the log.
    :param schema: the log's schema.
    :param hub: the endpoint's hub (subscriptions are also joined there as ``key(channel)``).
    :param key: a channel's hub key.
    :param make_frame: builds a message frame from a row and the epoch.
    :param check_interval: seconds between two safety-net checks of every channel's head.
    :param prune_every: seconds between two pruning passes (None: never prune here).
    """

    def __init__(self, dsn: str, *, schema: str, hub: Hub, key: Callable[[str], str],
                 make_frame: FrameMaker, label: str, retention_seconds: float,
                 retention_messages: int, prune_every: Optional[float] = 30.0,
                 check_interval: float = 30.0, max_queue: int = 1024) -> None:
        self.dsn = dsn
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
        #: The log's epoch, once read.
        self.epoch: Optional[str] = None
        self.max_payload = log.DEFAULT_MAX_PAYLOAD
        self.error: Optional[str] = None
        self.connected = False

        self._lock = threading.Lock()  # guards the four fields below
        self._changed = threading.Condition(self._lock)
        self._requests: Deque[Request] = deque()
        self._dirty: Set[str] = set()
        self._all_dirty = False
        self._ready: Set[Subscriber] = set()
        self._stopped = False
        # Owned by the thread:
        self._positions: Dict[str, int] = {}
        #: Per channel: (first offset, frames of consecutive offsets from it, their bytes).
        self._recent: Dict[str, Tuple[int, Deque[Delivery], int]] = {}
        self._subs: Dict[str, Dict[Connection, Subscriber]] = {}
        self._conn: Any = None
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
            self._positions, self._subs, self._conn, self._recent = {}, {}, None, {}
            self._threads = [threading.Thread(target=self._run, name=f"pgws-streams-{pid}",
                                              daemon=True)]
            if self.prune_every is not None:
                self._threads.append(threading.Thread(target=self._prune_loop,
                                                      name=f"pgws-prune-{pid}", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (waits up to ``timeout`` seconds)."""
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
        self._stop_pruning.set()
        if self._pid == os.getpid():
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(timeout)

    def subscribe(self, conn: Connection, channel: str, *, since: Optional[int] = None,
                  epoch: Optional[str] = None, reply_to: Any = None, reply: bool = True) -> None:
        """Subscribe ``conn``; the reply frame (none with ``reply=False``, unless it is a
        ``resync_required``) follows on the streams thread."""
        self._request(Request("subscribe", conn, channel, since, epoch, reply_to, reply))

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        self._request(Request("unsubscribe", conn, channel))

    def forget(self, conn: Connection) -> None:
        """``conn`` is over: drop its subscriptions."""
        self._request(Request("forget", conn))

    def wake(self, channels: Iterable[str]) -> None:
        """New messages were committed on ``channels`` (a wake-up NOTIFY arrived)."""
        with self._lock:
            self._dirty.update(channels)
            self._changed.notify()

    def wake_all(self) -> None:
        """Wake-ups may have been lost (the listener reconnected): look at every channel."""
        with self._lock:
            self._all_dirty = True
            self._changed.notify()

    def status(self) -> Dict[str, Any]:
        return {"connected": self.connected, "error": None if self.connected else self.error,
                "epoch": self.epoch}

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
        except psycopg2.Error:
            return
        finally:
            close_quietly(conn)
        _metrics.set_gauge("log_messages", kept, endpoint=self.label)
        _metrics.set_gauge("log_oldest_message_age_seconds", oldest, endpoint=self.label)

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
            if self._all_dirty:
                dirty, self._all_dirty = set(self._subs), False
            ready, self._ready = self._ready, set()
        try:
            lows = self._prepare_subscribes(requests)
            while requests:
                self._handle(requests[0], lows)
                requests.popleft()
            self._catch_up(dirty & set(self._subs))
            for sub in ready:
                self._page(sub)
        except BaseException:
            with self._lock:  # nothing is lost when the database fails: do it all again
                self._requests.extendleft(reversed(requests))
                self._dirty |= dirty
                self._ready |= ready
            raise
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
            self._positions[channel] = found[channel][0]
        return {channel: found[channel][1] for channel in resuming}

    def _handle(self, request: Request, lows: Dict[str, int]) -> None:
        conn, channel = request.conn, request.channel
        if request.kind == "forget":
            for name in list(self._subs):
                self._remove(conn, name)
            return
        assert channel is not None
        if request.kind == "unsubscribe":
            self._remove(conn, channel)
            return
        self._subscribe(request, channel, lows)

    def _subscribe(self, request: Request, channel: str, lows: Dict[str, int]) -> bool:
        """Subscribe as ``request`` asks, at the position :meth:`_prepare_subscribes` found."""
        conn = request.conn
        if channel not in self._positions:  # an earlier request of this batch dropped it
            self._positions[channel] = self._heads([channel])[channel][0]
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
                low = lows[channel] if channel in lows else self._heads([channel])[channel][1]
                if since < low - 1:
                    reply = self._resync_required(
                        channel, f"retention: offsets up to {low - 1} are no longer kept", head)
                elif since < head:
                    cursor = since
        if not self.hub.join(conn, self.key(channel)):
            self._drop_position_if_unused(channel)
            return False  # the socket is gone
        if request.reply_to is not None:
            reply["reply_to"] = request.reply_to
        if request.reply or reply["event"] != "subscribed":
            conn.send(dumps(reply))
        sub = Subscriber(conn, channel, cursor)
        self._subs.setdefault(channel, {})[conn] = sub
        if cursor is not None:
            self._page(sub)
        return True

    def _resync_required(self, channel: str, reason: str, head: int) -> Dict[str, Any]:
        _metrics.inc("control_frames", endpoint=self.label, event="resync_required")
        return {"event": "resync_required", "channel": channel, "reason": reason,
                "epoch": self.epoch, "offset": head}

    def _remove(self, conn: Connection, channel: str) -> None:
        subs = self._subs.get(channel)
        if subs is not None and subs.pop(conn, None) is not None:
            self.hub.leave(conn, self.key(channel))
            if not subs:
                del self._subs[channel]
                self._positions.pop(channel, None)
                self._recent.pop(channel, None)

    def _drop_position_if_unused(self, channel: str) -> None:
        if channel not in self._subs:
            self._positions.pop(channel, None)

    def _new_epoch(self, epoch: str) -> None:
        """The log was recreated: every subscriber starts again from the new log's head."""
        logger.warning("the durable log in schema %r was recreated (epoch %s -> %s): every "
                       "subscriber gets resync_required", self.schema, self.epoch, epoch)
        self.epoch = epoch
        self._recent.clear()
        heads = self._heads(list(self._subs))
        for channel, subs in self._subs.items():
            head = heads[channel][0]
            self._positions[channel] = head
            frame = dumps(self._resync_required(channel, "epoch: the log was recreated", head))
            for sub in subs.values():
                sub.cursor = None
                sub.conn.send(frame)

    # ------------------------------------------------------------ delivery

    def _heads(self, channels: List[str]) -> Dict[str, Tuple[int, int]]:
        with self._conn.cursor() as cur:
            return log.heads(cur, self.schema, channels)

    def _read(self, positions: List[Tuple[str, int]], limit: int) -> Dict[str, List[log.Row]]:
        """What :func:`log.read_after` finds; nothing if the log was recreated meanwhile
        (every subscriber then starts again from the new log, see :meth:`_new_epoch`)."""
        with self._conn.cursor() as cur:
            epoch, found = log.read_after(cur, self.schema, positions, limit)
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
                if rows:
                    self._deliver_live(channel, rows)
                    if len(rows) == self.page_size:
                        full.add(channel)
            channels = full

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
        self._positions[channel] = rows[-1].offset
        parts = self._frames(rows)
        self._remember(channel, rows[0].offset, parts, continues=rows[0].offset == before + 1)
        item = Delivery.join(parts)
        how = [0, 0, 0]  # by deliver()'s answer: full, queued, written
        for sub in list(subs.values()):
            if sub.cursor is not None:
                continue  # being paged: it reads these from the log in turn
            done = sub.conn.deliver(item)
            how[done] += 1
            if not done:  # its queue is full: page it from the log instead of dropping it
                sub.cursor = rows[0].offset - 1
                self._wait_for_room(sub)
        if _metrics.enabled():
            _metrics.inc("messages_delivered", (how[QUEUED] + how[WRITTEN]) * len(rows),
                         endpoint=self.label)
            _metrics.inc("socket_writes", how[QUEUED], endpoint=self.label, how="queued")
            _metrics.inc("socket_writes", how[WRITTEN], endpoint=self.label, how="direct")
            lag = max(0.0, time.time() - rows[-1].published)
            _metrics.observe("delivery_lag_seconds", lag, endpoint=self.label)

    def _frames(self, rows: List[log.Row]) -> List[Delivery]:
        """Each row's frame, encoded once for every recipient."""
        return [Delivery.of(self.make_frame(row, self.epoch or "")) for row in rows]

    def _remember(self, channel: str, first: int, parts: List[Delivery], *,
                  continues: bool) -> None:
        """Keep the newest frames of ``channel`` (offsets ``first``...) for paging."""
        start, frames, size = self._recent.get(channel, (first, deque(), 0))
        if not continues or start + len(frames) != first:
            start, frames, size = first, deque(), 0
        for part in parts:
            frames.append(part)
            size += len(part.wire)
        while frames and (len(frames) > RECENT_FRAMES or size > RECENT_BYTES):
            size -= len(frames.popleft().wire)
            start += 1
        self._recent[channel] = (start, frames, size)

    def _recent_page(self, channel: str, after: int, limit: int) -> Optional[List[Delivery]]:
        """Up to ``limit`` frames of offsets ``after + 1``... from memory, or None if the
        first of them is not kept."""
        start, frames, _size = self._recent.get(channel, (0, deque(), 0))
        if not start <= after + 1 < start + len(frames):
            return None
        skip = after + 1 - start
        return list(itertools.islice(frames, skip, skip + limit))

    def _wait_for_room(self, sub: Subscriber) -> None:
        def ready() -> None:
            with self._lock:
                self._ready.add(sub)
                self._changed.notify()
        sub.conn.when_room(ready)

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
            parts = self._frames(rows)
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
