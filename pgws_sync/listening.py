"""Endpoints fed by a notification source: start it, report its health, detach from it."""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, Iterable, List, Protocol, Sequence, Tuple

from .endpoint import WebSocketEndpoint
from .listener import Sink
from .messages import Notification


class Source(Protocol):
    """What feeds a :class:`ListeningEndpoint` (a :class:`~pgws_sync.Listener` is one)."""

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


class ListeningEndpoint(WebSocketEndpoint):
    """A WebSocket endpoint that ``listener`` feeds with what arrives on ``channels``.

    It registers itself as the listener's sink when constructed, so a
    subclass sets what its :meth:`on_notifications` and :meth:`on_resync`
    use before calling this ``__init__``. Each request starts the listener
    in its process; the health check is ok while the listener is connected
    and receives on every channel; :meth:`close` detaches the endpoint.
    Keyword options are those of :class:`WebSocketEndpoint`.
    """

    def __init__(self, listener: Source, channels: Iterable[str], **options: Any) -> None:
        super().__init__(**options)
        self.listener = listener
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

    # ---------------------------------------------------- listener sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Called on the listener thread with what arrived together on the channels, in order."""
        raise NotImplementedError

    def on_resync(self, reason: str) -> None:
        """Called on the listener thread after a reconnect: notifications may have been lost."""
        raise NotImplementedError

    # ---------------------------------------------------- endpoint hooks

    def prepare(self) -> None:
        for source, _sink, _channels, _name in self._feeds:
            source.start()

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        ok = not self.closing
        body: Dict[str, Any] = {}
        for source, _sink, channels, name in self._feeds:
            status = source.status()
            ok = ok and status["connected"] and set(channels) <= source.listening
            body[name] = "connected" if status["connected"] else "disconnected"
            if status["error"]:
                body["error" if name == "listener" else name + "_error"] = status["error"]
        body["sockets"] = len(self.hub)
        if self.closing:
            body["closing"] = True
        return ok, body

    def on_closed(self) -> None:
        for source, sink, _channels, _name in self._feeds:
            source.remove_sink(sink)
