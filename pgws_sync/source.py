"""What every notification source shares: its sinks, one thread per process, reconnecting, delivery."""

from __future__ import annotations

import logging
import os
import random
import selectors
import threading
import time
from typing import (
    Any, Dict, FrozenSet, Iterable, List, Optional, Protocol, Sequence, Tuple, Type, TypeVar,
)

from .errors import ConfigError, ListenerStopped, first_line
from .messages import Notification

_S = TypeVar("_S", bound="SourceThread")

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


class Stopping(Exception):
    """Raised inside a source's thread when stop() was called."""


class NoAnswer(Exception):
    """The server did not answer in time."""


class SourceThread:
    """The machinery a :class:`~pgws_sync.Listener` and a :class:`~pgws_sync.RedisSource` share.

    It keeps the sinks and the channels each wants, starts one named daemon
    thread per process (on first use, so a process forked from one that
    already started gets its own), wakes that thread through a pipe when the
    sinks change or :meth:`stop` is called, and runs the loop on it: open a
    connection, serve it until it fails, then reconnect with exponential
    backoff (and jitter) between ``min_reconnect`` and ``max_reconnect``
    seconds, telling every sink to resync after a connection was lost or
    could not be made. It also hands batches on to the sinks that want them.

    A subclass supplies the connection through hooks. On the thread:
    :meth:`_open` (connect, subscribe to what the sinks want, log that it is
    up), :meth:`_serve` (read and hand on until the connection fails),
    :meth:`_close_conn`, :meth:`_lost_reason`, :meth:`_log_cannot_connect`,
    and :meth:`_on_disconnected` (under the lock). On the caller's thread:
    :meth:`_validate_channel` (add_sink), :meth:`_reset_for_this_process`
    (start, under the lock) and :meth:`_on_stop` (stop). The class attributes
    below name the thread and the log lines, and say which exceptions mean
    connection trouble rather than a bug.
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
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._log.warning("%s thread %s did not stop within %.1fs",
                                  self._what, thread.name, timeout)

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
        with self._lock:
            self._connected = connected
            if not connected:
                self._listening = frozenset()
                self._on_disconnected()
            if error is not None:
                self._last_error = error
            self._changed.notify_all()

    def _run(self) -> None:
        log = self._log
        failures = 0
        missed_reason: Optional[str] = None
        first = True
        try:
            while not self._stopped:
                if not first:
                    delay = 0.0
                    if failures:
                        delay = min(self.max_reconnect, self.min_reconnect * 2 ** (failures - 1))
                        delay = min(self.max_reconnect, delay * random.uniform(1.0, 1.1))
                        log.info("%s reconnecting in %.2fs", self._what, delay)
                    self._sleep(delay)
                first = False
                try:
                    self._open()
                except Stopping:
                    raise
                except self._connect_errors as exc:
                    failures += 1
                    reason = first_line(exc)
                    missed_reason = missed_reason or reason
                    self._log_cannot_connect(reason)
                    self._close_conn()
                    self._set_state(False, reason)
                    continue
                except Exception as exc:  # a bug must not end delivery for good: log, retry
                    failures += 1
                    missed_reason = first_line(exc)
                    log.exception("%s failed; reconnecting", self._what)
                    self._close_conn()
                    self._set_state(False, missed_reason)
                    continue
                failures = 0
                self._set_state(True)
                if missed_reason is not None:
                    self._resync(f"{self._what} reconnected after: {missed_reason}")
                    missed_reason = None
                try:
                    self._serve()
                except Stopping:
                    raise
                except self._serve_errors as exc:
                    missed_reason = self._lost_reason(exc)
                    log.warning("%s connection lost: %s", self._what, missed_reason)
                except Exception as exc:  # a bug must not end delivery for good: log, reconnect
                    missed_reason = first_line(exc)
                    log.exception("%s failed; reconnecting", self._what)
                finally:
                    self._close_conn()
                    self._set_state(False, missed_reason)
        except Stopping:
            pass
        finally:
            self._close_conn()
            self._set_state(False)
            with self._pipe_lock:  # no _wake() may write to a closed (reused) descriptor
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)
            log.info("%s stopped", self._what)

    def _deliver(self, batch: List[Notification]) -> None:
        """Hand ``batch`` to every sink, each getting the notifications on its channels,
        at most :data:`MAX_BATCH` at a time."""
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
