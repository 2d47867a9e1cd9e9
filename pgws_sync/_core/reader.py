"""The shared reader: one selector thread per process reads every WebSocket and sends pings."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._threads import Latch, gather
from .connection import allow_blocking_writes, forbid_blocking_writes
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


#: Longest wait of the poller, in seconds (it then looks for pings due).
_MAX_WAIT = 5.0


class _EpollPoller:
    """Linux: one epoll, each socket registered one-shot. Registering (any thread) is the
    only change a request thread makes, one system call and no lock; the reader re-arms
    a socket after reading it, and a socket it stops reading stays disarmed until its
    descriptor closes (the kernel then drops it). epoll sees a registration made while
    it waits, so registering wakes nobody."""

    live_registration = True

    def __init__(self, wake_fd: int) -> None:
        self._epoll = select.epoll()
        self._wake_fd = wake_fd
        self._epoll.register(wake_fd, select.EPOLLIN)

    def add(self, fd: int) -> None:
        if _register_holding_gil(self._epoll.fileno(), fd):
            return
        try:
            self._epoll.register(fd, _ONE_READ)
        except FileExistsError:  # the same open socket registered again
            self._epoll.modify(fd, _ONE_READ)

    def rearm(self, fd: int) -> None:
        try:
            self._epoll.modify(fd, _ONE_READ)
        except OSError:  # closed meanwhile (EBADF) or not registered any more (ENOENT)
            pass

    def drop(self, fd: int) -> None:
        """Stop reading ``fd``: nothing to do, a one-shot registration is disarmed already."""

    def poll(self, timeout: float) -> List[int]:
        return [fd for fd, _ in self._epoll.poll(timeout)]

    def close(self) -> None:
        self._epoll.close()


class _SelectorPoller:
    """Elsewhere: a selector, one-shot by hand (a socket is unregistered when it is
    readable and registered again once read), its registrations under a lock."""

    live_registration = hasattr(selectors, "KqueueSelector")

    def __init__(self, wake_fd: int) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # guards the selector's registrations
        self._wake_fd = wake_fd
        self._selector.register(wake_fd, selectors.EVENT_READ)

    def add(self, fd: int) -> None:
        with self._lock:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)
            self._selector.register(fd, selectors.EVENT_READ)

    rearm = add

    def drop(self, fd: int) -> None:
        with self._lock:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)

    def poll(self, timeout: float) -> List[int]:
        ready = [key.fd for key, _ in self._selector.select(timeout)]
        for fd in ready:
            if fd != self._wake_fd:
                self.drop(fd)
        return ready

    def close(self) -> None:
        self._selector.close()


_ONE_READ = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLONESHOT", 0)


def _gil_holding_epoll_ctl() -> Optional[Callable[[int, int], bool]]:
    """``epoll_ctl(ADD)`` called without releasing the GIL, or None where not available.

    ``select.epoll.register`` releases the GIL around the system call; with a
    hundred handshakes in flight another thread takes it and the registering one
    waits to get it back (two thread switches). The call never blocks, so keeping
    the GIL costs nothing. Returns a function ``(epoll fd, fd) -> registered``.
    """
    import ctypes
    import platform

    try:
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: calls keep the GIL
        epoll_ctl = libc.epoll_ctl
    except (OSError, AttributeError):
        return None

    class EpollData(ctypes.Union):
        _fields_ = [("fd", ctypes.c_int), ("u64", ctypes.c_uint64)]

    class EpollEvent(ctypes.Structure):
        # <sys/epoll.h>: packed on x86-64 only
        if platform.machine() in ("x86_64", "i386", "i686"):
            _pack_ = 1
        _fields_ = [("events", ctypes.c_uint32), ("data", EpollData)]

    epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(EpollEvent)]
    epoll_ctl.restype = ctypes.c_int
    ctl_add = 1  # EPOLL_CTL_ADD

    def register(epfd: int, fd: int) -> bool:
        event = EpollEvent(_ONE_READ)
        event.data.fd = fd  # what select.epoll reads back, as its own register writes it
        done: int = epoll_ctl(epfd, ctl_add, fd, ctypes.byref(event))
        return done == 0

    return register


def _register_fallback(epfd: int, fd: int) -> bool:
    return False


_register_holding_gil = (_gil_holding_epoll_ctl() if hasattr(select, "epoll") else None) \
    or _register_fallback


def reading_thread(target: Callable[[], None], **kwargs: Any) -> _Socket:
    """simple-websocket ``thread_class``: read this socket on the shared reader thread.

    Instead of a thread per socket, the shared reader reads it without
    blocking, lets simple-websocket handle its frames, sends its pings (a
    missing pong closes it with 1008) and never waits on it: what it writes
    goes out at once or is queued for the connection's writer.
    """
    return _Socket(target, **kwargs)


class SharedReader:
    """The thread behind :func:`reading_thread` (one per process, started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _socks and _pings; no I/O under it
        self._socks: Dict[int, _Socket] = {}
        self._pings: List[Tuple[float, int, _Socket]] = []
        self._count = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        poller = _EpollPoller if hasattr(select, "epoll") else _SelectorPoller
        self._poller = poller(self._wake_r.fileno())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgws-reader", daemon=True)
        self._thread.start()

    def add(self, sock: _Socket) -> None:
        ws = sock.ws
        fd = sock.fd = ws.sock.fileno()
        with self._lock:
            stale = self._socks.get(fd)
            self._socks[fd] = sock
            if ws.ping_interval:
                sock.next_ping = time.monotonic() + ws.ping_interval
                heapq.heappush(self._pings, (sock.next_ping, next(self._count), sock))
        if stale is not None and stale is not sock:
            # A socket whose request ended before we saw it close had this
            # descriptor number: it is over, the new one takes its place.
            stale.ws.connected = False
            stale.finish()
        self._poller.add(fd)
        # Only a ping due before the current wait ends (at most _MAX_WAIT) needs a wake-up.
        if not self._poller.live_registration or (ws.ping_interval
                                                  and ws.ping_interval < _MAX_WAIT):
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
        wake_fd = self._wake_r.fileno()
        try:
            while not self._stop.is_set():
                try:
                    ready = self._poller.poll(self._next_timeout())
                except OSError as exc:  # a descriptor closed under us: drop it and go on
                    logger.warning("shared reader poll failed: %s", exc)
                    self._drop_closed()
                    continue
                for fd in ready:
                    if fd == wake_fd:
                        self._drain_wake()
                        continue
                    sock = self._socks.get(fd)
                    if sock is not None and self._read(sock):
                        self._poller.rearm(fd)
                self._send_pings()
        finally:
            allow_blocking_writes()
            self._poller.close()

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

    def _read(self, sock: _Socket) -> bool:
        """Read what arrived on ``sock``; whether to go on reading it."""
        if not sock.is_alive():
            return False
        ws = sock.ws
        try:
            data = ws.sock.recv_nowait(receive_size(ws))
            if data is None:
                return True  # not readable after all
            if not data:
                raise ConnectionResetError("the client closed the connection")
            ws.connected = feed(ws, data)
            if ws.connected and inbound_over_limit(ws):
                # checked where the backlog grows: read no more (TCP pushes back); its writer
                # closes it with 1008 when it comes back to the backlog
                self._stop_reading(sock)
                return False
        except (OSError, LocalProtocolError):
            ws.connected = False
        except Exception:  # simple-websocket failed on this socket: end it, keep the others
            logger.exception("reading a WebSocket failed")
            ws.connected = False
        if not ws.connected:
            self._finish(sock)
            return False
        return True

    def _stop_reading(self, sock: _Socket) -> None:
        """Read ``sock`` no more, and let its writer know (it ends the socket)."""
        with self._lock:
            mine = self._socks.get(sock.fd) is sock
            if mine:
                del self._socks[sock.fd]
        if mine:
            self._poller.drop(sock.fd)
        sock.finish()
        sock.ws.event.set()

    def _finish(self, sock: _Socket) -> None:
        """The socket is over: stop reading it and tell its writer."""
        self._stop_reading(sock)

    def _drop_closed(self) -> None:
        with self._lock:
            socks = list(self._socks.values())
        for sock in socks:
            if sock.ws.sock.fileno() < 0:
                sock.ws.connected = False
                self._finish(sock)
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


_state_lock = threading.Lock()  # taken only to start or stop the reader
_state: Dict[str, Any] = {"pid": None, "reader": None}


def _reader() -> SharedReader:
    """This process's shared reader, started on first use (and again after a fork)."""
    reader: Optional[SharedReader] = _state["reader"]
    if reader is not None and (_FORK_AWARE or _state["pid"] == os.getpid()):
        return reader  # each socket comes here: no lock, no system call
    with _state_lock:
        if _state["pid"] != os.getpid() or _state["reader"] is None:
            _state["reader"] = SharedReader()
            _state["pid"] = os.getpid()
        reader = _state["reader"]
        assert reader is not None
        return reader


def stop_reader(timeout: float = 5.0) -> None:
    """Stop this process's shared reader, if it runs (a later socket starts a new one)."""
    with _state_lock:
        reader = _state["reader"] if _state["pid"] == os.getpid() else None
        _state["reader"] = None
    if reader is not None:
        reader.stop(timeout)


def _forget_after_fork() -> None:
    """In a forked child: the parent's reader thread does not exist here (nor a thread
    that might hold the lock)."""
    global _state_lock
    _state_lock = threading.Lock()
    _state["reader"] = None


_FORK_AWARE = hasattr(os, "register_at_fork")
if _FORK_AWARE:
    os.register_at_fork(after_in_child=_forget_after_fork)
