"""One WebSocket connection: its bounded queue and the single writer that drains it."""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
import uuid
from typing import Any, Callable, List, Optional, Sequence, Tuple

from simple_websocket import ConnectionClosed  # type: ignore[import-untyped]
from wsproto.utilities import LocalProtocolError

from .wire import encode_text

logger = logging.getLogger(__name__)

#: Close codes used by the library (RFC 6455 section 7.4 and the IANA registry).
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013

_WAKE = object()  # a queue item that only wakes the writer up


class Delivery:
    """What one poll of the listener brings one connection: frames encoded once, shared."""

    __slots__ = ("texts", "wire")

    def __init__(self, texts: Tuple[str, ...], wire: bytes) -> None:
        self.texts = texts
        #: The complete WebSocket frames, ready to write to any uncompressed socket.
        self.wire = wire

    @classmethod
    def of(cls, text: str) -> "Delivery":
        """One frame, encoded here once for every recipient."""
        return cls((text,), encode_text(text))

    @classmethod
    def join(cls, parts: Sequence["Delivery"]) -> "Delivery":
        """One delivery carrying ``parts`` in order."""
        if len(parts) == 1:
            return parts[0]
        texts: Tuple[str, ...] = tuple(t for p in parts for t in p.texts)
        return cls(texts, b"".join(p.wire for p in parts))


class FrameQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` whose size, and so its bound, counts frames, not items.

    One item carries every frame of one listener poll; bounding frames keeps
    a slow client's memory bounded however the frames arrived. Anything else
    (a wake-up marker) counts as one.
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.frames = 0

    def _qsize(self) -> int:
        return self.frames

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.frames += len(item.texts) if isinstance(item, Delivery) else 1

    def _get(self) -> Any:
        item = super()._get()
        self.frames -= len(item.texts) if isinstance(item, Delivery) else 1
        return item


class GuardedSocket:
    """The socket as simple-websocket sees it: whole writes, one at a time, with a deadline.

    simple-websocket's reader thread writes pongs and close frames with
    ``sock.send`` while the connection's writer sends data, and ``send`` may
    write only part of a frame. Here every write takes the lock and writes all
    of its bytes (non-blocking sends and ``poll()``), or fails after
    ``write_timeout`` seconds. ``close()`` (called by the reader thread when it
    ends) shuts the socket down instead of closing the descriptor: the web
    server closes it once the request is over, so the number is never reused
    while a writer might still hold it.
    """

    def __init__(self, sock: socket.socket, write_timeout: float, on_close: Callable[[], None]) -> None:
        self._sock = sock
        self._write_timeout = write_timeout
        self._on_close = on_close
        self._lock = threading.Lock()
        self._aborted = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            deadline: Optional[float] = None
            while view:
                if self._aborted:
                    raise ConnectionAbortedError("the connection was dropped")
                try:
                    sent = self._sock.send(view, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self._write_timeout
                    if now >= deadline:
                        raise TimeoutError(
                            f"write blocked for more than {self._write_timeout:g}s"
                        ) from None
                    waiter = select.poll()
                    waiter.register(self._sock.fileno(), select.POLLOUT)
                    waiter.poll(max(1, int((deadline - now) * 1000)))
                    continue
                view = view[sent:]

    def abort(self) -> None:
        """Stop all traffic now: blocked reads and writes on other threads fail at once."""
        self._aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.abort()
        self._on_close()


class Connection:
    """A registered WebSocket: its id, audiences, bounded queue and close state.

    Any thread may call :meth:`deliver` (never blocks) and :meth:`request_close`.
    Only the thread that runs :meth:`serve` writes data to the socket.
    """

    def __init__(
        self,
        audiences: Sequence[str],
        *,
        max_queue: int = 1024,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.audiences: Tuple[str, ...] = tuple(dict.fromkeys(audiences))
        self._queue = FrameQueue(max_queue)
        self._close_request: Optional[Tuple[int, str]] = None
        self._ws: Any = None
        self._sock: Optional[GuardedSocket] = None
        self.closed = threading.Event()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def deliver(self, item: Delivery) -> bool:
        """Queue ``item`` for the writer. False if the queue is full (the caller drops us)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def request_close(self, code: int, reason: str) -> None:
        """Ask the writer to send a close frame and end; the first request wins."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self.wake()

    def wake(self) -> None:
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # a full queue wakes the writer anyway

    def abort(self) -> None:
        """Drop the connection at once, without a close frame."""
        if self._sock is not None:
            self._sock.abort()
        self.wake()

    def attach(self, ws: Any, sock: GuardedSocket) -> None:
        """Bind the accepted simple-websocket server and its guarded socket."""
        self._ws = ws
        self._sock = sock

    def serve(self, *, compression: bool, close_timeout: float, idle_check: float = 5.0) -> None:
        """Run the writer until the socket closes. Runs on the request thread."""
        ws, sock = self._ws, self._sock
        if ws is None or sock is None:
            raise RuntimeError("Connection.serve() needs attach() first")
        try:
            while True:
                try:
                    first = self._queue.get(timeout=idle_check)
                except queue.Empty:
                    first = _WAKE
                if self._close_request is not None:
                    self._send_close(ws, sock, close_timeout)
                    return
                if not ws.connected:
                    return
                items = [first]
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                batch: List[Delivery] = [i for i in items if i is not _WAKE]
                if not batch:
                    continue
                if compression:
                    for item in batch:
                        for text in item.texts:
                            ws.send(text)
                else:
                    sock.sendall(batch[0].wire if len(batch) == 1 else b"".join(i.wire for i in batch))
        except TimeoutError as exc:
            logger.warning("dropping connection %s: %s", self.id, exc)
            sock.abort()
        except (ConnectionClosed, OSError, LocalProtocolError):
            sock.abort()
        finally:
            self.closed.set()

    def _send_close(self, ws: Any, sock: GuardedSocket, close_timeout: float) -> None:
        code, reason = self._close_request or (CLOSE_GOING_AWAY, "")
        try:
            ws.close(code, reason)
        except (ConnectionClosed, OSError, LocalProtocolError):
            sock.abort()
            return
        # Give the client a moment to answer the close handshake, then drop it.
        thread = getattr(ws, "thread", None)
        if thread is not None:
            thread.join(close_timeout)
        sock.abort()
