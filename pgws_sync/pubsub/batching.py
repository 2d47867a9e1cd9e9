"""Batching on the receiving side: the same items make the same batch in every worker."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from .._formats import dumps, loads
from .._threads import gather
from .publication import BatchField, Publication

logger = logging.getLogger(__name__)

#: ``send_marker(channel, marker)``: publish a close marker through the database.
SendMarker = Callable[[str, BatchField], None]


def batch_identity(message: Any) -> str:
    """The text two messages of a batch are compared by (JSON with sorted keys)."""
    return json.dumps(message, sort_keys=True, separators=(",", ":"))


class Finished(NamedTuple):
    """A batch that ended: what its subscribers receive as one message."""

    channel: str
    #: The id of the item that opened it: every recipient in every worker sees this id.
    id: str
    #: ``json``: ``{"name": ..., "messages": [...]}`` as JSON text; ``text``: the lines.
    type: str
    body: str
    #: When its first item was published, if the publisher said.
    time: Optional[str] = None


class _Batch:
    __slots__ = ("first_id", "name", "text", "items", "seen", "marker_at", "time")

    def __init__(self, first_id: str, name: str, text: bool, marker_at: float,
                 time: Optional[str] = None) -> None:
        self.first_id = first_id
        self.time = time
        self.name = name
        self.text = text
        self.items: List[str] = []  # JSON texts as published, or text lines
        self.seen: Set[str] = set()
        self.marker_at: Optional[float] = marker_at

    def finish(self, channel: str) -> Finished:
        if self.text:
            body = self.name + "\n\n" + "\n".join(self.items)
            return Finished(channel, self.first_id, "text", body, self.time)
        body = '{"name":' + dumps(self.name, compact=True) + ',"messages":[' \
            + ",".join(self.items) + "]}"
        return Finished(channel, self.first_id, "json", body, self.time)


class Batcher:
    """Collects batch items per ``(channel, key)`` in the order every worker receives them.

    Every worker receives every item (NOTIFY, in commit order). The first item
    for a ``(channel, key)`` opens a batch; the batch ends at a close marker
    naming that item, which the worker that published the item sends
    ``window`` seconds after receiving it, and any other worker ``grace``
    seconds later if none came: so every worker puts the same items in the same
    batch. Identical items count once. A cancel marker discards the batch.

    :param send_marker: publishes a close marker (on this object's thread).
    :param grace: seconds other workers wait past the window before closing a batch themselves.
    :param thread_name: the timer thread is named ``<thread_name>-<pid>``.
    """

    def __init__(self, send_marker: SendMarker, *, grace: float = 1.0,
                 thread_name: str = "pgws-batcher") -> None:
        self._send_marker = send_marker
        self.grace = grace
        self._thread_name = thread_name
        self._lock = threading.Lock()  # guards the state below
        self._wakeup = threading.Condition(self._lock)
        self._open: Dict[Tuple[str, str], _Batch] = {}
        self._mine: Dict[str, float] = {}  # ids of items this process published, when
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None

    # ------------------------------------------------------------ publishing side

    @property
    def stopped(self) -> bool:
        return self._stopped

    def published(self, message_id: str) -> None:
        """Note that this process published the item ``message_id`` (it sends the marker)."""
        now = time.monotonic()
        with self._lock:
            if len(self._mine) > 10000:  # items that never came back (a listener down)
                self._mine = {k: t for k, t in self._mine.items() if now - t < 60}
            self._mine[message_id] = now

    def kind(self, channel: str, key: str) -> Optional[str]:
        """``text`` or ``json`` for the batch open here, or None."""
        with self._lock:
            batch = self._open.get((channel, key))
            return None if batch is None else ("text" if batch.text else "json")

    # ------------------------------------------------------------ receiving side

    def item(self, pub: Publication) -> None:
        """Add a received batch item (on the source's thread, in arrival order)."""
        if pub.channel is None or pub.batch is None or pub.id is None:
            return  # parse_publication gives items a channel; an id is the publisher's
        field, text = pub.batch, pub.type == "text"
        entry = str(pub.body)
        identity = entry if text else batch_identity(loads(entry))
        now = time.monotonic()
        with self._lock:
            mine = self._mine.pop(pub.id, None) is not None
            if self._stopped:
                return
            key = (pub.channel, field.key)
            batch = self._open.get(key)
            if batch is None:
                wait = field.window + (0.0 if mine else self.grace)
                batch = self._open[key] = _Batch(pub.id, field.name or "", text, now + wait,
                                                 pub.time)
                self._ensure_thread()
                self._wakeup.notify()
            mixed = batch.text != text
            if not mixed and identity not in batch.seen:
                batch.seen.add(identity)
                batch.items.append(entry)
        if mixed:  # logged outside the lock
            logger.warning("dropped a %s item for the open %s batch of channel %r, key %r",
                           pub.type, "JSON" if text else "text", pub.channel, field.key)

    def marker(self, pub: Publication) -> Optional[Finished]:
        """Apply a received marker: the finished batch it closes, or None."""
        if pub.channel is None or pub.batch is None:
            return None
        field, key = pub.batch, (pub.channel, pub.batch.key)
        with self._lock:
            batch = self._open.get(key)
            if batch is None or (field.close is not None and field.close != batch.first_id):
                return None  # closed already, or a marker for an earlier batch
            del self._open[key]
        return None if field.cancel else batch.finish(pub.channel)

    def pending(self) -> int:
        """How many batches are open here."""
        with self._lock:
            return len(self._open)

    def stop(self, timeout: float = 5.0) -> List[Finished]:
        """Stop the timer thread; returns every open batch, finished now (oldest first)."""
        with self._lock:
            self._stopped = True
            self._wakeup.notify_all()
            thread = self._thread if self._pid == os.getpid() else None
            batches, self._open = list(self._open.items()), {}
        gather([thread], timeout)
        return [batch.finish(channel) for (channel, _key), batch in batches]

    # --------------------------------------------------------------- the timer

    def _ensure_thread(self) -> None:
        """Start the timer thread in this process (called with the lock held)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._thread = threading.Thread(target=self._run, name=f"{self._thread_name}-{pid}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = [(channel, key, b.first_id) for (channel, key), b in self._open.items()
                           if b.marker_at is not None and b.marker_at <= now]
                    if due:
                        for channel, key, _ in due:  # again if the marker never comes back
                            self._open[(channel, key)].marker_at = now + max(self.grace, 1.0)
                        break
                    soonest = min((b.marker_at for b in self._open.values()
                                   if b.marker_at is not None), default=now + 1.0)
                    self._wakeup.wait(min(1.0, max(0.001, soonest - now)))
            for channel, key, first_id in due:
                try:
                    self._send_marker(channel, BatchField(key, close=first_id))
                except Exception as exc:  # the database is down: tried again later
                    logger.warning("could not close the batch for channel %r, key %r: %s",
                                   channel, key, exc)

