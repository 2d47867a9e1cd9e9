"""The publish format (docs/protocol.md): one JSON object per NOTIFY, one table per message type."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

from .._core.wire import Frame
from .._formats import (
    check_json,
    check_notify_size,
    json_body,
    json_fields,
    message_frame,
    name_problem,
    preview,
    strict_problem,
    text_body,
)
from ..errors import InvalidChannel, InvalidPayload, PublicationTooLarge
from .protocol import text_message_frame

#: The PostgreSQL channel publications travel on unless the endpoint is told otherwise.
DEFAULT_PUBSUB_CHANNEL = "pgws_sync"

Body = Union[str, bytes]


class BatchField(NamedTuple):
    """A publication's ``batch`` object: an item of a batch, or a marker that closes or cancels one."""

    key: str
    #: An item's batch name (the ``name`` of the message the batch becomes).
    name: Optional[str] = None
    #: Seconds the batch an item opens stays open.
    window: float = 0.0
    #: A close marker: the id of the item that opened the batch it closes.
    close: Optional[str] = None
    #: A cancel marker: the open batch is discarded.
    cancel: bool = False

    @property
    def is_marker(self) -> bool:
        return self.close is not None or self.cancel


class Publication(NamedTuple):
    """One published message as read back from its NOTIFY."""

    #: The pub/sub channel, or None for a message to one connection.
    channel: Optional[str]
    type: str
    #: ``json``: the JSON text as written; ``text``: the string; ``binary``: the bytes.
    body: Body
    #: The connection id it is meant for, or None for every subscriber of ``channel``.
    target: Optional[str] = None
    id: Optional[str] = None
    #: Set on the items and markers of a batch (:meth:`PubSub.publish_batched`).
    batch: Optional[BatchField] = None
    #: What the message answers: a client's message id (a string or a number), or None.
    reply_to: Any = None
    #: When it was published (RFC 3339, UTC), if the publisher said.
    time: Optional[str] = None


class _Type(NamedTuple):
    """How one message type travels: each step raises :class:`InvalidPayload` on a misfit."""

    #: What a caller publishes -> the body.
    body: Callable[[Any], Body]
    #: The body -> the ``payload`` value's JSON text in the NOTIFY.
    payload: Callable[[Body], str]
    #: The ``payload`` read back (decoded value, text as written) -> the body.
    read: Callable[[Any, str], Body]
    #: (channel, body, message id, extra fields) -> the frame subscribers receive.
    frame: Callable[[Optional[str], Body, str, Dict[str, Any]], Frame]


def _type_name(value: Any) -> str:
    return type(value).__name__


# -------------------------------------------------------------------- json


def _json_payload(body: Body) -> str:
    if not isinstance(body, str):
        raise InvalidPayload("a json body must be JSON text")
    try:
        return check_json(body)
    except ValueError as exc:
        raise InvalidPayload(f"invalid JSON payload: {exc}", preview(body.strip())) from None


# -------------------------------------------------------------------- text


def _text_payload(body: Body) -> str:
    if not isinstance(body, str):
        raise InvalidPayload("a text body must be a str")
    return json.dumps(body, ensure_ascii=False)


def _text_read(value: Any, raw: str) -> Body:
    if not isinstance(value, str):
        raise InvalidPayload("a text message's payload must be a string")
    if strict_problem(value) is not None:
        raise InvalidPayload("a text message's payload contains a lone surrogate")
    return value


# ------------------------------------------------------------------ binary


def _binary_body(message: Any) -> Body:
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise InvalidPayload(f"a binary message must be bytes, not {_type_name(message)}")
    return bytes(message)


def _binary_payload(body: Body) -> str:
    if not isinstance(body, bytes):
        raise InvalidPayload("a binary body must be bytes")
    return '"' + base64.b64encode(body).decode("ascii") + '"'


