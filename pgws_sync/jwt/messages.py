"""postgres-websockets message formats: routing listen-channel payloads, building NOTIFYs (pure)."""

from __future__ import annotations

from typing import Any, Mapping

from .._formats import check_notify_size, dumps, loads
from ..errors import PayloadTooLarge

#: The NOTIFY channel postgres-websockets listens on unless told otherwise.
DEFAULT_LISTEN_CHANNEL = "postgres-websockets-listener"

#: ``event`` values of the messages the gateway NOTIFYs.
WEBSOCKET_MESSAGE = "WebsocketMessage"
CONNECTION_OPEN = "ConnectionOpen"
CONNECTION_CLOSE = "ConnectionClose"


def target_channel(payload: str, listen_channel: str) -> str:
    """The channel whose readers get ``payload``, a NOTIFY on the listen channel.

    A JSON object with a string ``channel`` goes to that channel; anything
    else goes to the channel named like the listen channel (postgres-websockets).
    """
    try:
        value = loads(payload)
    except ValueError:
        return listen_channel
    if isinstance(value, dict):
        channel = value.get("channel")
        if isinstance(channel, str):
            return channel
    return listen_channel


def event_payload(event: str, channel: str, payload: str, claims: Mapping[str, Any],
                  delivered_at: float) -> str:
    """The NOTIFY payload postgres-websockets sends for a browser message or a meta event.

    ``{"event":..,"channel":..,"payload":..,"claims":{..,"message_delivered_at":..}}``,
    compact, non-ASCII kept as UTF-8. Raises :class:`PayloadTooLarge` when it
    would reach PostgreSQL's 8000-byte limit.
    """
    body = {
        "event": event,
        "channel": channel,
        "payload": payload,
        "claims": {**claims, "message_delivered_at": delivered_at},
    }
    return check_notify_size(dumps(body, compact=True), channel)


def too_large_reason(exc: PayloadTooLarge) -> str:
    """A one-line reason for an error frame about an oversized message."""
    return (f"message too large: its NOTIFY would be {exc.size} bytes and PostgreSQL accepts "
            f"at most {exc.limit - 1} (the claims count too); send less")
