"""pgws_sync: PostgreSQL NOTIFY to browsers over WebSockets, for threaded WSGI apps."""

from typing import TYPE_CHECKING, Any, Dict, Tuple

from ._core.assets import client_js, static_files
from ._core.connection import Connection
from ._core.endpoint import WebSocketEndpoint
from .errors import (
    ConfigError,
    InvalidChannel,
    InvalidPayload,
    LogUnavailable,
    PayloadTooLarge,
    PgwsError,
    ProtocolError,
    PublishFailed,
    Refused,
)
from .jwt.auth import JwtAuth
from .live.load import load_live
from .live.watch import unwatch_table, watch_table
from .jwt.endpoint import JwtGateway
from .pgws.endpoint import Pgws
from .pgws.notify import notify
from .pubsub.endpoint import PubSub
from .pubsub.publisher import publish
from .push.endpoint import Push
from .runtime import shutdown
from .sources.log import migrate
from .sources.log import publish as publish_durable
from .sources.postgres import Listener
from .sources.redis import RedisSource

__version__ = "0.2.0"

#: The front door: what ordinary work needs. Everything else lives in its module
#: (errors in :mod:`pgws_sync.errors`, the rest in the product folders).
__all__ = [
    # endpoints, one per product, and what their hooks are given
    "Pgws",
    "PubSub",
    "Push",
    "JwtGateway",
    "WebSocketEndpoint",
    "Connection",
    # sources
    "Listener",
    "RedisSource",
    # publishing, one function per mode, and the durable log's setup
    "notify",
    "publish",
    "publish_durable",
    "migrate",
    # live tables: a table watched into the log, a page's rows at a log position
    "watch_table",
    "unwatch_table",
    "load_live",
    # JWT, helpers
    "JwtAuth",
    "static_files",
    "client_js",
    "shutdown",
    # errors: the root, and those users raise or catch
    "PgwsError",
    "ConfigError",
    "InvalidChannel",
    "InvalidPayload",
    "PayloadTooLarge",
    "PublishFailed",
    "LogUnavailable",
    "Refused",
    "ProtocolError",
]

#: Names importable from ``pgws_sync`` before 0.3, with a DeprecationWarning until 0.4:
#: name -> (the module that keeps it, what to use instead or "").
_MOVED: Dict[str, Tuple[str, str]] = {
    "Source": ("pgws_sync.sources.base", ""),
    "Notification": ("pgws_sync.sources.base", ""),
    "Publisher": ("pgws_sync.pubsub.publisher", ""),
    "Batcher": ("pgws_sync.pubsub.batching", ""),
    "DEFAULT_PUBSUB_CHANNEL": ("pgws_sync.pubsub.publication", ""),
    "DEFAULT_PUSH_CHANNEL": ("pgws_sync.push.messages", ""),
    "DEFAULT_MAX_PAYLOAD": ("pgws_sync.sources.log", ""),
    "Grant": ("pgws_sync.jwt.auth", ""),
    "NOTIFY_PAYLOAD_LIMIT": ("pgws_sync._formats", "PayloadTooLarge.limit says it"),
    "origin_allowed": ("pgws_sync._core.origin", "the endpoints' allowed_origins option"),
    "PGWS": ("pgws_sync.pgws.endpoint", "pgws_sync.Pgws"),
    "BatcherStopped": ("pgws_sync.errors", ""),
    "CommandFailed": ("pgws_sync.errors", ""),
    "DatabaseUnreachable": ("pgws_sync.errors", ""),
    "JsonTextWarning": ("pgws_sync.errors", ""),
    "ListenerStopped": ("pgws_sync.errors", ""),
    "MessageTooLarge": ("pgws_sync.errors", ""),
    "NotifyFailed": ("pgws_sync.errors", ""),
    "PublicationTooLarge": ("pgws_sync.errors", ""),
    "RedisPublishFailed": ("pgws_sync.errors", ""),
    "TokenRefused": ("pgws_sync.errors", ""),
    "WriteFailed": ("pgws_sync.errors", ""),
}


def __getattr__(name: str) -> Any:
    """The names that left the front door in 0.3: still there, with a DeprecationWarning."""
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'pgws_sync' has no attribute {name!r}")
    import importlib
    import warnings

    module, instead = moved
    where = instead if instead else f"{module}.{name}"
    warnings.warn(f"pgws_sync.{name} is deprecated and leaves pgws_sync in 0.4: use {where}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # type checkers see the old names too (they still work)
    from ._core.origin import origin_allowed as origin_allowed
    from ._formats import NOTIFY_PAYLOAD_LIMIT as NOTIFY_PAYLOAD_LIMIT
    from .errors import (BatcherStopped as BatcherStopped, CommandFailed as CommandFailed,
                         DatabaseUnreachable as DatabaseUnreachable,
                         JsonTextWarning as JsonTextWarning, ListenerStopped as ListenerStopped,
                         MessageTooLarge as MessageTooLarge, NotifyFailed as NotifyFailed,
                         PublicationTooLarge as PublicationTooLarge,
                         RedisPublishFailed as RedisPublishFailed, TokenRefused as TokenRefused,
                         WriteFailed as WriteFailed)
    from .jwt.auth import Grant as Grant
    from .pgws.endpoint import PGWS as PGWS
    from .pubsub.batching import Batcher as Batcher
    from .pubsub.publication import DEFAULT_PUBSUB_CHANNEL as DEFAULT_PUBSUB_CHANNEL
    from .pubsub.publisher import Publisher as Publisher
    from .push.messages import DEFAULT_PUSH_CHANNEL as DEFAULT_PUSH_CHANNEL
    from .sources.base import Notification as Notification
    from .sources.base import Source as Source
    from .sources.log import DEFAULT_MAX_PAYLOAD as DEFAULT_MAX_PAYLOAD
