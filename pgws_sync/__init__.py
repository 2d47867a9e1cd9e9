"""pgws_sync: PostgreSQL NOTIFY to browsers over WebSockets, for threaded WSGI apps."""

from .batching import Batcher, BatcherStopped
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
from .protocol import ProtocolError
from .publication import DEFAULT_PUBSUB_CHANNEL
from .publisher import PublishFailed, Publisher, publish
from .pubsub import PubSub
from .push import Push
from .push_messages import DEFAULT_PUSH_CHANNEL
from .redis_source import RedisPublishFailed, RedisSource

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BatcherStopped",
    "ConfigError",
    "Connection",
    "DEFAULT_PUBSUB_CHANNEL",
    "DEFAULT_PUSH_CHANNEL",
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
    "ProtocolError",
    "PubSub",
    "Push",
    "PublishFailed",
    "Publisher",
    "RedisPublishFailed",
    "RedisSource",
    "Refused",
    "TokenRefused",
    "WebSocketEndpoint",
    "WriteFailed",
    "notify",
    "origin_allowed",
    "publish",
    "shutdown",
    "static_files",
]
