"""Sending side: NOTIFY in pgws format from Python, inside the caller's transaction."""

from __future__ import annotations

import json
from typing import Any, Mapping, Union

from .._core.endpoint import DEFAULT_AUDIENCE
from .._formats import validate_channel
from ..errors import InvalidPayload
from .messages import format_pgws


def notify(
    conn: Any,
    channel: str,
    payload: Union[Mapping[str, Any], str],
    audience: str = DEFAULT_AUDIENCE,
) -> None:
    """Send ``audience,{payload}`` on ``channel`` with ``pg_notify``.

    ``conn`` is a DB-API connection (psycopg2); the notification leaves when
    its transaction commits (at once in autocommit). ``payload`` is a dict or
    the text of a JSON object, sent as written. Raises
    :class:`~pgws_sync.PayloadTooLarge` before sending anything PostgreSQL
    would refuse (8000 bytes or more), :class:`~pgws_sync.InvalidPayload` for
    a payload that is not a JSON object.
    """
    validate_channel(channel)
    if isinstance(payload, str):
        body = payload.strip()
    elif isinstance(payload, Mapping):
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    else:
        raise InvalidPayload(f"payload must be a dict or JSON text, not {type(payload).__name__}")
    text = format_pgws(audience, body, channel=channel)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notify(%s, %s)", (channel, text))
