"""Rules every product shares: strict JSON, name and size checks, ids, control frames (pure)."""

from __future__ import annotations

import datetime
import json
import math
import sys
import uuid
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

from .errors import InvalidChannel, InvalidPayload, JsonTextWarning, PayloadTooLarge

#: PostgreSQL refuses NOTIFY payloads of this many UTF-8 bytes or more.
NOTIFY_PAYLOAD_LIMIT = 8000

#: PostgreSQL keeps NAMEDATALEN - 1 bytes of an identifier (LISTEN truncates, pg_notify refuses).
MAX_CHANNEL_BYTES = 63

#: Longest name a client or a backend may use (pub/sub channel, room, user, tab window, id).
MAX_NAME_CHARS = 200

_WHITESPACE = " \t\n\r"


# -------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


#: A JSON decoder that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (RFC 8259).
DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str) -> Any:
    """Decode one JSON text strictly; raises ``ValueError``."""
    return DECODER.decode(text)


def dumps(value: Any, *, compact: bool = False) -> str:
    """Strict JSON text (``ValueError`` for NaN or infinities), non-ASCII kept as is;
    ``compact`` drops the spaces after ``,`` and ``:``."""
    if compact:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


class Raw(str):
    """JSON text to send as written, byte for byte (``json_text=True``, or what a client sent)."""


def json_message(message: Any, json_text: bool) -> Any:
    """What a publishing function sends, by the one rule every one of them follows: a Python
    value is serialised to JSON; with ``json_text=True``, ``message`` is JSON text (a ``str``)
    sent as written once checked."""
    if not json_text:
        return message
    if not isinstance(message, str):
        raise InvalidPayload(f"json_text=True takes JSON text (a str), not "
                             f"{type(message).__name__}: pass the value itself without it")
    return Raw(message)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning that names the first caller outside pgws_sync."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("pgws_sync"):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def warn_json_text(message: str) -> None:
    """Warn (:class:`JsonTextWarning`) when ``message``, published as a value, is the text of
    a JSON object or array: it would arrive as a string, which is rarely what was meant."""
    start = message.lstrip(_WHITESPACE)[:1]
    if start not in ("{", "["):
        return
    try:
        value = DECODER.decode(message.strip(_WHITESPACE))
    except ValueError:
        return
    if isinstance(value, (dict, list)):
        warnings.warn(
            f"a str holding JSON ({message[:40]!r}{'...' if len(message) > 40 else ''}) is "
            f"published as a JSON string, not as the {type(value).__name__} it holds: pass the "
            f"value itself, or json_text=True to send the text as JSON",
            JsonTextWarning, stacklevel=_caller_stacklevel())


def json_body(message: Any) -> str:
    """``message`` as compact strict JSON text: what a ``json`` message is sent as
    (:class:`Raw` text as written, once checked)."""
    if isinstance(message, Raw):
        try:
            return check_json(message)
        except ValueError as exc:
            raise InvalidPayload(f"json_text=True, but the text is not JSON: {exc}") from None
    if isinstance(message, str):
        warn_json_text(message)
    try:
        return dumps(message, compact=True)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"the message cannot be sent as JSON: {exc}") from None


def text_body(message: Any) -> str:
    """``message`` itself, if it may be sent as a ``text`` message (a str)."""
    if not isinstance(message, str):
        raise InvalidPayload(f"a text message must be a str, not {type(message).__name__}")
    return message


