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
from .jwt_auth import Grant, JwtAuth, TokenRefused
from .jwt_gateway import JwtGateway, WriteFailed, static_files
from .listener import Listener
from .messages import NOTIFY_PAYLOAD_LIMIT, Notification
from .notify import notify
from .pgws import PGWS, shutdown

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Connection",
    "Grant",
    "InvalidChannel",
    "InvalidPayload",
    "JwtAuth",
    "JwtGateway",
    "Listener",
    "ListenerStopped",
    "NOTIFY_PAYLOAD_LIMIT",
    "Notification",
    "PGWS",
    "PayloadTooLarge",
    "PgwsError",
    "Refused",
    "TokenRefused",
    "WebSocketEndpoint",
    "WriteFailed",
    "notify",
    "origin_allowed",
    "shutdown",
    "static_files",
]
