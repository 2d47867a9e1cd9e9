"""One WebSocket connection: its bounded queue and the single writer that drains it."""

from __future__ import annotations

import enum
import logging
import queue
import select
import socket
import threading
import time
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .. import _metrics
from .._formats import envelope, gap_frame
from .._threads import CountingQueue, Latch
from .ids import new_connection_id
from .simple_ws import ConnectionClosed, LocalProtocolError, inbound, inbound_over_limit
from .wire import OPCODE_BINARY, CloseCode, Frame, encode_frame, encode_text

logger = logging.getLogger(__name__)

#: The close codes by their former names (:class:`CloseCode`).
CLOSE_GOING_AWAY = CloseCode.GOING_AWAY
CLOSE_SERVICE_RESTART = CloseCode.SERVICE_RESTART
CLOSE_POLICY_VIOLATION = CloseCode.POLICY_VIOLATION
CLOSE_TRY_AGAIN_LATER = CloseCode.TRY_AGAIN_LATER
#: The reason of the 1013 close a client that reads too slowly gets, unless the endpoint says.
SLOW_CLIENT_REASON = "send queue full"

_WAKE = object()  # a queue item that only wakes the writer up

class Delivered(enum.IntEnum):
    """What :meth:`Connection.deliver` did: FULL is false, the others true."""

    #: The queue had no room; nothing was sent.
    FULL = 0
    #: Queued for the connection's writer.
    QUEUED = 1
    #: Written to the socket at once.
    WRITTEN = 2


FULL, QUEUED, WRITTEN = Delivered.FULL, Delivered.QUEUED, Delivered.WRITTEN


#: What a :class:`Delivery` carries: the protocol's own frames, or the app's (JSON text, or
#: text that may not be JSON); a ``pgws.v2`` socket gets the app's in an envelope.
CONTROL, APP_JSON, APP_TEXT = 0, 1, 2


class Delivery:
    """What one poll of the listener brings one connection: frames encoded once, shared."""

    __slots__ = ("texts", "wire", "kind", "_parts", "_enveloped")

    def __init__(self, texts: Tuple[Frame, ...], wire: bytes, kind: int = CONTROL,
                 parts: Optional[Tuple["Delivery", ...]] = None) -> None:
        #: The frames' contents (``str`` text, ``bytes`` binary), for compressing sockets.
        self.texts = texts
        #: The complete WebSocket frames, ready to write to any uncompressed socket.
        self.wire = wire
        #: :data:`CONTROL`, or the kind of app frames it holds (some of them, when joined).
        self.kind = kind
        self._parts = parts
        self._enveloped: Optional[Delivery] = None

    @classmethod
    def of(cls, data: Frame, kind: int = CONTROL) -> "Delivery":
        """One frame (text for ``str``, binary for ``bytes``), encoded here once for every recipient."""
        if isinstance(data, str):
            return cls((data,), encode_text(data), kind)
        return cls((bytes(data),), encode_frame(bytes(data), OPCODE_BINARY), kind)

    @classmethod
    def raw(cls, wire: bytes) -> "Delivery":
        """Bytes already framed (a pong, the rest of a frame): written as they are."""
        return cls((), wire)

    @classmethod
    def join(cls, parts: Sequence["Delivery"]) -> "Delivery":
        """One delivery carrying ``parts`` in order."""
        if len(parts) == 1:
            return parts[0]
        texts: Tuple[Frame, ...] = tuple(t for p in parts for t in p.texts)
        kind = max(p.kind for p in parts) if parts else CONTROL
        return cls(texts, b"".join(p.wire for p in parts), kind,
                   tuple(parts) if kind != CONTROL else None)

    def enveloped(self) -> "Delivery":
        """This delivery as a ``pgws.v2`` socket gets it: each app text frame in its envelope
        (made once, on first use, for every such socket; binary frames stay as they are)."""
        if self.kind == CONTROL:
            return self
        wrapped = self._enveloped
        if wrapped is None:
            if self._parts is not None:
                wrapped = Delivery.join([p.enveloped() for p in self._parts])
            elif len(self.texts) == 1 and isinstance(self.texts[0], str):
                wrapped = Delivery.of(envelope(self.texts[0], json_text=self.kind == APP_JSON))
            else:
                wrapped = self
            self._enveloped = wrapped  # a race only builds the same frame twice
        return wrapped


