"""The pub/sub client protocol: client actions in, reply, event, gap and message frames out (pure)."""

from __future__ import annotations

import json
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .errors import PgwsError

#: What a client may ask for.
ACTIONS = ("subscribe", "unsubscribe", "publish")

#: What happens to a subscriber whose send queue is full.
BACKPRESSURE_POLICIES = ("close", "drop")

#: Longest topic name, in characters.
MAX_TOPIC_CHARS = 200

#: Longest message id a client may send, in characters (it is echoed as ``reply_to``).
MAX_ID_CHARS = 200


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_WHITESPACE = " \t\n\r"


class ProtocolError(PgwsError, ValueError):
    """A client frame the server cannot act on; the reason goes back in an error frame."""

    def __init__(self, reason: str, reply_to: Any = None) -> None:
        self.reason = reason
        self.reply_to = reply_to
        super().__init__(reason)


class InvalidTopic(ProtocolError):
    """A pub/sub channel name that is not allowed."""


class Action(NamedTuple):
    """One parsed client request."""

    action: str
    channel: str
    #: The client's id for this request, echoed as ``reply_to`` (a string or a number), or None.
    id: Any = None
    #: For ``publish``: the payload's JSON text exactly as the client wrote it.
    payload: Optional[str] = None
    #: For ``subscribe``: the backpressure policy asked for, or None for the endpoint's.
    backpressure: Optional[str] = None


def json_fields(text: str) -> Dict[str, Tuple[Any, str]]:
    """Parse one JSON object; map each key to (decoded value, the value's text as written).

    The raw text lets a payload travel on byte for byte (key order, spacing,
    number spelling). Raises ``ValueError`` for anything but exactly one JSON
    object (surrounding whitespace allowed). A repeated key keeps its last value.
    """
    scan = _decoder.scan_once  # type: ignore[attr-defined]
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
        i += 1
    else:
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
                i += 1
                break
            raise ValueError(f"expected ',' or '}}' at character {i}")
    if skip(i) != end:
        raise ValueError("text after the JSON object")
    return fields


def topic_problem(name: Any) -> Optional[str]:
    """What is wrong with ``name`` as a pub/sub channel name, or None if nothing.

    A name is a non-empty string of at most 200 characters without control characters.
    """
    if not isinstance(name, str):
        return "it must be a string"
    if not name:
        return "it cannot be empty"
    if len(name) > MAX_TOPIC_CHARS:
        return f"{len(name)} characters, at most {MAX_TOPIC_CHARS} allowed"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control characters are not allowed"
    return None


def validate_topic(name: Any, reply_to: Any = None) -> str:
    """Return ``name`` if it may name a pub/sub channel, else raise :class:`InvalidTopic`."""
    problem = topic_problem(name)
    if problem is not None:
        raise InvalidTopic(f"invalid channel name: {problem}", reply_to)
    return name  # type: ignore[no-any-return]


def parse_action(data: Union[str, bytes]) -> Action:
    """Parse one client frame into an :class:`Action`, or raise :class:`ProtocolError`.

    The error's ``reply_to`` is the frame's ``id`` whenever it could be read,
    so the client can match the error to its request.
    """
    if not isinstance(data, str):
        raise ProtocolError("binary frames are not understood; send JSON text frames")
    try:
        fields = json_fields(data)
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    reply_to = None
    if "id" in fields:
        reply_to = fields["id"][0]
        if isinstance(reply_to, bool) or not isinstance(reply_to, (str, int, float)):
            raise ProtocolError("'id' must be a string or a number")
        if isinstance(reply_to, str) and len(reply_to) > MAX_ID_CHARS:
            raise ProtocolError(f"'id' is longer than {MAX_ID_CHARS} characters")
    if "action" not in fields:
        raise ProtocolError("missing field 'action'", reply_to)
    action = fields["action"][0]
    if action not in ACTIONS:
        raise ProtocolError(
            f"unknown action {action!r} (expected subscribe, unsubscribe or publish)", reply_to
        )
    if "channel" not in fields:
        raise ProtocolError("missing field 'channel'", reply_to)
    channel = validate_topic(fields["channel"][0], reply_to)
    payload = None
    backpressure = None
    if action == "publish":
        if "payload" not in fields:
            raise ProtocolError("missing field 'payload'", reply_to)
        payload = fields["payload"][1]
    if action == "subscribe" and "backpressure" in fields:
        backpressure = fields["backpressure"][0]
        if backpressure not in BACKPRESSURE_POLICIES:
            raise ProtocolError("'backpressure' must be \"close\" or \"drop\"", reply_to)
    return Action(action, channel, reply_to, payload, backpressure)


# ------------------------------------------------------------------ frames


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def reply_frame(event: str, channel: Optional[str], reply_to: Any = None, **extra: Any) -> str:
    """``{"event": event, "channel": ..., "reply_to": ...}`` (absent fields left out)."""
    frame: Dict[str, Any] = {"event": event}
    if channel is not None:
        frame["channel"] = channel
    frame.update(extra)
    if reply_to is not None:
        frame["reply_to"] = reply_to
    return _dumps(frame)


def error_frame(error: str, reply_to: Any = None) -> str:
    """``{"event": "error", "error": "<reason>", "reply_to": ...}``."""
    frame: Dict[str, Any] = {"event": "error", "error": error}
    if reply_to is not None:
        frame["reply_to"] = reply_to
    return _dumps(frame)


def gap_frame(channel: str, missed: int) -> str:
    """``{"event": "gap", "channel": ..., "missed": N}``: N messages were dropped for this client."""
    return _dumps({"event": "gap", "channel": channel, "missed": missed})


def json_message_frame(channel: Optional[str], body: str, message_id: str) -> str:
    """``{"channel": ..., "payload": <body>, "id": ...}`` with ``body`` (JSON text) verbatim.

    Without a channel (a message sent to one connection) the ``channel`` key is left out.
    """
    head = "{" if channel is None else '{"channel": ' + _dumps(channel) + ", "
    return head + '"payload": ' + body + ', "id": ' + _dumps(message_id) + "}"


def text_message_frame(channel: Optional[str], text: str, message_id: str) -> str:
    """``{"channel": ..., "type": "text", "payload": "<text>", "id": ...}``."""
    frame: Dict[str, Any] = {} if channel is None else {"channel": channel}
    frame.update(type="text", payload=text, id=message_id)
    return _dumps(frame)
