"""What every notification source shares: the Source protocol, its sinks, one thread per process."""

from __future__ import annotations

import logging
import os
import random
import selectors
import threading
import time
import weakref
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    runtime_checkable,
)

from .. import _metrics
from .._threads import gather
from ..errors import ConfigError, ListenerStopped, first_line

_S = TypeVar("_S", bound="SourceThread")

_live_sources: "weakref.WeakSet[SourceThread]" = weakref.WeakSet()


def live_sources() -> List["SourceThread"]:
    """Every source (listener, Redis source) created in this process that still exists."""
    return list(_live_sources)


class Notification(NamedTuple):
    """One message as a source received it: the channel, the payload text, the sender's pid."""

    channel: str
    payload: str
    #: The sending backend's pid (PostgreSQL), or 0.
    pid: int = 0

#: Notifications per :meth:`Sink.on_notifications` call at most. What arrived together is
#: handed on in slices of this size, so however long the thread was held up, no single item
#: in a socket's queue carries more frames than this (a queue, which takes an item whole,
#: then never holds more than ``max_queue`` frames if ``max_queue`` is at least this).
MAX_BATCH = 64


class Sink(Protocol):
    """What a source hands notifications to (the endpoints implement it)."""

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Called on the source's thread with what arrived together, in order (in slices of
        at most :data:`MAX_BATCH` notifications)."""

    def on_resync(self, reason: str) -> None:
        """Called on the source's thread after a reconnect: notifications may have been lost."""


@runtime_checkable
class Source(Protocol):
    """What feeds an endpoint: a :class:`~pgws_sync.Listener` or a :class:`~pgws_sync.RedisSource`."""

    @property
    def connected(self) -> bool:
        """True while it is up and receiving on every wanted channel."""

    @property
    def listening(self) -> AbstractSet[str]:
        """The channels it receives on now."""

    def start(self) -> object:
        """Start receiving in this process, if not yet (cheap, idempotent)."""

    def status(self) -> Dict[str, Any]:
        """At least ``connected`` (bool) and ``error`` (why it is not, or None)."""

    def add_sink(self, sink: Sink, channels: Iterable[str]) -> None:
        """Hand what arrives on ``channels`` to ``sink``."""

    def remove_sink(self, sink: Sink) -> None:
        """Stop handing anything to ``sink``."""


class Stopping(Exception):
    """Raised inside a source's thread when stop() was called."""


class NoAnswer(Exception):
    """The server did not answer in time."""