def strict_problem(value: Any) -> Optional[str]:
    """What keeps a decoded JSON value from being strict JSON (RFC 8259), or None.

    Numbers must be finite (``1e400`` decodes to infinity) and strings must be
    Unicode (an escaped lone surrogate such as ``"\\ud800"`` is not).
    """
    stack: List[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return "a string contains a lone surrogate (\\ud800-\\udfff)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "a number is too large (it is not finite)"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_fields(text: str) -> Dict[str, Tuple[Any, str]]:
    """Parse one JSON object; map each key to (decoded value, the value's text as written).

    The raw text lets a payload travel on byte for byte (key order, spacing,
    number spelling). Raises ``ValueError`` for anything but exactly one JSON
    object (surrounding whitespace allowed). A repeated key keeps its last value.
    """
    scan = DECODER.scan_once  # type: ignore[attr-defined]
    end = len(text)

    def skip(i: int) -> int:
        while i < end and text[i] in _WHITESPACE:
            i += 1
        return i

    def value_at(i: int) -> Tuple[Any, int]:
        try:
            return scan(text, i)  # type: ignore[no-any-return]
        except StopIteration:
            raise ValueError(f"expected a value at character {i}") from None
        except RecursionError:
            raise ValueError("nested too deeply") from None

    i = skip(0)
    if i >= end or text[i] != "{":
        raise ValueError("not a JSON object")
    fields: Dict[str, Tuple[Any, str]] = {}
    i = skip(i + 1)
    if i < end and text[i] == "}":
        return _closed(fields, skip(i + 1), end)
    while True:
        if i >= end or text[i] != '"':
            raise ValueError(f"expected a key at character {i}")
        key, i = value_at(i)
        i = skip(i)
        if i >= end or text[i] != ":":
            raise ValueError(f"expected ':' at character {i}")
        start = skip(i + 1)
        value, i = value_at(start)
        fields[key] = (value, text[start:i])
        i = skip(i)
        if i < end and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < end and text[i] == "}":
            return _closed(fields, skip(i + 1), end)
        raise ValueError(f"expected ',' or '}}' at character {i}")


def _closed(fields: Dict[str, Tuple[Any, str]], i: int, end: int) -> Dict[str, Tuple[Any, str]]:
    if i != end:
        raise ValueError("text after the JSON object")
    return fields


def check_json(text: str) -> str:
    """Return ``text`` stripped if it is one strict JSON value, else raise ``ValueError``."""
    raw = text.strip()
    DECODER.decode(raw)
    return raw


# ------------------------------------------------------------------- names


def name_problem(name: Any, *, max_chars: Optional[int] = MAX_NAME_CHARS,
                 max_bytes: Optional[int] = None, controls: bool = False) -> Optional[str]:
    """What is wrong with ``name`` as a name, or None if nothing.

    A name is a non-empty ``str`` that encodes as UTF-8 (no lone surrogate),
    without NUL, of at most ``max_chars`` characters and ``max_bytes`` UTF-8
    bytes (None: no limit); other control characters only with ``controls``.
    """
    if not isinstance(name, str):
        return "it must be a string"
    if not name:
        return "it cannot be empty"
    if controls and "\x00" in name:
        return "it cannot contain NUL characters"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it must be encodable as UTF-8 (it contains a lone surrogate)"
    if max_chars is not None and len(name) > max_chars:
        return f"{len(name)} characters, at most {max_chars} allowed"
    if max_bytes is not None and size > max_bytes:
        return f"it is {size} bytes long; PostgreSQL keeps only {max_bytes} bytes of a name"
    if not controls and any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control characters are not allowed"
    return None


def reply_to_problem(value: Any) -> Optional[str]:
    """What is wrong with ``value`` as a message's ``reply_to`` (a client's request id), or None.

    It must be a string of at most :data:`MAX_NAME_CHARS` characters that encodes
    as UTF-8, or a finite number (not a bool).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return "it must be a string or a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "it must be a finite number"
    if isinstance(value, str):
        if len(value) > MAX_NAME_CHARS:
            return f"it is longer than {MAX_NAME_CHARS} characters"
        if strict_problem(value) is not None:
            return "it contains a lone surrogate (\\ud800-\\udfff)"
    return None


def message_id_problem(value: Any) -> Optional[str]:
    """What is wrong with ``value`` as a message id, or None: a non-empty string of at most
    :data:`MAX_NAME_CHARS` characters, UTF-8, without control characters."""
    return name_problem(value)


def validate_name(channel: object) -> str:
    """Return ``channel`` if any source can carry it (text, no NUL, UTF-8), else raise
    :class:`InvalidChannel`."""
    problem = name_problem(channel, max_chars=None, controls=True)
    if problem is not None:
        raise InvalidChannel(channel, problem)
    return channel  # type: ignore[return-value]


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it can be LISTENed to and NOTIFYed as is, else raise
    :class:`InvalidChannel`.

    Names are quoted identifiers (case, dashes and spaces are kept) of at most
    63 bytes, since LISTEN would silently truncate a longer one.
    """
    problem = name_problem(channel, max_chars=None, max_bytes=MAX_CHANNEL_BYTES, controls=True)
    if problem is not None:
        raise InvalidChannel(channel, problem)
    return channel  # type: ignore[return-value]


# -------------------------------------------------------------------- sizes


def check_notify_size(text: str, channel: Optional[str] = None, *,
                      error: Type[PayloadTooLarge] = PayloadTooLarge) -> str:
    """Return ``text`` if PostgreSQL takes it as a NOTIFY payload, else raise ``error``
    (or :class:`InvalidPayload` for text that is not UTF-8)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPayload("the payload must be encodable as UTF-8 "
                             "(it contains a lone surrogate)") from None
    if size >= NOTIFY_PAYLOAD_LIMIT:
        raise error(size, NOTIFY_PAYLOAD_LIMIT, channel)
    return text


# ---------------------------------------------------------------- messages


def new_message_id() -> str:
    """A fresh message id (a random UUID4 in canonical text form)."""
    return str(uuid.uuid4())


def utc_now() -> str:
    """Now as RFC 3339 text in UTC with milliseconds: ``2026-12-01T23:04:05.123Z``."""
    return format_time(None)


def format_time(seconds: Optional[float]) -> str:
    """``seconds`` since the epoch (None: now) as RFC 3339 text in UTC with milliseconds."""
    when = (datetime.datetime.now(datetime.timezone.utc) if seconds is None else
            datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc))
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def preview(text: str, limit: int = 60) -> str:
    """The start of ``text`` for a log line or an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def message_frame(channel: Optional[str], body: str, message_id: str, *,
                  payload_first: bool = False, extra: Optional[Dict[str, Any]] = None) -> str:
    """``{"channel": ..., "payload": <body>, "id": ...}`` with ``body`` (JSON text) verbatim.

    Without a channel the ``channel`` key is left out; ``payload_first`` puts
    ``payload`` before ``channel`` (pgws's order); ``extra`` fields follow ``id``.
    """
    ident = ', "id": ' + dumps(message_id)
    if extra:
        ident += ", " + dumps(extra)[1:-1]
    ident += "}"
    if channel is None:
        return '{"payload": ' + body + ident
    name = dumps(channel)
    if payload_first:
        return '{"payload": ' + body + ', "channel": ' + name + ident
    return '{"channel": ' + name + ', "payload": ' + body + ident


def error_frame(error: str, *, compact: bool = False, **fields: Any) -> str:
    """``{"event": "error", "error": <reason>, ...fields}``; fields that are None are left out."""
    frame: Dict[str, Any] = {"event": "error", "error": error}
    frame.update((k, v) for k, v in fields.items() if v is not None)
    return dumps(frame, compact=compact)


def resync_frame(channels: Iterable[str], reason: str) -> str:
    """``{"event": "resync", "channels": [...], "reason": ...}``: messages may have been lost."""
    return dumps({"event": "resync", "channels": list(channels), "reason": reason})


def gap_frame(channel: str, missed: int) -> str:
    """``{"event": "gap", "channel": ..., "missed": N}``: N messages were dropped for this client."""
    return dumps({"event": "gap", "channel": channel, "missed": missed})


# ------------------------------------------------- heartbeat and the envelope

#: The subprotocol in which every app frame travels in an envelope (pgws.js offers it).
SUBPROTOCOL_V2 = "pgws.v2"


def parse_ping(text: str) -> Optional[Any]:
    """The ``id`` of an app-level ping ``{"action": "ping", "id": ...}``, or None for any other
    frame (the id: a string or a finite number, as a ``reply_to``)."""
    if '"ping"' not in text:
        return None
    try:
        fields = json_fields(text)
    except ValueError:
        return None
    if set(fields) != {"action", "id"} or fields["action"][0] != "ping":
        return None
    ident = fields["id"][0]
    return None if reply_to_problem(ident) is not None else ident


def pong_frame(ping_id: Any) -> str:
    """``{"event": "pong", "reply_to": id}``: the answer to an app-level ping."""
    return dumps({"event": "pong", "reply_to": ping_id}, compact=True)


def envelope(frame: str, *, json_text: bool = True) -> str:
    """An app frame as a ``pgws.v2`` socket gets it: ``{"message":<frame>}`` with ``frame``
    (JSON text) verbatim, or ``{"text":"<frame>"}`` for text that may not be JSON."""
    if json_text:
        return '{"message":' + frame + "}"
    return '{"text":' + dumps(frame) + "}"
