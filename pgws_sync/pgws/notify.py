"""Sending side: NOTIFY in pgws format from Python, inside the caller's transaction."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Union

from .._core.endpoint import DEFAULT_AUDIENCE
from .._formats import dumps, validate_channel
from .._statement import run
from ..errors import InvalidPayload
from .messages import format_pgws


def notify(
    conn: Any,
    channel: str,
    payload: Union[Mapping[str, Any], str],
    audience: str = DEFAULT_AUDIENCE,
    *,
    json_text: bool = False,
) -> None:
    """Send ``audience,{payload}`` on ``channel`` with ``pg_notify``.

    ``conn`` is a psycopg2 or psycopg 3 connection, or a SQLAlchemy ``Connection`` or
    ``Session`` (``db.session``); the notification leaves when its transaction commits (at
    once in autocommit). ``payload`` is a dict, sent as JSON, or with ``json_text=True``
    the text of a JSON object, sent as written. Raises
    :class:`~pgws_sync.PayloadTooLarge` before sending anything PostgreSQL
    would refuse (8000 bytes or more), :class:`~pgws_sync.InvalidPayload` for
    a payload that is not a JSON object.
    """
    validate_channel(channel)
    if isinstance(payload, str):
        if not json_text:
            warnings.warn("notify() got a str without json_text=True: it is sent as JSON text "
                          "as before 0.3; pass the dict itself, or json_text=True",
                          DeprecationWarning, stacklevel=2)
        body = payload.strip()
    elif json_text:
        raise InvalidPayload(f"json_text=True takes JSON text (a str), not "
                             f"{type(payload).__name__}: pass the dict itself without it")
    elif isinstance(payload, Mapping):
        try:
            body = dumps(dict(payload), compact=True)
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"the payload cannot be sent as JSON: {exc}") from None
    else:
        raise InvalidPayload(f"payload must be a dict (or JSON text with json_text=True), not "
                             f"{type(payload).__name__}")
    text = format_pgws(audience, body, channel=channel)
    run(conn, "SELECT pg_notify(%s, %s)", (channel, text))
