"""PGWS: wires a Listener to a Hub behind a WebSocket endpoint, with pgws semantics."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Sequence, Tuple

from werkzeug.wrappers import Request

from .channels import validate_channel
from .endpoint import live_endpoints
from .errors import ConfigError, InvalidPayload
from .listener import Listener, live_listeners
from .listening import ListeningEndpoint
from .reader import stop_reader
from .redis_source import live_sources
from .messages import (
    DEFAULT_AUDIENCE,
    Notification,
    message_frame,
    new_message_id,
    parse_pgws,
    resync_frame,
)

logger = logging.getLogger(__name__)


def default_audience(request: Request) -> List[str]:
    """Every connection is in the audience ``default``."""
    return [DEFAULT_AUDIENCE]


class PGWS(ListeningEndpoint):
    """A WebSocket endpoint delivering NOTIFYs on ``channels`` in pgws format.

    A notification ``audience,{json}`` on one of the channels reaches every
    socket of that audience as ``{"payload": {json}, "channel": ..., "id": ...}``.
    Set :attr:`get_audience` to decide a connection's audiences from its
    request (called once per connection, before the upgrade).
    Keyword options are those of :class:`WebSocketEndpoint`.
    """

    def __init__(self, listener: Listener, *channels: str, **options: Any) -> None:
        if not isinstance(listener, Listener):
            raise ConfigError("PGWS(listener, *channels): the first argument must be a Listener")
        if not channels:
            raise ConfigError("PGWS needs at least one channel to listen on")
        names = tuple(dict.fromkeys(validate_channel(c) for c in channels))
        self.channels: Tuple[str, ...] = names
        #: ``request -> list of audiences``; the default puts everyone in ``default``.
        self.get_audience: Callable[[Request], Sequence[str]] = default_audience
        super().__init__(listener, names, **options)

    # ---------------------------------------------------- endpoint hooks

    def connection_audiences(self, request: Request) -> Sequence[str]:
        audiences = self.get_audience(request)
        if isinstance(audiences, str) or not all(isinstance(a, str) for a in audiences):
            raise ConfigError(
                f"get_audience must return a list of strings, got {audiences!r}"
            )
        return list(audiences)

    # ---------------------------------------------------- listener sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Parse each notification once, give it an id, build its frame, fan it out."""
        messages = []
        for note in batch:
            try:
                audience, body = parse_pgws(note.payload)
            except InvalidPayload as exc:
                logger.warning("dropped a notification on channel %r: %s", note.channel, exc)
                continue
            messages.append((audience, message_frame(note.channel, body, new_message_id())))
        self.hub.fan_out(messages)

    def on_resync(self, reason: str) -> None:
        """Tell every socket that notifications may have been lost."""
        self.hub.broadcast(resync_frame(self.channels, reason))


def shutdown(timeout: float = 5.0) -> None:
    """Close every endpoint of this process (1001), stop every listener, Redis source and
    the shared reader.

    This is what the gunicorn hook runs on SIGTERM.
    """
    for endpoint in live_endpoints():
        endpoint.close(timeout)
    for listener in live_listeners():
        listener.stop(timeout)
    for source in live_sources():
        source.stop(timeout)
    stop_reader(timeout)
