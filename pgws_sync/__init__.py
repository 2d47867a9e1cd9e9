"""pgws_sync: PostgreSQL NOTIFY to browsers over WebSockets, for threaded WSGI apps."""

from ._core.assets import client_js, static_files
from ._core.connection import Connection
from ._core.endpoint import WebSocketEndpoint
from ._core.origin import origin_allowed
from ._formats import NOTIFY_PAYLOAD_LIMIT
from .errors import (
    BatcherStopped,
    CommandFailed,
    ConfigError,
    DatabaseUnreachable,
    InvalidChannel,
    InvalidPayload,
    JsonTextWarning,
    ListenerStopped,
    LogUnavailable,
    MessageTooLarge,
    NotifyFailed,
    PayloadTooLarge,
    PgwsError,
    ProtocolError,
    PublicationTooLarge,
    PublishFailed,
    RedisPublishFailed,
    Refused,
    TokenRefused,
    WriteFailed,
)
from .jwt.auth import Grant, JwtAuth
from .live.load import LiveLoad, load_live
from .live.watch import unwatch_table, watch_table
from .jwt.endpoint import JwtGateway
from .pgws.endpoint import PGWS, Pgws
from .pgws.notify import notify
from .pubsub.batching import Batcher
from .pubsub.endpoint import PubSub
from .pubsub.publication import DEFAULT_PUBSUB_CHANNEL
from .pubsub.publisher import Publisher, publish
from .push.endpoint import Push
from .push.messages import DEFAULT_PUSH_CHANNEL
from .runtime import shutdown
from .sources.base import Notification, Source
from .sources.log import DEFAULT_MAX_PAYLOAD, migrate
from .sources.log import publish as publish_durable
from .sources.postgres import Listener
from .sources.redis import RedisSource

__version__ = "0.2.0"

__all__ = [
    # endpoints, one per product
    "Pgws",
    "PubSub",
    "Push",
    "JwtGateway",
    "WebSocketEndpoint",
    "Connection",
    # sources
    "Listener",
    "RedisSource",
    "Source",
    "Notification",
    # publishing
    "notify",
    "publish",
    "Publisher",
    "publish_durable",
    "migrate",
    # live tables
    "watch_table",
    "unwatch_table",
    "load_live",
    "LiveLoad",
    "DEFAULT_MAX_PAYLOAD",
    "Batcher",
    "DEFAULT_PUBSUB_CHANNEL",
    "DEFAULT_PUSH_CHANNEL",
    "NOTIFY_PAYLOAD_LIMIT",
    # JWT
    "JwtAuth",
    "Grant",
    # helpers
    "origin_allowed",
    "static_files",
    "client_js",
    "shutdown",
    # errors
    "PgwsError",
    "ConfigError",
    "ListenerStopped",
    "InvalidChannel",
    "InvalidPayload",
    "PayloadTooLarge",
    "PublicationTooLarge",
    "MessageTooLarge",
    "ProtocolError",
    "Refused",
    "TokenRefused",
    "NotifyFailed",
    "PublishFailed",
    "WriteFailed",
    "RedisPublishFailed",
    "LogUnavailable",
    "BatcherStopped",
    "DatabaseUnreachable",
    "CommandFailed",
    # warnings
    "JsonTextWarning",
    # the name before 0.2, an alias of Pgws
    "PGWS",
]