def _binary_read(value: Any, raw: str) -> Body:
    if not isinstance(value, str):
        raise InvalidPayload("a binary message's payload must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPayload("a binary message's payload is not valid base64") from None


def _json_read(value: Any, raw: str) -> Body:
    problem = strict_problem(value)
    if problem is not None:
        raise InvalidPayload(f"the payload is not strict JSON: {problem}")
    return raw


TYPES: Dict[str, _Type] = {
    "json": _Type(json_body, _json_payload, _json_read,
                  lambda channel, body, mid, extra: message_frame(channel, str(body), mid,
                                                                  extra=extra)),
    "text": _Type(text_body, _text_payload, _text_read,
                  lambda channel, body, mid, extra: text_message_frame(channel, str(body), mid,
                                                                       extra)),
    "binary": _Type(_binary_body, _binary_payload, _binary_read,
                    lambda channel, body, mid, extra: body),  # a binary frame has no envelope
}

#: Message types: JSON values, text, and bytes (binary WebSocket frames).
MESSAGE_TYPES = tuple(TYPES)


def message_type(name: Any) -> _Type:
    """The table of message type ``name``; :class:`InvalidPayload` for an unknown one."""
    kind = TYPES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise InvalidPayload(f"unknown message type {name!r} (expected json, text or binary)")
    return kind


def message_body(message: Any, type: str = "json") -> Body:
    """Turn what a caller publishes into a publication body, checking it fits the type.

    ``json``: any JSON-serialisable value (a ``str`` is a JSON string);
    ``text``: a ``str``; ``binary``: ``bytes``-like.
    """
    return message_type(type).body(message)


def channel_name(channel: Any) -> str:
    """``channel`` if it may name a pub/sub channel, else raise :class:`InvalidChannel` (the
    server-side check; a client's frame gets :func:`~.protocol.check_channel`'s error)."""
    problem = name_problem(channel)
    if problem is not None:
        raise InvalidChannel(channel, problem)
    return channel  # type: ignore[no-any-return]


def format_publication(
    channel: Optional[str],
    body: Body,
    *,
    type: str = "json",
    target: Optional[str] = None,
    message_id: Optional[str] = None,
    batch: Optional[BatchField] = None,
    reply_to: Any = None,
    time: Optional[str] = None,
) -> str:
    """Build the NOTIFY payload for one message and check PostgreSQL's size limit.

    ``body`` is JSON text for ``json`` (inserted as written), a ``str`` for
    ``text``, ``bytes`` for ``binary``. Raises :class:`InvalidPayload` for a
    body that does not match its type, :class:`InvalidChannel` for a bad
    channel and :class:`PublicationTooLarge` when the NOTIFY would reach 8000 bytes.
    """
    if channel is None and target is None:
        raise InvalidPayload("a message needs a channel or a target connection")
    if channel is not None:
        channel_name(channel)
    raw = message_type(type).payload(body)
    head: Dict[str, Any] = {}
    if channel is not None:
        head["channel"] = channel
    if type != "json":
        head["type"] = type
    if message_id is not None:
        head["id"] = message_id
    if target is not None:
        head["to"] = target
    if batch is not None:
        head["batch"] = {"key": batch.key, "name": batch.name, "window": batch.window}
    if reply_to is not None:
        head["reply_to"] = _checked_reply_to(reply_to)
    if time is not None:
        head["time"] = time
    text = json.dumps(head, ensure_ascii=False)[:-1]
    text = text + (", " if head else "") + '"payload": ' + raw + "}"
    return check_notify_size(text, channel, error=PublicationTooLarge)


def _checked_reply_to(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) \
            or strict_problem(value) is not None:
        raise InvalidPayload("reply_to must be a string or a finite number")
    return value


def format_marker(channel: str, batch: BatchField) -> str:
    """The NOTIFY payload of a batch marker: ``{"channel": c, "batch": {"key": k, "close": id}}``
    (or ``"cancel": true``)."""
    field: Dict[str, Any] = {"key": batch.key}
    if batch.close is not None:
        field["close"] = batch.close
    else:
        field["cancel"] = True
    return check_notify_size(json.dumps({"channel": channel, "batch": field}, ensure_ascii=False),
                             channel, error=PublicationTooLarge)


def _batch_field(value: Any) -> BatchField:
    """Read a publication's ``batch`` object; :class:`InvalidPayload` naming what is wrong."""
    if not isinstance(value, dict) or not isinstance(value.get("key"), str):
        raise InvalidPayload("'batch' must be an object with a string 'key'")
    if "close" in value or value.get("cancel") is True:
        close = value.get("close")
        if close is not None and not isinstance(close, str):
            raise InvalidPayload("a batch marker's 'close' must be a message id")
        return BatchField(value["key"], close=close, cancel=close is None)
    name, window = value.get("name"), value.get("window")
    if not isinstance(name, str):
        raise InvalidPayload("a batch item needs a string 'name'")
    if isinstance(window, bool) or not isinstance(window, (int, float)) \
            or not math.isfinite(window) or window < 0:
        raise InvalidPayload("a batch item needs a 'window' of zero or more seconds")
    return BatchField(value["key"], name=name, window=float(window))


def parse_publication(payload: str) -> Publication:
    """Read one publication NOTIFY; raises :class:`InvalidPayload` naming what is wrong."""
    try:
        fields = json_fields(payload)
    except ValueError as exc:
        raise InvalidPayload(f"not a JSON object: {exc}", preview(payload)) from None

    def text_field(name: str) -> Optional[str]:
        if name not in fields or fields[name][0] is None:
            return None
        value = fields[name][0]
        if not isinstance(value, str):
            raise InvalidPayload(f"{name!r} must be a string", preview(payload))
        return value

    channel = text_field("channel")
    target = text_field("to")
    message_id = text_field("id")
    kind = text_field("type") or "json"
    time = text_field("time")
    reply_to = fields["reply_to"][0] if "reply_to" in fields else None
    if channel is None and target is None:
        raise InvalidPayload("no 'channel' (or 'to') field", preview(payload))
    if channel is not None:
        problem = name_problem(channel)
        if problem is not None:
            raise InvalidPayload(f"invalid channel name: {problem}", preview(payload))
    try:
        batch = _batch_field(fields["batch"][0]) if "batch" in fields else None
        if batch is not None and (channel is None or target is not None):
            raise InvalidPayload("a batch is for a channel, not for one connection")
        if batch is not None and batch.is_marker:
            return Publication(channel, "json", "", None, message_id, batch)
        if batch is not None and kind == "binary":
            raise InvalidPayload("batches collect json or text messages, not binary")
        if "payload" not in fields:
            raise InvalidPayload("no 'payload' field")
        body = message_type(kind).read(*fields["payload"])
        if reply_to is not None:
            _checked_reply_to(reply_to)
    except InvalidPayload as exc:
        raise InvalidPayload(exc.reason, preview(payload)) from None
    return Publication(channel, kind, body, target, message_id, batch, reply_to, time)


def publication_frame(pub: Publication, message_id: str, *, time: Optional[str] = None) -> Frame:
    """The frame subscribers receive for ``pub`` (with ``"time"`` when ``time`` is given)."""
    extra: Dict[str, Any] = {}
    if pub.reply_to is not None:
        extra["reply_to"] = pub.reply_to
    if time is not None:
        extra["time"] = time
    return message_type(pub.type).frame(pub.channel, pub.body, message_id, extra)
