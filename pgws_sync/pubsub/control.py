"""Server-side control of sockets in every worker: the control NOTIFY's format, as pure functions.

A control message travels as one NOTIFY on the endpoint's control channel, so every
worker (on every host) that listens there acts on its own sockets:

``{"op": "disconnect", "match": {...}, "code": 4403, "reason": "logged out"}``
``{"op": "subscribe" | "unsubscribe", "match": {...}, "channel": "..."}``

``match`` holds metadata key/values a socket's ``conn.metadata`` must all hold.
Presence changes travel on the same channel (written by ``sources/presence.py``):

``{"op": "presence", "channel": "...", "joins": [member...], "leaves": [member...],
"count": N}`` where a member is ``{"client": "<connection id>", "info": {...}}`` (a join
may add ``"replaces": "<the client id of a member a drain closed>"``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .._formats import check_notify_size, dumps, loads, name_problem, strict_problem
from ..errors import InvalidChannel, InvalidPayload

#: What the control channel is called unless the endpoint is told: the pub/sub channel's
#: name with this after it.
CONTROL_SUFFIX = ":control"

#: The operations a control message may carry (``presence``: written by the presence store).
OPS = ("disconnect", "subscribe", "unsubscribe", "presence")

#: Close codes an app may send: 1000 (normal) and 3000-4999 (registered and private use).
#: 4400-4499 tell pgws.js not to reconnect.
NO_RECONNECT = range(4400, 4500)


class Control(NamedTuple):
    """One control message, read back from its NOTIFY."""

    op: str
    #: Metadata key/values a socket must all hold to be acted on (empty: every socket).
    match: Dict[str, Any]
    #: ``disconnect``: the close code and reason.
    code: int = 1000
    reason: str = ""
    #: ``subscribe`` / ``unsubscribe`` / ``presence``: the channel.
    channel: Optional[str] = None
    #: ``presence``: the members who joined and who left, and the count after.
    joins: Tuple[Dict[str, Any], ...] = ()
    leaves: Tuple[Dict[str, Any], ...] = ()
    total: int = 0


def close_code(code: Any) -> int:
    """``code`` if an app may close a socket with it (1000, or 3000-4999), else raise
    :class:`InvalidPayload`."""
    if isinstance(code, bool) or not isinstance(code, int) or not (
            code == 1000 or 3000 <= code <= 4999):
        raise InvalidPayload(f"a close code must be 1000 or 3000-4999, got {code!r}")
    return int(code)


def close_reason(reason: Any) -> str:
    """``reason`` if a close frame can carry it (text of at most 123 UTF-8 bytes), else raise
    :class:`InvalidPayload`."""
    if not isinstance(reason, str) or strict_problem(reason) is not None:
        raise InvalidPayload("a close reason must be text")
    if len(reason.encode("utf-8")) > 123:
        raise InvalidPayload("a close reason is at most 123 UTF-8 bytes (what a close frame "
                             "carries)")
    return reason


def _match(metadata: Mapping[str, Any]) -> Dict[str, Any]:
    match = dict(metadata)
    try:
        text = dumps(match)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"the metadata to match must be JSON values: {exc}") from None
    problem = strict_problem(json.loads(text))
    if problem is not None:
        raise InvalidPayload(f"the metadata to match is not strict JSON: {problem}")
    return match


def format_control(op: str, metadata: Mapping[str, Any], *, code: int = 1000, reason: str = "",
                   channel: Optional[str] = None, notify_channel: Optional[str] = None) -> str:
    """The NOTIFY payload of one control message; raises :class:`InvalidPayload` (bad code,
    reason or metadata), :class:`InvalidChannel` or :class:`PayloadTooLarge`."""
    if op not in OPS or op == "presence":
        raise InvalidPayload(f"unknown control operation {op!r}")
    body: Dict[str, Any] = {"op": op, "match": _match(metadata)}
    if op == "disconnect":
        body["code"] = close_code(code)
        body["reason"] = close_reason(reason)
    else:
        problem = name_problem(channel)
        if problem is not None:
            raise InvalidChannel(channel, problem)
        body["channel"] = channel
    return check_notify_size(dumps(body), notify_channel)


def parse_control(text: str) -> Control:
    """Read one control message; :class:`InvalidPayload` for anything else."""
    try:
        body = loads(text)
    except ValueError as exc:
        raise InvalidPayload(f"a control message is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidPayload("a control message must be a JSON object")
    op = body.get("op")
    match = body.get("match", {})
    if op not in OPS:
        raise InvalidPayload(f"unknown control operation {op!r}")
    if not isinstance(match, dict):
        raise InvalidPayload("a control message's match must be an object")
    if op == "disconnect":
        return Control(op, match, code=close_code(body.get("code", 1000)),
                       reason=close_reason(body.get("reason", "")))
    channel = body.get("channel")
    problem = name_problem(channel)
    if problem is not None:
        raise InvalidPayload(f"a control message's channel is invalid: {problem}")
    if op != "presence":
        return Control(op, match, channel=channel)
    total = body.get("count")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise InvalidPayload("a presence change's count must be a whole number")
    return Control(op, {}, channel=channel, joins=_members(body.get("joins", [])),
                   leaves=_members(body.get("leaves", [])), total=total)


def _members(value: Any) -> Tuple[Dict[str, Any], ...]:
    if not isinstance(value, list):
        raise InvalidPayload("a presence change's joins and leaves must be lists")
    for member in value:
        if not (isinstance(member, dict) and {"client", "info"} <= set(member)
                <= {"client", "info", "replaces"} and isinstance(member["client"], str)
                and isinstance(member["info"], dict)
                and isinstance(member.get("replaces", ""), str)):
            raise InvalidPayload("a presence member is {\"client\": id, \"info\": {...}} "
                                 "(a join may name the client it \"replaces\")")
    return tuple(value)


# ------------------------------------------------------------ presence frames


def member_frame(event: str, channel: str, member: Mapping[str, Any]) -> str:
    """``{"event": "join" | "leave", "channel": ..., "member": {"client": ..., "info": ...}}``,
    and for a join that takes a drained member's place, ``"replaces": <its client id>``."""
    frame: Dict[str, Any] = {"event": event, "channel": channel,
                             "member": {"client": member["client"], "info": member["info"]}}
    if member.get("replaces") is not None:
        frame["replaces"] = member["replaces"]
    return dumps(frame)


