"""Endpoints fed by notification sources: start them, report their health, resync, detach."""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _metrics
from ._dsn import Dsn, libpq_dsn
from ._core.connection import Connection
from ._core.endpoint import WebSocketEndpoint
from ._core.health import (
    CANARY_SILENT,
    DATABASE_UNREACHABLE,
    NOT_LISTENING,
    REDIS_UNREACHABLE,
    SHUTTING_DOWN,
    SOURCE_UNREACHABLE,
    Health,
)
from ._formats import resync_frame
from .errors import ConfigError
from .sources.base import Notification, Sink, Source
from .sources.canary import Canary
from .sources.postgres import Listener, notification_queue_usage
from .sources.redis import RedisSource

#: Seconds between two samples of the database's figures by one worker.
SAMPLE_EVERY = 5.0


def listener_dsn(listener: Source, dsn: Optional[Dsn], who: str) -> str:
    """``dsn``, else the listener's: the database an endpoint sends its own NOTIFYs to."""
    if dsn is not None:
        return libpq_dsn(dsn)
    found = getattr(listener, "dsn", None)
    if not isinstance(found, str):
        raise ConfigError(f"{who} sends NOTIFYs: give dsn=... when its first argument is not "
                          f"a Listener")
    return found


def unreachable_reason(source: Source) -> str:
    """The public reason of a health check while ``source`` is not connected."""
    if isinstance(source, Listener):
        return DATABASE_UNREACHABLE
    if isinstance(source, RedisSource):
        return REDIS_UNREACHABLE
    return SOURCE_UNREACHABLE


class ListeningEndpoint(WebSocketEndpoint):
    """A WebSocket endpoint that ``listener`` (any :class:`Source`) feeds with ``channels``.

    It registers itself as the source's sink when constructed, so a subclass
    sets what :meth:`on_notifications` uses before calling this ``__init__``.
    Each request starts the sources in its process; the health check is ok
    while every source is connected and receives on its channels; the
    readiness check (``/readyz``) also needs a canary NOTIFY, sent by this
    worker every ``canary_interval`` seconds from the first readiness check on,
    to have come back. Both answer a short fixed reason when they fail; the sources'
    states and errors are the operator's detail (the log, and ``health_detail``).
    Other keyword options are those of :class:`WebSocketEndpoint`.
    """

    def __init__(self, listener: Source, channels: Iterable[str], *,
                 canary_interval: float = 5.0, **options: Any) -> None:
        if not isinstance(listener, Source):
            raise ConfigError(f"{type(self).__name__}(listener, ...): the first argument must be "
                              f"a Listener (or another source), not {type(listener).__name__}")
        super().__init__(**options)
        self.listener = listener
        self.canary_interval = canary_interval
        self._canary: Optional[Canary] = None  # made by the first readiness check
        self._sampled = -SAMPLE_EVERY  # when sample_database last asked the database
        self.listen_channels: Tuple[str, ...] = tuple(channels)
        #: Every (source, sink, channels, name) this endpoint is fed by; the listener first.
        self._feeds: List[Tuple[Source, Sink, Tuple[str, ...], str]] = []
        self.add_source(listener, self, self.listen_channels, name="listener")

    def add_source(self, source: Source, sink: Sink, channels: Iterable[str], *,
                   name: str) -> None:
        """Feed ``sink`` from ``channels`` of another source as well (e.g. a Redis source).

        The endpoint then starts it with the listener, is healthy only while it
        is connected too (reported under ``name``), and detaches from it on close.
        """
        names = tuple(channels)
        source.add_sink(sink, names)
        self._feeds.append((source, sink, names, name))

    # ---------------------------------------------------- source sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Called on the source's thread with what arrived together on the channels, in order."""
        raise NotImplementedError

    def on_resync(self, reason: str) -> None:
        """Called on a source's thread after a reconnect: tell each socket what it may have missed.

        Clients get what reconnected (``listener reconnected``), never the driver's words
        about why (hosts, roles, errors: those are logged by the source).
        """
        reason = public_reason(reason)
        frames: Dict[Tuple[str, ...], str] = {}
        sent = 0
        for conn in self.hub.connections():
            channels = self.resync_channels(conn)
            if channels is None:
                continue
            key = tuple(channels)
            if key not in frames:
                frames[key] = resync_frame(key, reason)
            conn.send(frames[key])
            sent += 1
        _metrics.inc("control_frames", sent, endpoint=self.label, event="resync")

    def resync_channels(self, conn: Connection) -> Optional[Sequence[str]]:
        """The channels a ``resync`` frame names for ``conn``; None: it gets none."""
        raise NotImplementedError

    # ---------------------------------------------------- endpoint hooks

    def prepare(self) -> None:
        for source, _sink, _channels, _name in self._feeds:
            source.start()

    def health(self) -> Health:
        """Ok while every source is connected and receives on its channels; the first
        reason found otherwise."""
        reason = SHUTTING_DOWN if self.closing else None
        detail: Dict[str, Any] = {}
        for source, _sink, channels, name in self._feeds:
            status = source.status()
            listening = status["connected"] and set(channels) <= source.listening
            if reason is None and not status["connected"] and status["error"]:
                reason = unreachable_reason(source)
            elif reason is None and not listening:
                reason = NOT_LISTENING  # starting: not connected yet, or no LISTEN yet
            detail[name] = "connected" if status["connected"] else "disconnected"
            if status["error"]:
                detail["error" if name == "listener" else name + "_error"] = status["error"]
        detail["sockets"] = len(self.hub)
        if self.closing:
            detail["closing"] = True
        return Health(reason is None, reason, detail)

    def sample_database(self) -> None:
        """Record ``pg_notification_queue_usage()``, at most every ``SAMPLE_EVERY`` seconds, from
        the worker that answers the scrape (so one worker at a time)."""
        dsn = getattr(self.listener, "dsn", None)
        now = time.monotonic()
        if not _metrics.enabled() or not isinstance(dsn, str) or now - self._sampled < SAMPLE_EVERY:
            return
        self._sampled = now
        usage = notification_queue_usage(dsn)
        if usage is not None:
            _metrics.set_gauge("notification_queue_usage", usage)
        self.sample_more()

    def sample_more(self) -> None:
        """Record more database-side figures, as :meth:`sample_database` does (a hook)."""

    def readiness(self) -> Health:
        """Ready: healthy, and a canary NOTIFY this worker sent itself came back recently."""
        health = self.health()
        if not health.ok:
            return health
        canary = self._start_canary()
        if canary is None:
            return health
        ready, why = canary.readiness()
        if ready:
            return health
        return Health(False, CANARY_SILENT, {**health.detail, "canary": why})

    def _start_canary(self) -> Optional[Canary]:
        """This endpoint's canary, made and started on first use (None: its source has no DSN)."""
        dsn = getattr(self.listener, "dsn", None)
        if not isinstance(dsn, str):
            return None
        if self._canary is None:
            self._canary = Canary(dsn, interval=self.canary_interval)
            self.listener.add_sink(self._canary, [self._canary.channel])
        self._canary.start()
        return self._canary

    def on_closed(self) -> None:
        for source, sink, _channels, _name in self._feeds:
            source.remove_sink(sink)
        if self._canary is not None:
            self.listener.remove_sink(self._canary)
            self._canary.stop()


def public_reason(reason: str) -> str:
    """What a ``resync`` frame may say of a source's reconnect: its first part only
    (``listener reconnected after: <the driver's error>`` -> ``listener reconnected``)."""
    return reason.split(" after:", 1)[0]
