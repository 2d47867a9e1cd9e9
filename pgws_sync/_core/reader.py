"""The shared reader: one selector thread per process reads every WebSocket and sends pings."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._threads import Latch, gather
from .connection import forbid_blocking_writes
from .wire import CloseCode
from .simple_ws import (
    LocalProtocolError,
    feed,
    inbound_over_limit,
    owner_of,
    pong_missing,
    receive_size,
    send_ping,
)

logger = logging.getLogger(__name__)


class _Socket:
    """One WebSocket as the shared reader sees it; also the ``thread`` simple-websocket holds."""

    __slots__ = ("ws", "name", "next_ping", "fd", "_done")

    def __init__(self, target: Callable[[], None], **_: Any) -> None:
        self.ws: Any = owner_of(target)
        self.name = "pgws-reader"
        self.next_ping = 0.0
        self.fd = -1
        self._done = Latch()

    # --- the part of threading.Thread that simple-websocket and the endpoint use

    def start(self) -> None:
        _reader().add(self)

    def join(self, timeout: Optional[float] = None) -> None:
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def finish(self) -> None:
        self._done.set()


#: Longest wait of the selector, in seconds (it then looks for pings due).
_MAX_WAIT = 5.0

#: Whether selectors.DefaultSelector watches descriptors registered while it waits.
_LIVE_REGISTRATION = hasattr(selectors, "EpollSelector") or hasattr(selectors, "KqueueSelector")


def reading_thread(target: Callable[[], None], **kwargs: Any) -> _Socket:
    """simple-websocket ``thread_class``: read this socket on the shared reader thread.

    Instead of a thread per socket, the shared reader reads it without
    blocking, lets simple-websocket handle its frames, sends its pings (a
    missing pong closes it with 1008) and never waits on it: what it writes
    goes out at once or is queued for the connection's writer.
    """
    return _Socket(target, **kwargs)


class SharedReader:
    """The selector thread behind :func:`reading_thread` (one per process, started on first use)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # guards _pings and the selector's registrations
        self._pings: List[Tuple[float, int, _Socket]] = []
        self._count = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgws-reader", daemon=True)
        self._thread.start()

    def add(self, sock: _Socket) -> None:
        ws = sock.ws
        sock.fd = ws.sock.fileno()
        with self._lock:
            try:
                self._selector.register(sock.fd, selectors.EVENT_READ, sock)
            except KeyError:
                # A socket whose request ended before we saw it close had this
                # descriptor number: it is over, the new one takes its place.
                stale = self._selector.unregister(sock.fd).data
                stale.ws.connected = False
                stale.finish()
                self._selector.register(sock.fd, selectors.EVENT_READ, sock)
            if ws.ping_interval:
                sock.next_ping = time.monotonic() + ws.ping_interval
                heapq.heappush(self._pings, (sock.next_ping, next(self._count), sock))
        # epoll and kqueue see a new descriptor while waiting: then only a ping
        # due before the current wait ends (at most _MAX_WAIT) needs a wake-up.
        # Saves a thread switch per socket.
        if not _LIVE_REGISTRATION or (ws.ping_interval and ws.ping_interval < _MAX_WAIT):
            self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; sockets still open are no longer read."""
        self._stop.set()
        self._wake()
        gather([self._thread], timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or stopping

    def _run(self) -> None:
        forbid_blocking_writes()
        while not self._stop.is_set():
            try:
                events = self._selector.select(self._next_timeout())
            except OSError as exc:  # a descriptor closed under us: drop it and go on
                logger.warning("shared reader select failed: %s", exc)
                self._drop_closed()
                continue
            for key, _ in events:
                if key.data is None:
                    self._drain_wake()
                else:
                    self._read(key.data)
            self._send_pings()

    def _next_timeout(self) -> float:
        with self._lock:
            if not self._pings:
                return _MAX_WAIT
            return max(0.0, min(_MAX_WAIT, self._pings[0][0] - time.monotonic()))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _read(self, sock: _Socket) -> None:
        ws = sock.ws
        try:
            data = ws.sock.recv_nowait(receive_size(ws))
            if data is None:
                return  # not readable after all
            if not data:
                raise ConnectionResetError("the client closed the connection")
            ws.connected = feed(ws, data)
            if ws.connected and inbound_over_limit(ws):
                # checked where the backlog grows: read no more (TCP pushes back); its writer
                # closes it with 1008 when it comes back to the backlog
                self._stop_reading(sock)
                return
        except (OSError, LocalProtocolError):
            ws.connected = False
        except Exception:  # simple-websocket failed on this socket: end it, keep the others
            logger.exception("reading a WebSocket failed")
            ws.connected = False
        if not ws.connected:
            self._finish(sock)

    def _stop_reading(self, sock: _Socket) -> None:
        """Read ``sock`` no more, and let its writer know (it ends the socket)."""
        with self._lock:
            try:
                if self._selector.get_key(sock.fd).data is sock:
                    self._selector.unregister(sock.fd)
            except (KeyError, ValueError, OSError):
                pass
        sock.finish()
        sock.ws.event.set()

    def _finish(self, sock: _Socket) -> None:
        """The socket is over: stop reading it and tell its writer."""
        self._stop_reading(sock)

    def _drop_closed(self) -> None:
        with self._lock:
            keys = list(self._selector.get_map().values())
        for key in keys:
            if key.data is not None and key.data.ws.sock.fileno() < 0:
                key.data.ws.connected = False
                self._finish(key.data)

    def _send_pings(self) -> None:
        now = time.monotonic()
        due: List[_Socket] = []
        with self._lock:
            while self._pings and self._pings[0][0] <= now:
                _, _, sock = heapq.heappop(self._pings)
                if sock.is_alive():
                    due.append(sock)
        for sock in due:
            ws = sock.ws
            try:
                if pong_missing(ws):
                    ws.close(reason=CloseCode.POLICY_VIOLATION, message="Ping/Pong timeout")
                    self._finish(sock)
                    continue
                send_ping(ws)
            except Exception as exc:  # ConnectionClosed, OSError, LocalProtocolError: end it
                logger.info("ping failed, dropping the socket: %s", exc)
                ws.connected = False
                self._finish(sock)
                continue
            sock.next_ping = max(now, sock.next_ping) + ws.ping_interval
            with self._lock:
                heapq.heappush(self._pings, (sock.next_ping, next(self._count), sock))


_state_lock = threading.Lock()
_state: Dict[str, Any] = {"pid": None, "reader": None}


def _reader() -> SharedReader:
    """This process's shared reader, started on first use (and again after a fork)."""
    with _state_lock:
        if _state["pid"] != os.getpid() or _state["reader"] is None:
            _state["reader"] = SharedReader()
            _state["pid"] = os.getpid()
        reader: SharedReader = _state["reader"]
        return reader


def stop_reader(timeout: float = 5.0) -> None:
    """Stop this process's shared reader, if it runs (a later socket starts a new one)."""
    with _state_lock:
        reader = _state["reader"] if _state["pid"] == os.getpid() else None
        _state["reader"] = None
    if reader is not None:
        reader.stop(timeout)
