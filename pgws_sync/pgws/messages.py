"""The pgws message format: ``audience,{json object}`` NOTIFY payloads in, message frames out (pure)."""

from __future__ import annotations

from typing import Tuple

from .._formats import DECODER, check_notify_size, message_frame, preview, strict_problem
from ..errors import InvalidPayload

_SEPARATOR = ",{"


def parse_pgws(payload: str) -> Tuple[str, str]:
    """Split a pgws payload ``audience,{json object}`` into (audience, object text).

    The audience is the text before the first ``,{``. The object text is
    returned exactly as written; it is only checked to be one JSON object with
    nothing but whitespace after it. Raises :class:`InvalidPayload` otherwise.
    """
    cut = payload.find(_SEPARATOR)
    if cut < 0:
        raise InvalidPayload("no ',{' between audience and JSON object", preview(payload))
    body = payload[cut + 1 :]
    try:
        value, end = DECODER.raw_decode(body)  # an object: the body starts with "{"
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(f"invalid JSON object: {exc}", preview(payload)) from None
    problem = strict_problem(value)
    if problem is not None:
        raise InvalidPayload(f"not strict JSON: {problem}", preview(payload))
    if body[end:].strip():
        raise InvalidPayload("text after the JSON object", preview(payload))
    return payload[:cut], body


def format_pgws(audience: str, body: str, *, channel: str = "") -> str:
    """Build the NOTIFY payload ``audience,{json}`` and check PostgreSQL's size limit.

    ``body`` must be the text of one JSON object. Raises :class:`InvalidPayload`
    for a bad audience or body and :class:`PayloadTooLarge` when the result
    would reach 8000 bytes.
    """
    if not isinstance(audience, str):
        raise InvalidPayload("the audience must be a string")
    if _SEPARATOR in audience:
        raise InvalidPayload("the audience cannot contain ',{'", preview(audience))
    text = f"{audience},{body}"
    parse_pgws(text)  # the listener must be able to read back what we send
    return check_notify_size(text, channel or None)


def pgws_frame(channel: str, body: str, message_id: str) -> str:
    """The text frame a browser receives: ``{"payload": <body>, "channel": ..., "id": ...}``."""
    return message_frame(channel, body, message_id, payload_first=True)
