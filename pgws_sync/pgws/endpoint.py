"""Pgws: NOTIFYs on a few channels delivered to audiences, as pgws (Go) does."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

from werkzeug.wrappers import Request

from .._core.connection import Connection
from .._core.endpoint import DEFAULT_AUDIENCE
from .._formats import new_message_id, validate_channel
from .._listening import ListeningEndpoint
from ..errors import ConfigError, InvalidPayload
from ..sources.base import Notification, Source
from .messages import parse_pgws, pgws_frame

logger = logging.getLogger(__name__)


def default_audience(request: Request) -> List[str]:
    """Every connection is in the audience ``default``."""
    return [DEFAULT_AUDIENCE]


class Pgws(ListeningEndpoint):
    """A WebSocket endpoint delivering NOTIFYs on ``channels`` in pgws format.

    A notification ``audience,{json}`` on one of the channels reaches every
    socket of that audience as ``{"payload": {json}, "channel": ..., "id": ...}``.
    Set :attr:`get_audience` to decide a connection's audiences from its
    request. Keyword options are those of :class:`WebSocketEndpoint`.
    """

    def __init__(self, listener: Source, *channels: str, **options: Any) -> None:
        if not channels:
            raise ConfigError("Pgws needs at least one channel to listen on")
        names = tuple(dict.fromkeys(validate_channel(c) for c in channels))
        self.channels: Tuple[str, ...] = names
        #: ``request -> list of audiences``; the default puts everyone in ``default``.
        self.get_audience: Callable[[Request], Sequence[str]] = default_audience
        super().__init__(listener, names, **options)

    def connection_audiences(self, request: Request) -> Sequence[str]:
        audiences = self.get_audience(request)
        if isinstance(audiences, str) or not all(isinstance(a, str) for a in audiences):
            raise ConfigError(f"get_audience must return a list of strings, got {audiences!r}")
        return list(audiences)

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Parse each notification once, give it an id, build its frame, fan it out."""
        messages = []
        for note in batch:
            try:
                audience, body = parse_pgws(note.payload)
            except InvalidPayload as exc:
                logger.warning("dropped a notification on channel %r: %s", note.channel, exc)
                continue
            messages.append((audience, pgws_frame(note.channel, body, new_message_id())))
        self.hub.fan_out(messages)

    def resync_channels(self, conn: Connection) -> Optional[Sequence[str]]:
        return self.channels


#: The name pgws_sync used before 0.2 (kept so existing code keeps working).
PGWS = Pgws