def count_frame(channel: str, count: int) -> str:
    """``{"event": "presence_count", "channel": ..., "count": N}``: a large channel's change."""
    return dumps({"event": "presence_count", "channel": channel, "count": count})


def presence_frame(channel: str, reply_to: Any, count: int,
                   members: Sequence[Mapping[str, Any]]) -> str:
    """The answer to ``{"action": "presence"}``: the exact count, members up to the limit."""
    frame: Dict[str, Any] = {"event": "presence", "channel": channel}
    if reply_to is not None:
        frame["reply_to"] = reply_to
    frame["count"] = count
    frame["members"] = [dict(m) for m in members]
    return dumps(frame)


def change_frames(control: Control, *, counts_above: int) -> List[Tuple[Optional[str], str]]:
    """The frames a presence change becomes for the channel's subscribers: (the client the
    frame is about, which does not get it; the frame). Above ``counts_above`` members, one
    ``presence_count`` frame for everyone instead."""
    channel = str(control.channel)
    if control.total > counts_above:
        return [(None, count_frame(channel, control.total))]
    return ([(m["client"], member_frame("join", channel, m)) for m in control.joins]
            + [(m["client"], member_frame("leave", channel, m)) for m in control.leaves])


def matches(metadata: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    """Whether ``metadata`` holds every key of ``match`` with an equal value."""
    missing = object()
    return all(_equal(metadata.get(key, missing), value) for key, value in match.items())


def _equal(have: Any, want: Any) -> bool:
    if isinstance(have, bool) != isinstance(want, bool):  # True is not 1 here
        return False
    try:
        return bool(have == want)
    except Exception:  # noqa: BLE001 (an app's metadata value with a strange __eq__)
        return False
