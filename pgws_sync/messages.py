"""Message formats: pgws notification payloads in, JSON text frames out (pure functions)."""

from __future__ import annotations

import json
import uuid
from typing import Iterable, NamedTuple, Tuple

from .errors import InvalidPayload, PayloadTooLarge

#: PostgreSQL refuses NOTIFY payloads of this many UTF-8 bytes or more.
NOTIFY_PAYLOAD_LIMIT = 8000

#: The audience a connection belongs to unless the endpoint decides otherwise.
DEFAULT_AUDIENCE = "default"

_SEPARATOR = ",{"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


class Notification(NamedTuple):
    """One NOTIFY as it arrived: the channel, the payload text, the sender's backend pid."""

    channel: str
    payload: str
    pid: int = 0


def new_message_id() -> str:
    """Return a fresh message id (a random UUID4 in canonical text form)."""
    return str(uuid.uuid4())


def preview(text: str, limit: int = 60) -> str:
    """Return the start of ``text`` for a log line."""
    return text if len(text) <= limit else text[:limit] + "..."


def parse_pgws(payload: str) -> Tuple[str, str]:
    """Split a pgws payload ``audience,{json object}`` into (audience, object text).

    The audience is the text before the first ``,{``. The object text is
    returned exactly as written (key order, spacing and number spelling kept);
    it is only checked to be one JSON object with nothing but whitespace after it.
    Raises :class:`InvalidPayload` otherwise.
    """
    cut = payload.find(_SEPARATOR)
    if cut < 0:
        raise InvalidPayload("no ',{' between audience and JSON object", preview(payload))
    body = payload[cut + 1 :]
    try:
        value, end = _decoder.raw_decode(body)
    except ValueError as exc:
        raise InvalidPayload(f"invalid JSON object: {exc}", preview(payload)) from None
    if not isinstance(value, dict):  # pragma: no cover - the body starts with "{"
        raise InvalidPayload("the JSON value is not an object", preview(payload))
    if body[end:].strip():
        raise InvalidPayload("text after the JSON object", preview(payload))
    return payload[:cut], body


def format_pgws(audience: str, body: str, *, channel: str = "") -> str:
    """Build the NOTIFY payload ``audience,{json}`` and check PostgreSQL's size limit.

    ``body`` must be the text of one JSON object. Raises :class:`InvalidPayload`
    for a bad audience or body and :class:`PayloadTooLarge` when the result
    would reach :data:`NOTIFY_PAYLOAD_LIMIT` bytes.
    """
    if not isinstance(audience, str):
        raise InvalidPayload("the audience must be a string")
    if _SEPARATOR in audience:
        raise InvalidPayload("the audience cannot contain ',{'", preview(audience))
    text = f"{audience},{body}"
    parse_pgws(text)  # the listener must be able to read back what we send
    size = len(text.encode("utf-8"))
    if size >= NOTIFY_PAYLOAD_LIMIT:
        raise PayloadTooLarge(size, NOTIFY_PAYLOAD_LIMIT, channel or None)
    return text


def message_frame(channel: str, body: str, message_id: str) -> str:
    """The text frame a browser receives: ``{"payload": <body>, "channel": ..., "id": ...}``.

    ``body`` is inserted verbatim, so the payload reaches the browser as written.
    """
    return (
        '{"payload": ' + body + ', "channel": ' + json.dumps(channel, ensure_ascii=False)
        + ', "id": ' + json.dumps(message_id) + "}"
    )


def resync_frame(channels: Iterable[str], reason: str) -> str:
    """The control frame sent after the listener reconnected: notifications may be lost."""
    return json.dumps(
        {"event": "resync", "channels": list(channels), "reason": reason}, ensure_ascii=False
    )
