"""pgws_sync: PostgreSQL NOTIFY to browsers over WebSockets, for threaded WSGI apps."""

from .connection import Connection
from .endpoint import WebSocketEndpoint, origin_allowed
from .errors import (
    ConfigError,
    InvalidChannel,
    InvalidPayload,
    ListenerStopped,
    PayloadTooLarge,
    PgwsError,
    Refused,
)
from .listener import Listener
from .messages import NOTIFY_PAYLOAD_LIMIT, Notification
from .notify import notify
from .pgws import PGWS, shutdown

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Connection",
    "InvalidChannel",
    "InvalidPayload",
    "Listener",
    "ListenerStopped",
    "NOTIFY_PAYLOAD_LIMIT",
    "Notification",
    "PGWS",
    "PayloadTooLarge",
    "PgwsError",
    "Refused",
    "WebSocketEndpoint",
    "notify",
    "origin_allowed",
    "shutdown",
]