class SourceThread:
    """The machinery a :class:`~pgws_sync.Listener` and a :class:`~pgws_sync.RedisSource` share.

    It keeps the sinks and their channels, runs one named daemon thread per
    process (started on first use, so forked workers get their own), and on
    it connects, serves and reconnects with backoff, telling every sink to
    resync after a connection was lost. Subclasses supply the connection
    through the hooks below (``_open``, ``_serve``, ``_close_conn``, ...).

    :param min_reconnect: first delay, in seconds, before reconnecting.
    :param max_reconnect: longest delay, in seconds, between reconnection attempts.
    :param heartbeat_interval: seconds within which a silently dead connection is noticed.
    :param connect_timeout: seconds connecting (and subscribing) may take.
    :param coalesce: seconds over which a stream of messages is gathered (0: none).
    """

    # Set by each subclass (declared only, so a subclass that forgets one fails loudly):
    #: Threads are named ``<_thread_prefix>-<pid>``.
    _thread_prefix: str
    #: How log lines and resync reasons name the source ("listener", "redis source").
    _what: str
    #: The logger of the subclass's module, so that its records keep their logger's name.
    _log: logging.Logger
    #: The message of the ListenerStopped that start() raises after stop().
    _stopped_message: str
    #: Exceptions from _open() that mean "cannot connect" (any other is logged as a bug).
    _connect_errors: Tuple[Type[BaseException], ...]
    #: Exceptions from _serve() that mean "connection lost" (any other is logged as a bug).
    _serve_errors: Tuple[Type[BaseException], ...]

    def __init__(
        self,
        *,
        min_reconnect: float,
        max_reconnect: float,
        heartbeat_interval: float,
        connect_timeout: float,
        coalesce: float,
    ) -> None:
        if min_reconnect <= 0 or max_reconnect < min_reconnect:
            raise ConfigError(
                f"need 0 < min_reconnect <= max_reconnect, got {min_reconnect} and {max_reconnect}"
            )
        if heartbeat_interval <= 0 or connect_timeout <= 0:
            raise ConfigError("heartbeat_interval and connect_timeout must be positive seconds")
        if coalesce < 0 or coalesce >= heartbeat_interval / 2:
            raise ConfigError(f"coalesce must be at least 0 and well under heartbeat_interval, "
                              f"got {coalesce}")
        self.min_reconnect = float(min_reconnect)
        self.max_reconnect = float(max_reconnect)
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        self.coalesce = float(coalesce)

        # Lock order: _lock, then _pipe_lock (start() takes both); never the other way round.
        self._lock = threading.Lock()  # guards _sinks, _stopped and the state below
        self._pipe_lock = threading.Lock()  # guards the wake-up pipe's descriptors
        self._changed = threading.Condition(self._lock)
        self._sinks: Dict[Sink, FrozenSet[str]] = {}
        self._stopped = False
        self._connected = False
        self._listening: FrozenSet[str] = frozenset()
        self._last_error: Optional[str] = None

        self._pid: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r = -1
        self._wake_w = -1
        self._conn: Any = None  # used by the thread alone
        _live_sources.add(self)

    # ----------------------------------------------------------------- public

    def add_sink(self, sink: Sink, channels: Iterable[str]) -> None:
        """Deliver notifications on ``channels`` to ``sink`` (subscribing happens on the thread)."""
        names = frozenset(self._validate_channel(c) for c in channels)
        with self._lock:
            self._sinks[sink] = names
        self._wake()

    def remove_sink(self, sink: Sink) -> None:
        """Stop delivering to ``sink``; channels nobody needs any more are unsubscribed."""
        with self._lock:
            self._sinks.pop(sink, None)
        self._wake()

    def start(self: _S) -> _S:
        """Start the thread in this process, if it is not running yet."""
        pid = os.getpid()
        if self._pid == pid and not self._stopped:
            return self
        with self._lock:
            if self._stopped:
                raise ListenerStopped(self._stopped_message)
            if self._pid == pid:
                return self
            self._reset_for_this_process()
            self._connected = False
            self._listening = frozenset()
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            with self._pipe_lock:
                self._wake_r, self._wake_w = wake_r, wake_w
            self._thread = threading.Thread(
                target=self._run, name=f"{self._thread_prefix}-{pid}", daemon=True
            )
            self._pid = pid
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the connections; waits up to ``timeout`` seconds."""
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
        self._on_stop()
        thread = self._thread if self._pid == os.getpid() else None
        self._wake()
        gather([thread], timeout)

    @property
    def connected(self) -> bool:
        """True while the connection is up and every channel wanted when it opened is subscribed.

        Channels added later are in :attr:`listening` once subscribed.
        """
        return self._connected

    @property
    def listening(self) -> FrozenSet[str]:
        """The channels subscribed to (LISTEN, SUBSCRIBE) on the current connection."""
        return self._listening

    def status(self) -> Dict[str, Any]:
        """A small dict for health checks and logs: connected, channels, error, and more."""
        return {
            "connected": self._connected,
            "channels": sorted(self._listening),
            **self._describe(),
            "error": None if self._connected else self._last_error,
        }

    @property
    def last_error(self) -> Optional[str]:
        """Why the last connection attempt failed or the last connection ended."""
        return self._last_error

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed to every wanted channel (starting the thread)."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._lock:
            while not (self._connected and self._wanted() <= self._listening):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._changed.wait(left)
            return True

    # ------------------------------------------------------------------ hooks

    def _validate_channel(self, channel: str) -> str:
        """Return ``channel`` if this source can subscribe to it, else raise InvalidChannel."""
        raise NotImplementedError

    def _describe(self) -> Dict[str, Any]:
        """What :meth:`status` reports besides connected, channels and error."""
        return {}

    def _reset_for_this_process(self) -> None:
        """Forget the connection state of a parent process (called under the lock by start())."""

    def _on_stop(self) -> None:
        """Release what other threads use, once stop() has marked the source stopped."""

    def _on_disconnected(self) -> None:
        """Forget what described the connection (called under the lock when it is gone)."""

    def _open(self) -> None:
        """Connect (into ``self._conn``), subscribe to every wanted channel and log that it is up.

        May raise :class:`Stopping`; raises one of :attr:`_connect_errors` when
        the server cannot be reached or does not answer.
        """
        raise NotImplementedError

    def _serve(self) -> None:
        """Read and hand on messages until the connection fails (or :class:`Stopping`)."""
        raise NotImplementedError

    def _close_conn(self) -> None:
        """Close ``self._conn`` if there is one, ignoring that it may be broken already."""
        raise NotImplementedError

    def _lost_reason(self, exc: BaseException) -> str:
        """One line saying why the connection was lost, given what _serve() raised."""
        return first_line(exc)

    def _log_cannot_connect(self, reason: str) -> None:
        self._log.warning("%s cannot connect: %s", self._what, reason)

    # --------------------------------------------------------------- internals

    def _wanted(self) -> FrozenSet[str]:
        return frozenset().union(*self._sinks.values()) if self._sinks else frozenset()

    def _wake(self) -> None:
        if self._pid != os.getpid():
            return
        # A non-blocking write of one byte: the lock only keeps the descriptor open meanwhile.
        with self._pipe_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, raising :class:`Stopping` as soon as stop() is called."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self._stopped:
                raise Stopping()
            if left <= 0:
                return
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ)
                if sel.select(left):
                    self._drain_wake()

    def _set_state(self, connected: bool, error: Optional[str] = None) -> None:
        _metrics.set_gauge("source_up", 1.0 if connected else 0.0, source=self._what)
        with self._lock:
            self._connected = connected
            if not connected:
                self._listening = frozenset()
                self._on_disconnected()
            if error is not None:
                self._last_error = error
            self._changed.notify_all()

    def _run(self) -> None:
        failures = 0
        missed: Optional[str] = None  # why notifications may have been lost, until resynced
        try:
            while True:
                self._sleep(self._backoff(failures))
                reason = self._step(self._open, self._connect_errors, first_line,
                                    self._log_cannot_connect)
                if reason is not None:
                    failures += 1
                    missed = missed or reason
                    continue
                failures = 0
                self._set_state(True)
                if missed is not None:
                    self._resync(f"{self._what} reconnected after: {missed}")
                missed = self._step(self._serve, self._serve_errors, self._lost_reason,
                                    self._log_lost, always_close=True)
        except Stopping:
            pass
        finally:
            self._close_conn()
            self._set_state(False)
            with self._pipe_lock:  # no _wake() may write to a closed (reused) descriptor
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)
            self._log.info("%s stopped", self._what)

    def _backoff(self, failures: int) -> float:
        """Seconds to wait before the next connection attempt (exponential, with jitter)."""
        if not failures:
            return 0.0
        delay = min(self.max_reconnect, self.min_reconnect * 2.0 ** (failures - 1))
        delay = min(self.max_reconnect, delay * random.uniform(1.0, 1.1))
        self._log.info("%s reconnecting in %.2fs", self._what, delay)
        return delay

    def _step(self, step: Callable[[], None], expected: Tuple[Type[BaseException], ...],
              describe: Callable[[BaseException], str], log: Callable[[str], None], *,
              always_close: bool = False) -> Optional[str]:
        """Run ``step`` on the thread; None if it returned, else one line saying why it failed.

        A failure (or, with ``always_close``, any end) closes the connection.
        """
        reason: Optional[str] = None
        try:
            step()
        except Stopping:
            raise
        except expected as exc:
            reason = describe(exc)
            log(reason)
        except Exception as exc:  # a bug must not end delivery for good: log, reconnect
            reason = first_line(exc)
            self._log.exception("%s failed; reconnecting", self._what)
        if reason is not None or always_close:
            _metrics.inc("source_reconnects", source=self._what)
            self._close_conn()
            self._set_state(False, reason)
        return reason

    def _log_lost(self, reason: str) -> None:
        self._log.warning("%s connection lost: %s", self._what, reason)

    def _deliver(self, batch: List[Notification]) -> None:
        """Hand ``batch`` to every sink, each getting the notifications on its channels,
        at most :data:`MAX_BATCH` at a time."""
        _metrics.set_gauge("source_last_message_timestamp_seconds", time.time(),
                           source=self._what)
        with self._lock:
            sinks = list(self._sinks.items())
        for sink, channels in sinks:
            mine = [n for n in batch if n.channel in channels]
            for start in range(0, len(mine), MAX_BATCH):
                try:
                    sink.on_notifications(mine[start:start + MAX_BATCH])
                except Exception:  # a broken sink must not stop the source
                    self._log.exception("notification handler %r failed", sink)

    def _resync(self, reason: str) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.on_resync(reason)
            except Exception:
                self._log.exception("resync handler %r failed", sink)
