"""Thread primitives: a one-waiter condition, a latch, a waking flag, a counting queue, gather.

Small and dependency-free, as psycopg_pool keeps its ``_acompat.py``: the
connection, the reader and every background thread of the sources and
products build on these. Each is cheaper per instance than the ``threading``
class it stands in for, because thousands of sockets hold one each.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple

logger = logging.getLogger(__name__)


def gather(threads: Iterable[Optional[threading.Thread]], timeout: float) -> List[threading.Thread]:
    """Wait up to ``timeout`` seconds in all for ``threads`` to end (None and the calling
    thread are skipped); log each that did not, and return them."""
    deadline = time.monotonic() + timeout
    late: List[threading.Thread] = []
    for thread in threads:
        if thread is None or thread is threading.current_thread() or thread.ident is None:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            late.append(thread)
            logger.warning("thread %s did not stop within %.1fs", thread.name, timeout)
    return late


class OneWaiter:
    """``threading.Condition`` for a lock that at most one thread at a time waits on.

    A socket's queue uses it: only the connection's writer waits. It holds two
    slots and takes a lock per wait, as a Condition does, without a Condition's
    instance dict and deque.
    """

    __slots__ = ("_lock", "_waiter")

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._waiter: Optional[Any] = None

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Release the lock until :meth:`notify` or ``timeout``; call with the lock held.

        A second thread waiting at the same time (a blocking ``put`` or ``join`` on
        the queue) raises RuntimeError: it would never be woken.
        """
        if self._waiter is not None:
            raise RuntimeError("OneWaiter: another thread is already waiting (only the "
                               "connection's writer may block on its queue)")
        waiter = threading.Lock()
        waiter.acquire()
        self._waiter = waiter
        self._lock.release()
        try:
            return waiter.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        finally:
            self._lock.acquire()
            if self._waiter is waiter:
                self._waiter = None

    def notify(self, n: int = 1) -> None:
        """Wake the waiting thread, if any; call with the lock held."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.release()

    def notify_all(self) -> None:
        self.notify()


class CountingQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` bounded in units and in bytes, that only one thread waits on.

    :meth:`measure` says how many units and bytes an item counts for (one and
    none here; subclasses say more). An item goes in only if all of it fits,
    except that an empty queue takes any item. Puts never wait.

    :param maxsize: the most units queued.
    :param maxbytes: the most bytes queued.
    """

    def __init__(self, maxsize: int, maxbytes: int) -> None:
        # queue.Queue.__init__'s attributes, but with one condition instead of three:
        # only the writer ever waits, puts never wait and nobody joins.
        # (tests/core/test_connection.py checks no attribute of Queue is missing.)
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self._init(maxsize)
        self.mutex = threading.Lock()
        self.not_empty = self.not_full = self.all_tasks_done = OneWaiter(self.mutex)  # type: ignore[assignment]
        self.unfinished_tasks = 0
        self.is_shutdown = False  # Python 3.13's Queue.shutdown()

    @staticmethod
    def measure(item: Any) -> Tuple[int, int]:
        """(units, bytes) ``item`` counts for."""
        return 1, 0

    def _init(self, maxsize: int) -> None:
        # A list, not a deque: an empty deque holds a block of its own, per socket.
        self.queue: List[Any] = []
        self.frames = 0
        self.bytes = 0

    def _qsize(self) -> int:
        return self.frames

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Queue ``item``, or raise ``queue.Full`` if it does not all fit."""
        count, size = self.measure(item)
        with self.mutex:
            if self.frames and (self.frames + count > self.maxsize
                                or self.bytes + size > self.maxbytes):
                raise queue.Full
            self._put(item)
            self.frames += count
            self.bytes += size
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _get(self) -> Any:
        item = self.queue.pop(0)
        count, size = self.measure(item)
        self.frames -= count
        self.bytes -= size
        return item

    def has_room(self) -> bool:
        """At most half full, in units and in bytes."""
        return self.frames <= self.maxsize // 2 and self.bytes <= self.maxbytes // 2


class Latch:
    """A one-way flag threads can wait on: a ``threading.Event`` that is never cleared,
    built on one lock (an Event holds a condition and a deque)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # set already

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once set; False if ``timeout`` seconds passed first."""
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()
            return True
        return False


class WakingEvent:
    """An event nobody waits on: ``set()`` raises the flag and calls ``wake``.

    simple-websocket's "something arrived" event is one: it wakes the
    connection's writer, which waits on its queue, not on the event.
    """

    __slots__ = ("_flag", "_wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._flag = False
        self._wake = wake

    def set(self) -> None:
        self._flag = True
        self._wake()

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        raise RuntimeError("pgws_sync delivers inbound messages to on_message; nothing waits here")
