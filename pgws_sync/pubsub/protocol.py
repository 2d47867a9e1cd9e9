"""The pub/sub client protocol: client actions in, reply and message frames out (pure)."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .._formats import (
    MAX_NAME_CHARS,
    dumps,
    json_fields,
    name_problem,
    preview,
    reply_to_problem,
    strict_problem,
)
from ..errors import ProtocolError

#: What a client may ask for (``message`` goes to the endpoint's ``on_client_message``).
ACTIONS = ("subscribe", "unsubscribe", "publish", "message", "presence")

#: What happens to a subscriber whose send queue is full.
BACKPRESSURE_POLICIES = ("close", "drop")


class Action(NamedTuple):
    """One parsed client request."""

    action: str
    #: The channel; None only for a ``message`` that names none.
    channel: Optional[str]
    #: The client's id for this request, echoed as ``reply_to`` (a string or a number), or None.
    id: Any = None
    #: For ``publish`` and ``message``: the payload's JSON text exactly as the client wrote it.
    payload: Optional[str] = None
    #: For ``subscribe``: the backpressure policy asked for, or None for the endpoint's.
    backpressure: Optional[str] = None
    #: For ``subscribe`` to a durable channel: resume after this offset (None: start live).
    since: Optional[int] = None
    #: For ``subscribe`` with ``since``: the epoch that offset belongs to, if the client knows.
    epoch: Optional[str] = None


def check_channel(name: Any, reply_to: Any = None) -> str:
    """Return ``name`` if it may name a pub/sub channel, else raise :class:`ProtocolError`.

    A name is a non-empty string of at most 200 characters without control characters.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ProtocolError(f"invalid channel name: {problem}", reply_to)
    return name  # type: ignore[no-any-return]


def parse_action(data: Union[str, bytes], *, durable: bool = False) -> Action:
    """Parse one client frame into an :class:`Action`, or raise :class:`ProtocolError`.

    ``durable``: read a subscribe's ``since`` and ``epoch`` (other endpoints ignore them,
    like any field they do not know).

    The error's ``reply_to`` is the frame's ``id`` whenever it could be read,
    so the client can match the error to its request.
    """
    if not isinstance(data, str):
        raise ProtocolError("binary frames are not understood; send JSON text frames")
    try:
        fields = json_fields(data)
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    reply_to = _reply_to(fields["id"][0]) if "id" in fields else None
    if "action" not in fields:
        raise ProtocolError("missing field 'action'", reply_to)
    action = fields["action"][0]
    if not isinstance(action, str) or action not in ACTIONS:
        raise ProtocolError(f"unknown action {preview(repr(action))} (expected subscribe, "
                            f"unsubscribe, publish, message or presence)", reply_to)
    channel: Optional[str] = None
    if "channel" in fields:
        channel = check_channel(fields["channel"][0], reply_to)
    elif action != "message":
        raise ProtocolError("missing field 'channel'", reply_to)
    payload = None
    backpressure = None
    if action == "publish" and "payload" not in fields:
        raise ProtocolError("missing field 'payload'", reply_to)
    if action in ("publish", "message") and "payload" in fields:
        problem = strict_problem(fields["payload"][0])
        if problem is not None:
            raise ProtocolError(f"invalid payload: {problem}", reply_to)
        payload = fields["payload"][1]
    if action == "subscribe" and "backpressure" in fields:
        backpressure = fields["backpressure"][0]
        if backpressure not in BACKPRESSURE_POLICIES:
            raise ProtocolError("'backpressure' must be \"close\" or \"drop\"", reply_to)
    since, epoch = (_position(fields, reply_to) if durable and action == "subscribe"
                    else (None, None))
    return Action(action, channel, reply_to, payload, backpressure, since, epoch)


def _position(fields: Dict[str, Any], reply_to: Any) -> Tuple[Optional[int], Optional[str]]:
    """A subscribe's ``since`` and ``epoch``, checked (absent: None)."""
    since = epoch = None
    if "since" in fields:
        since = fields["since"][0]
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise ProtocolError(f"invalid 'since': {preview(fields['since'][1])} is not an "
                                f"offset (a whole number, 0 or more)", reply_to)
    if "epoch" in fields:
        epoch = fields["epoch"][0]
        if since is None:
            raise ProtocolError("invalid 'epoch': it goes with 'since'", reply_to)
        if not isinstance(epoch, str) or not epoch or len(epoch) > MAX_NAME_CHARS \
                or strict_problem(epoch) is not None:
            raise ProtocolError(f"invalid 'epoch': {preview(fields['epoch'][1])} is not an epoch "
                                f"(the string a subscribed or message frame gave)", reply_to)
    return since, epoch


def _reply_to(value: Any) -> Any:
    """The client's ``id`` if it can come back as ``reply_to`` in strict JSON, else raise."""
    problem = reply_to_problem(value)
    if problem is not None:
        raise ProtocolError("'id' " + problem[len("it "):])
    return value


# ------------------------------------------------------------------ frames


def reply_frame(event: str, channel: Optional[str], reply_to: Any = None, **extra: Any) -> str:
    """``{"event": event, "channel": ..., "reply_to": ...}`` (absent fields left out)."""
    frame: Dict[str, Any] = {"event": event}
    if channel is not None:
        frame["channel"] = channel
    frame.update(extra)
    if reply_to is not None:
        frame["reply_to"] = reply_to
    return dumps(frame)


def text_message_frame(channel: Optional[str], text: str, message_id: str,
                       extra: Optional[Dict[str, Any]] = None) -> str:
    """``{"channel": ..., "type": "text", "payload": "<text>", "id": ...}`` (``extra`` after)."""
    frame: Dict[str, Any] = {} if channel is None else {"channel": channel}
    frame.update(type="text", payload=text, id=message_id)
    frame.update(extra or {})
    return dumps(frame)
