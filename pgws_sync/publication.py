"""The internal publish format: one NOTIFY on the pub/sub channel per message (pure functions).

A publication is a JSON object, so SQL can build one with ``json_build_object``::

    {"channel": "g", "type": "json", "id": "<uuid>", "to": "<connection id>", "payload": <...>}

``type`` is ``json`` (the default; ``payload`` any JSON value, passed on as
written), ``text`` (``payload`` a string) or ``binary`` (``payload`` the
base64 of the bytes). ``to`` (optional) sends to one connection instead of a
channel's subscribers; ``id`` (optional) is the message id every recipient
sees (without one, each process picks its own).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, NamedTuple, Optional, Union

from .errors import InvalidChannel, InvalidPayload, PayloadTooLarge
from .messages import NOTIFY_PAYLOAD_LIMIT, preview
from .protocol import json_fields, topic_problem

#: The PostgreSQL channel publications travel on unless the endpoint is told otherwise.
DEFAULT_PUBSUB_CHANNEL = "pgws_sync"

#: Message types: JSON values, text, and bytes (binary WebSocket frames).
MESSAGE_TYPES = ("json", "text", "binary")


class PublicationTooLarge(PayloadTooLarge):
    """A message whose publication NOTIFY would reach PostgreSQL's 8000-byte limit."""

    def __init__(self, size: int, limit: int, channel: Optional[str]) -> None:
        super().__init__(size, limit, channel)
        where = f"for channel {channel!r} " if channel is not None else ""
        self.args = (
            f"the message {where}would take {size} bytes as a NOTIFY; PostgreSQL accepts at most "
            f"{limit - 1} bytes, envelope included (about {limit - 100} bytes of JSON or text, "
            f"{(limit - 100) * 3 // 4} of binary). Send a smaller message, for example the id "
            f"of a row the browser then fetches.",
        )


class Publication(NamedTuple):
    """One published message as read back from its NOTIFY."""

    #: The pub/sub channel, or None for a message to one connection.
    channel: Optional[str]
    type: str
    #: ``json``: the JSON text as written; ``text``: the string; ``binary``: the bytes.
    body: Union[str, bytes]
    #: The connection id it is meant for, or None for every subscriber of ``channel``.
    target: Optional[str] = None
    id: Optional[str] = None


def message_body(message: Any, type: str = "json") -> Union[str, bytes]:
    """Turn what a caller publishes into a publication body, checking it fits the type.

    ``json``: any JSON-serialisable value (a ``str`` is a JSON string);
    ``text``: a ``str``; ``binary``: ``bytes``-like.
    """
    if type == "json":
        try:
            return json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"the message cannot be sent as JSON: {exc}") from None
    if type == "text":
        if not isinstance(message, str):
            raise InvalidPayload(f"a text message must be a str, not {_name(message)}")
        return message
    if type == "binary":
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise InvalidPayload(f"a binary message must be bytes, not {_name(message)}")
        return bytes(message)
    raise InvalidPayload(f"unknown message type {type!r} (expected json, text or binary)")


def _name(value: Any) -> str:
    return type(value).__name__


def format_publication(
    channel: Optional[str],
    body: Union[str, bytes],
    *,
    type: str = "json",
    target: Optional[str] = None,
    message_id: Optional[str] = None,
) -> str:
    """Build the NOTIFY payload for one message and check PostgreSQL's size limit.

    ``body`` is JSON text for ``json`` (inserted as written), a ``str`` for
    ``text``, ``bytes`` for ``binary``. Raises :class:`InvalidPayload` for a
    body that does not match its type or a bad channel, and
    :class:`PayloadTooLarge` when the NOTIFY would reach 8000 bytes.
    """
    if channel is None and target is None:
        raise InvalidPayload("a message needs a channel or a target connection")
    if channel is not None:
        problem = topic_problem(channel)
        if problem is not None:
            raise InvalidChannel(channel, problem)
    head: Dict[str, str] = {}
    if channel is not None:
        head["channel"] = channel
    if type != "json":
        head["type"] = type
    if message_id is not None:
        head["id"] = message_id
    if target is not None:
        head["to"] = target
    if type == "json":
        if not isinstance(body, str):
            raise InvalidPayload("a json body must be JSON text")
        raw = body.strip()
        try:
            json.loads(raw, parse_constant=_no_constants)
        except ValueError as exc:
            raise InvalidPayload(f"invalid JSON payload: {exc}", preview(raw)) from None
    elif type == "text":
        if not isinstance(body, str):
            raise InvalidPayload("a text body must be a str")
        raw = json.dumps(body, ensure_ascii=False)
    elif type == "binary":
        if not isinstance(body, bytes):
            raise InvalidPayload("a binary body must be bytes")
        raw = '"' + base64.b64encode(body).decode("ascii") + '"'
    else:
        raise InvalidPayload(f"unknown message type {type!r} (expected json, text or binary)")
    text = json.dumps(head, ensure_ascii=False)[:-1]
    text = text + (", " if head else "") + '"payload": ' + raw + "}"
    size = len(text.encode("utf-8"))
    if size >= NOTIFY_PAYLOAD_LIMIT:
        raise PublicationTooLarge(size, NOTIFY_PAYLOAD_LIMIT, channel)
    return text


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


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
    if channel is None and target is None:
        raise InvalidPayload("no 'channel' (or 'to') field", preview(payload))
    if channel is not None:
        problem = topic_problem(channel)
        if problem is not None:
            raise InvalidPayload(f"invalid channel name: {problem}", preview(payload))
    if "payload" not in fields:
        raise InvalidPayload("no 'payload' field", preview(payload))
    value, raw = fields["payload"]
    body: Union[str, bytes]
    if kind == "json":
        body = raw
    elif kind == "text":
        if not isinstance(value, str):
            raise InvalidPayload("a text message's payload must be a string", preview(payload))
        body = value
    elif kind == "binary":
        if not isinstance(value, str):
            raise InvalidPayload("a binary message's payload must be base64 text", preview(payload))
        try:
            body = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidPayload("a binary message's payload is not valid base64",
                                 preview(payload)) from None
    else:
        raise InvalidPayload(f"unknown message type {kind!r} (expected json, text or binary)",
                             preview(payload))
    return Publication(channel, kind, body, target, message_id)