#: The frame counts of a connection that has dropped none (shared, read-only).
NO_COUNTS: Mapping[str, int] = MappingProxyType({})

#: Bytes of frames queued per connection before it counts as full, unless the endpoint says.
DEFAULT_MAX_QUEUE_BYTES = 4 << 20


class FrameQueue(CountingQueue):
    """A socket's send queue: counts frames, not items, and holds at most ``maxbytes``
    bytes of them.

    An item (a :class:`Delivery`) carries the frames of one hand-on from a
    source; anything else (a wake-up marker) counts as one frame of no bytes.
    """

    def __init__(self, maxsize: int, maxbytes: int = DEFAULT_MAX_QUEUE_BYTES) -> None:
        super().__init__(maxsize, maxbytes)

    @staticmethod
    def measure(item: Any) -> Tuple[int, int]:
        if isinstance(item, Delivery):
            return max(1, len(item.texts)), len(item.wire)
        return 1, 0


#: The idents of the threads that must never wait on a socket (ints: a set of threads, or a
#: threading.local, costs more to ask on every write).
_nonblocking_threads: Set[int] = set()


def forbid_blocking_writes() -> None:
    """Mark the calling thread as one that must never wait on a socket, until it calls
    :func:`allow_blocking_writes` (before it ends: a later thread may get its ident).

    A :class:`GuardedSocket` written from such a thread (the shared reader)
    sends what the socket takes at once and queues the rest for the
    connection's writer.
    """
    _nonblocking_threads.add(threading.get_ident())


def allow_blocking_writes() -> None:
    """Undo :func:`forbid_blocking_writes` for the calling thread."""
    _nonblocking_threads.discard(threading.get_ident())


class GuardedSocket:
    """The socket as simple-websocket sees it: whole writes, one at a time, with a deadline.

    Every write takes :attr:`lock` and writes all its bytes, or fails after
    ``write_timeout`` seconds. ``close()`` shuts the socket down but leaves the
    descriptor to the web server, so its number is never reused while a
    writer might still hold it.
    """

    __slots__ = ("_sock", "_write_timeout", "_on_close", "_hand_over", "lock", "_aborted")

    def __init__(self, sock: socket.socket, write_timeout: float, on_close: Callable[[], None],
                 hand_over: Optional[Callable[[bytes], None]] = None) -> None:
        self._sock = sock
        self._write_timeout = write_timeout
        self._on_close = on_close
        self._hand_over = hand_over
        #: Held by whoever writes; reentrant so the writer can hold it across a drain.
        self.lock = threading.RLock()
        self._aborted = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def recv_nowait(self, size: int) -> Optional[bytes]:
        """What has arrived (``b""`` at end of stream), or None if nothing has."""
        try:
            return self._sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def send(self, data: bytes) -> int:
        if self._hand_over is not None and threading.get_ident() in _nonblocking_threads:
            self._hand_over(bytes(data))  # never wait here: the connection's writer finishes it
        else:
            self.sendall(data)
        return len(data)

    def send_nowait(self, data: Union[bytes, memoryview]) -> int:
        """Write what the socket takes without waiting; the caller holds :attr:`lock`.

        Returns the number of bytes written (0 when the socket buffer is full).
        """
        if self._aborted:
            raise ConnectionAbortedError("the connection was dropped")
        try:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def sendall(self, data: bytes) -> None:
        with self.lock:
            sent = self.send_nowait(data)
            if sent == len(data):  # nearly always: the whole write in one call
                return
            view = memoryview(data)[sent:]
            deadline: Optional[float] = None
            while view:
                sent = self.send_nowait(view)
                if sent:
                    view = view[sent:]
                    continue
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._write_timeout
                if now >= deadline:
                    raise TimeoutError(f"write blocked for more than {self._write_timeout:g}s")
                waiter = select.poll()
                waiter.register(self._sock.fileno(), select.POLLOUT)
                waiter.poll(max(1, int((deadline - now) * 1000)))

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


#: ``on_message(data)``: called by the writer for each inbound message, in order.
MessageHandler = Callable[[Frame], None]


