"""Publishing side: send publications as NOTIFY, in the caller's transaction or from a small pool."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .._dsn import Dsn, libpq_dsn
from .._formats import json_message, new_message_id, utc_now, validate_channel
from .._statement import run
from ..errors import InvalidPayload, PublishFailed
from ..sources import log
from ..sources.notify_pool import DEFAULT_MAX_QUEUE_USAGE, NotifyPool
from .publication import DEFAULT_PUBSUB_CHANNEL, format_publication, message_body


def build_publication(
    channel: Optional[str],
    message: Any,
    *,
    type: str = "json",
    json_text: bool = False,
    to: Optional[str] = None,
    message_id: Optional[str] = None,
    reply_to: Any = None,
) -> str:
    """The NOTIFY payload publishing ``message`` would send (checks type and size), stamped
    with the time of publishing."""
    if json_text and type != "json":
        raise InvalidPayload(f"json_text=True is for json messages, not {type!r} ones")
    return format_publication(channel, message_body(json_message(message, json_text), type),
                              type=type, target=to,
                              message_id=message_id or new_message_id(), reply_to=reply_to,
                              time=utc_now())


def publish(
    conn: Any,
    channel: Optional[str],
    message: Any,
    *,
    type: str = "json",
    json_text: bool = False,
    to: Optional[str] = None,
    pubsub_channel: str = DEFAULT_PUBSUB_CHANNEL,
    message_id: Optional[str] = None,
    reply_to: Any = None,
) -> str:
    """Publish ``message`` to ``channel``'s subscribers in every process, inside ``conn``'s
    transaction (it leaves at commit; at once in autocommit). Returns the message id.

    ``conn`` is a psycopg2 or psycopg 3 connection, or a SQLAlchemy ``Connection`` or
    ``Session`` (``db.session``: its current transaction). ``type`` ``json``: ``message``
    is a Python value, sent as JSON (a ``str`` is a JSON string; JSON text is sent as
    written with ``json_text=True``); ``text``: a str; ``binary``: bytes. With ``to`` (a connection id) and ``channel`` None it reaches only
    that connection, wherever it is connected. Raises
    :class:`~pgws_sync.PayloadTooLarge` before sending anything PostgreSQL would
    refuse and :class:`~pgws_sync.InvalidPayload` for a message that does not
    fit its type. ``message_id`` (default: a fresh one) is the id every recipient sees;
    ``reply_to`` (a client's message id) comes with it.
    """
    validate_channel(pubsub_channel)
    message_id = message_id or new_message_id()
    text = build_publication(channel, message, type=type, json_text=json_text, to=to,
                             message_id=message_id, reply_to=reply_to)
    run(conn, "SELECT pg_notify(%s, %s)", (pubsub_channel, text))
    return message_id


class Publisher:
    """Sends publications from up to ``pool_size`` autocommit connections of this process.

    Connections are opened on demand (after any fork: each process has its
    own), reused, and replaced when they break; never the listener's.
    ``timeout`` bounds both connecting and waiting for a free connection.
    While PostgreSQL's notification queue is fuller than ``max_queue_usage``
    (0 to 1; None: no check) publishing raises :class:`PublishFailed` with
    ``cause`` ``queue_full`` instead of letting commits fail later.
    """

    def __init__(
        self,
        dsn: Dsn = "",
        *,
        pubsub_channel: str = DEFAULT_PUBSUB_CHANNEL,
        pool_size: int = 4,
        timeout: float = 10.0,
        application_name: str = "pgws_sync publisher",
        max_queue_usage: Optional[float] = DEFAULT_MAX_QUEUE_USAGE,
    ) -> None:
        self._pool = NotifyPool(libpq_dsn(dsn or ""), size=pool_size, wait_timeout=timeout,
                                connect_timeout=timeout, application_name=application_name,
                                size_name="pool_size", error=PublishFailed, kind="publish",
                                max_queue_usage=max_queue_usage)
        self.dsn = libpq_dsn(dsn or "")
        self.pubsub_channel = validate_channel(pubsub_channel)
        self.pool_size = pool_size
        self.timeout = timeout
        self.application_name = application_name

    def publish(self, channel: Optional[str], message: Any, *, type: str = "json",
                json_text: bool = False, to: Optional[str] = None,
                message_id: Optional[str] = None, reply_to: Any = None) -> str:
        """Publish ``message`` (see :func:`publish`) at once; returns the message id.

        Raises :class:`PublishFailed` when the database cannot be reached or
        refuses the NOTIFY (after one retry on a fresh connection).
        """
        message_id = message_id or new_message_id()
        self.notify(build_publication(channel, message, type=type, json_text=json_text, to=to,
                                      message_id=message_id, reply_to=reply_to))
        return message_id

    def append(self, schema: str, args: Sequence[Any]) -> int:
        """Append one message to the durable log (``args``: :func:`log.publish_args`'s);
        returns its offset. Raises :class:`PublishFailed` as :meth:`publish` does."""
        return int(self._pool.select(log.publish_call(schema), args, what="publishing"))

    def notify(self, text: str, *, channel: Optional[str] = None) -> None:
        """Send one already-built publication (on ``channel``, default the pub/sub channel)."""
        self._pool.notify(self.pubsub_channel if channel is None else channel, [text])

    def close(self) -> None:
        """Close this process's connections; later publishing raises :class:`PublishFailed`."""
        self._pool.close()