class Connection:
    """A registered WebSocket: its id, audiences, metadata, bounded queue and close state.

    Any thread may call :meth:`deliver` / :meth:`send` (they never block),
    :meth:`close` and :meth:`close_at`. The thread running :meth:`serve`
    drains the queue; a deliverer that finds the socket idle writes directly
    without blocking, and leaves the end of a frame the socket did not take
    to the writer. Both write under the socket's lock, so frames stay whole.
    """

    #: What :meth:`send` may be told a frame is (``conn.send(frame, kind=Connection.APP_JSON)``).
    CONTROL, APP_JSON, APP_TEXT = CONTROL, APP_JSON, APP_TEXT

    # Thousands live at once: no per-instance dict.
    __slots__ = ("id", "audiences", "metadata", "subprotocol", "envelope", "slow_reason", "label",
                 "_queue", "_close_request", "_close_at", "_ws", "_sock", "_direct", "_rest",
                 "_gap_lock", "_missed", "dropped", "closed", "_on_drained", "__weakref__")

    def __init__(
        self,
        audiences: Sequence[str],
        *,
        max_queue: int = 1024,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> None:
        self.id = new_connection_id()
        #: The audiences the connection was opened with (the hub keeps the live set).
        self.audiences: Tuple[str, ...] = tuple(dict.fromkeys(audiences))
        #: Free for the application: filled in ``on_connect``, read anywhere.
        self.metadata: Dict[str, Any] = {}
        #: The Sec-WebSocket-Protocol to answer with (one the client offered), or None.
        self.subprotocol: Optional[str] = None
        #: App frames go out in their envelope (the client chose ``pgws.v2``).
        self.envelope = False
        #: The reason of the 1013 close if this client reads too slowly.
        self.slow_reason = SLOW_CLIENT_REASON
        #: The ``endpoint`` label of this connection's metrics.
        self.label = "endpoint"
        self._queue = FrameQueue(max_queue, max_queue_bytes)
        self._close_request: Optional[Tuple[int, str]] = None
        self._close_at: Optional[Tuple[float, int, str]] = None
        self._ws: Any = None
        self._sock: Optional[GuardedSocket] = None
        self._direct = False
        #: The end of a frame a direct write left half-written; the writer sends it first.
        self._rest: Optional[bytes] = None
        # Lock order: the socket's write lock (GuardedSocket.lock), then _gap_lock, then
        # the queue's mutex; never the other way round.
        self._gap_lock = threading.Lock()  # guards _missed and dropped
        # Both start as one shared read-only mapping: most connections never drop a frame.
        #: Frames dropped since the last gap frame, by channel (the ``drop`` policy).
        self._missed: Mapping[str, int] = NO_COUNTS
        #: Every frame dropped for this connection so far, by channel.
        self.dropped: Mapping[str, int] = NO_COUNTS
        #: Set once the writer has ended (the socket is over).
        self.closed = Latch()
        self._on_drained: Optional[Callable[[], None]] = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def close_code(self) -> Optional[int]:
        """The close code the server asked for, or None (the client closed, or the socket broke)."""
        request = self._close_request
        return None if request is None else request[0]

    @property
    def close_reason(self) -> Optional[str]:
        """The reason of the close the server asked for, or None (as :attr:`close_code`)."""
        request = self._close_request
        return None if request is None else request[1]

    def deliver(self, item: Delivery) -> Delivered:
        """Hand ``item`` to the socket without blocking: ``Delivered.WRITTEN`` (written at
        once), ``QUEUED`` (for the writer), or ``FULL`` (false: the queue has no room).

        While frames are missing (:meth:`add_missed`), ``item`` is queued behind
        one gap frame per channel, or not at all if the queue has no room.
        """
        if item.kind and self.envelope:
            item = item.enveloped()
        if self._missed:
            return QUEUED if self._deliver_after_gap(item) else FULL
        sock = self._sock
        if self._direct and sock is not None and sock.lock.acquire(blocking=False):
            try:
                # unfinished_tasks counts items queued or held by the writer: only
                # when it is zero may a write here go ahead of nothing.
                if (self._queue.unfinished_tasks == 0 and self._rest is None
                        and self._close_request is None):
                    self._write_now(sock, item.wire)
                    return WRITTEN
            finally:
                sock.lock.release()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return FULL
        return QUEUED

    @property
    def has_room(self) -> bool:
        """True while the send queue is at most half full (frames and bytes)."""
        return self._queue.has_room()

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the send queue is at most half full: now (on this thread)
        if it is, else on the writer's thread after a write. It may be called twice."""
        self._on_drained = callback
        if self.has_room:
            self._on_drained = None
            callback()

    def add_missed(self, counts: Dict[str, int]) -> None:
        """Count frames dropped for this client only (``drop`` policy), by channel.

        The client gets ``{"event": "gap", "channel": ..., "missed": N}`` before
        its next frame, or as soon as its queue is empty again.
        """
        with self._gap_lock:
            missed = self._missed if isinstance(self._missed, dict) else {}
            dropped = self.dropped if isinstance(self.dropped, dict) else {}
            for channel, n in counts.items():
                missed[channel] = missed.get(channel, 0) + n
                dropped[channel] = dropped.get(channel, 0) + n
            self._missed, self.dropped = missed, dropped
        self.wake()

    @property
    def missed(self) -> Dict[str, int]:
        """Frames dropped and not yet reported in a gap frame, by channel."""
        with self._gap_lock:
            return dict(self._missed)

    def _gap_delivery(self) -> Delivery:
        """The gap frames for what is missing now (call with the gap lock held)."""
        _metrics.inc("control_frames", len(self._missed), endpoint=self.label, event="gap")
        return Delivery.join([Delivery.of(gap_frame(channel, n))
                              for channel, n in self._missed.items()])

    def _deliver_after_gap(self, item: Delivery) -> bool:
        with self._gap_lock:
            if self._missed:
                item = Delivery.join([self._gap_delivery(), item])
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                return False
            self._missed = NO_COUNTS
        return True

    def _take_gap_if_idle(self) -> Optional[Delivery]:
        """The pending gap frames if nothing is queued (so none can go ahead of older frames)."""
        with self._gap_lock:
            if not self._missed or self._queue.qsize():
                return None
            gap = self._gap_delivery()
            self._missed = NO_COUNTS
            return gap

    def _write_now(self, sock: GuardedSocket, wire: bytes) -> None:
        try:
            sent = sock.send_nowait(wire)
        except OSError:
            sock.abort()
            self.wake()
            return
        if sent < len(wire):
            # Not queued: other threads may be queueing right now without the lock,
            # and nothing may come between the two halves of this frame.
            self._rest = wire[sent:]
            self.wake()

    def hand_over(self, wire: bytes) -> None:
        """Write framed bytes without waiting: now if the socket is idle, else after what is queued."""
        if not self.deliver(Delivery.raw(wire)):
            self.abort()  # the queue is full: the connection is being dropped anyway

    def send(self, data: Frame, *, kind: int = CONTROL) -> bool:
        """Send one frame to this connection only (text for ``str``, binary for ``bytes``);
        ``kind`` :data:`APP_JSON` or :data:`APP_TEXT` for an app frame (see :attr:`envelope`).

        Never blocks. Returns False if the queue was full: the connection is
        then closed with 1013 and :attr:`slow_reason`.
        """
        if self.deliver(Delivery.of(data, kind)):
            return True
        self.request_close(CloseCode.TRY_AGAIN_LATER, self.slow_reason)
        return False

    def request_close(self, code: int, reason: str) -> None:
        """Ask the writer to send a close frame and end; the first request wins."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self.wake()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the socket with ``code`` and ``reason`` after the frames already queued.

        (A connection dropped for overflow, 1013, closes without writing its backlog.)
        """
        self.request_close(code, reason)

    def close_at(self, when: float, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` at ``when`` (seconds since the epoch, ``time.time()``)."""
        self._close_at = (when, code, reason)
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

    def attach(self, ws: Any, sock: GuardedSocket, *, compression: bool = False) -> None:
        """Bind the accepted simple-websocket server and its guarded socket.

        ``compression``: permessage-deflate was negotiated, so frames go
        through the socket's own writer (each recipient's deflate state).
        """
        self._ws = ws
        self._sock = sock
        self._direct = not compression

    def serve(
        self,
        *,
        close_timeout: float,
        on_message: Optional[MessageHandler] = None,
        max_backlog: int = 256,
        idle_check: float = 60.0,
    ) -> None:
        """Run the writer until the socket closes. Runs on the request thread.

        Everything that concerns the writer wakes it (a frame, a close request,
        an inbound message, the socket ending); ``idle_check`` seconds is only
        a safety net, kept long so thousands of idle sockets cost no wake-ups.

        Inbound messages are handed to ``on_message`` between writes, in
        order; more than ``max_backlog`` of them waiting closes the socket
        with 1008.
        """
        ws, sock = self._ws, self._sock
        if ws is None or sock is None:
            raise RuntimeError("Connection.serve() needs attach() first")
        try:
            while True:
                try:
                    first = self._queue.get(timeout=self._wait_time(idle_check))
                except queue.Empty:
                    first = _WAKE
                else:
                    request = self._close_request
                    if request is None or request[0] != CloseCode.TRY_AGAIN_LATER:
                        self._write(ws, sock, first)
                if self._close_at is not None and time.time() >= self._close_at[0]:
                    self.request_close(self._close_at[1], self._close_at[2])
                if self._close_request is not None:
                    self._send_close(ws, sock, close_timeout)
                    return
                if not ws.connected:
                    self._write_rest(ws, sock)
                    return
                if inbound(ws):
                    self._receive(ws, on_message, max_backlog)
        except TimeoutError as exc:
            logger.warning("dropping connection %s: %s", self.id, exc)
            sock.abort()
        except (ConnectionClosed, OSError, LocalProtocolError):
            sock.abort()
        finally:
            self.closed.set()

    def _wait_time(self, idle_check: float) -> float:
        if self._close_at is None:
            return idle_check
        return max(0.0, min(idle_check, self._close_at[0] - time.time()))

    def _write(self, ws: Any, sock: GuardedSocket, first: Any) -> None:
        """Write ``first`` and everything queued behind it, holding the write lock throughout."""
        with sock.lock:
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch: List[Delivery] = [i for i in items if i is not _WAKE]
            self._finish_frame(sock)
            if self._missed:
                gap = self._take_gap_if_idle()
                if gap is not None:
                    batch.append(gap)
            if batch:
                if not self._direct:  # deflate: simple-websocket compresses for this socket
                    for item in batch:
                        if not item.texts:
                            sock.sendall(item.wire)
                        for data in item.texts:
                            ws.send(data)
                else:
                    sock.sendall(batch[0].wire if len(batch) == 1
                                 else b"".join(i.wire for i in batch))
            for _ in items:
                self._queue.task_done()
        callback = self._on_drained
        if callback is not None and self.has_room:
            self._on_drained = None
            callback()

    def _finish_frame(self, sock: GuardedSocket) -> None:
        """Write the end of a frame a direct write left half-written, if any."""
        with sock.lock:
            if self._rest is not None:
                sock.sendall(self._rest)
                self._rest = None

    def _write_rest(self, ws: Any, sock: GuardedSocket) -> None:
        """The socket is closing: write what is still queued (a close frame, say), best effort."""
        try:
            first = self._queue.get_nowait()
        except queue.Empty:
            return
        try:
            self._write(ws, sock, first)
        except (ConnectionClosed, OSError, LocalProtocolError, TimeoutError):
            pass

    def _receive(self, ws: Any, on_message: Optional[MessageHandler], max_backlog: int) -> None:
        """Hand every waiting inbound message to ``on_message`` (outside the write lock).

        More than ``max_backlog`` messages (or the bytes :func:`limit_inbound` allows)
        waiting asks for a 1008 close instead; the shared reader stops reading a socket
        whose backlog is past the limit, so it cannot grow while a handler blocks.
        """
        buffer = inbound(ws)
        while buffer:
            if len(buffer) > max_backlog or inbound_over_limit(ws):
                buffer.clear()
                self.request_close(CloseCode.POLICY_VIOLATION, "too many messages")
                return
            data = buffer.pop(0)
            if on_message is None:
                continue
            try:
                on_message(data)
            except Exception:  # an application hook: log it, keep the socket
                logger.exception("on_message failed for connection %s", self.id)

    def _send_close(self, ws: Any, sock: GuardedSocket, close_timeout: float) -> None:
        code, reason = self._close_request or (CloseCode.GOING_AWAY, "")
        try:
            self._finish_frame(sock)  # a close frame must not land inside a data frame
            ws.close(code, reason)
        except (ConnectionClosed, OSError, LocalProtocolError):
            sock.abort()
            return
        # Give the client a moment to answer the close handshake, then drop it.
        thread = getattr(ws, "thread", None)
        if thread is not None:
            thread.join(close_timeout)
        sock.abort()
