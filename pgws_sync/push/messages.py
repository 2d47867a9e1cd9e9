"""The push protocol (websocket-push's): backend messages, room requests and their frames (pure)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .._formats import check_json, dumps, error_frame, json_fields, name_problem, strict_problem
from ..errors import InvalidPayload, ProtocolError

#: The Redis channel websocket-push listens on; also the default NOTIFY channel.
DEFAULT_PUSH_CHANNEL = "BackgroundPush"


class ToUser(NamedTuple):
    """``{"pushToUser": user, "payload": P}``, optionally narrowed to one ``tabWindowId``."""

    user: str
    payload: str  # P's JSON text exactly as the backend wrote it
    tab_window_id: Optional[str] = None


class ToRoom(NamedTuple):
    """``{"pushToRoom": room, "payload": P}``."""

    room: str
    payload: str


class AuthEvent(NamedTuple):
    """``{"guestId": g, "authUserId": u, "sig": S}``: guest ``g`` has logged in as user ``u``;
    ``S`` is :func:`sign_auth_event`'s HMAC, so that no one without the key forges it."""

    guest: str
    user: str
    sig: Optional[str] = None


def sign_auth_event(key: Union[str, bytes], guest: str, user: str) -> str:
    """The ``sig`` of an AuthEvent: HMAC-SHA256 of guest and user with ``key``, in hex."""
    secret = key.encode("utf-8") if isinstance(key, str) else key
    message = guest.encode("utf-8") + b"\x00" + user.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def auth_event_signed(key: Union[str, bytes], event: AuthEvent) -> bool:
    """Whether ``event`` carries the right ``sig`` for ``key`` (compared in constant time, as
    bytes: compare_digest refuses a str that is not ASCII, and anyone can send one)."""
    return event.sig is not None and hmac.compare_digest(
        event.sig.encode("utf-8"), sign_auth_event(key, event.guest, event.user).encode("ascii"))


BackendMessage = Union[ToUser, ToRoom, AuthEvent]


class RoomRequest(NamedTuple):
    """A client's ``{"joinRoom": room}`` (``join`` True) or ``{"leaveRoom": room}``."""

    join: bool
    room: str


def _name(fields: Dict[str, Tuple[Any, str]], key: str) -> str:
    value = fields[key][0]
    problem = name_problem(value)
    if problem is not None:
        raise InvalidPayload(f"{key!r} is not a valid name: {problem}")
    return value  # type: ignore[no-any-return]


def parse_backend_message(text: str) -> BackendMessage:
    """Parse one message from the backend (a NOTIFY or Redis payload).

    Raises :class:`InvalidPayload`, naming the problem, for anything that is
    not exactly one of the three shapes.
    """
    try:
        fields = json_fields(text)
    except ValueError as exc:
        raise InvalidPayload(f"not a JSON object: {exc}") from None
    targets = [k for k in ("pushToUser", "pushToRoom", "guestId") if k in fields]
    if len(targets) != 1:
        raise InvalidPayload("expected exactly one of 'pushToUser', 'pushToRoom' or "
                             f"'guestId' (with 'authUserId'), found {len(targets)}")
    if targets[0] == "guestId":
        if "authUserId" not in fields:
            raise InvalidPayload("'guestId' without 'authUserId'")
        sig = fields["sig"][0] if "sig" in fields else None
        if sig is not None and not isinstance(sig, str):
            raise InvalidPayload("'sig' is not a string")
        return AuthEvent(_name(fields, "guestId"), _name(fields, "authUserId"), sig)
    if "payload" not in fields:
        raise InvalidPayload(f"{targets[0]!r} without 'payload'")
    problem = strict_problem(fields["payload"][0])
    if problem is not None:
        raise InvalidPayload(f"the payload is not strict JSON: {problem}")
    payload = fields["payload"][1]
    if targets[0] == "pushToRoom":
        return ToRoom(_name(fields, "pushToRoom"), payload)
    tab = _name(fields, "tabWindowId") if "tabWindowId" in fields else None
    return ToUser(_name(fields, "pushToUser"), payload, tab)


def format_backend_message(message: BackendMessage) -> str:
    """The JSON text of ``message`` as a backend publishes it (``payload`` must be JSON text)."""
    if isinstance(message, AuthEvent):
        event: Dict[str, str] = {"guestId": message.guest, "authUserId": message.user}
        if message.sig is not None:
            event["sig"] = message.sig
        return dumps(event)
    try:
        check_json(message.payload)
    except ValueError as exc:
        raise InvalidPayload(f"the payload is not JSON text: {exc}") from None
    if isinstance(message, ToRoom):
        head = {"pushToRoom": message.room}
    else:
        head = {"pushToUser": message.user}
        if message.tab_window_id is not None:
            head["tabWindowId"] = message.tab_window_id
    return dumps(head)[:-1] + ', "payload": ' + message.payload + "}"


def parse_room_request(data: Union[str, bytes]) -> Optional[RoomRequest]:
    """``{"joinRoom": r}`` / ``{"leaveRoom": r}`` → :class:`RoomRequest`; None for other frames.

    Raises :class:`ProtocolError` for a room request that names no valid room.
    """
    if not isinstance(data, str) or ("joinRoom" not in data and "leaveRoom" not in data):
        return None
    try:
        fields = json_fields(data)
    except ValueError:
        return None  # not JSON: the pub/sub protocol answers it
    kinds = [k for k in ("joinRoom", "leaveRoom") if k in fields]
    if not kinds:
        return None
    if len(kinds) == 2:
        raise ProtocolError("send either 'joinRoom' or 'leaveRoom', not both")
    room = fields[kinds[0]][0]
    problem = name_problem(room)
    if problem is not None:
        raise ProtocolError(f"invalid room name: {problem}")
    return RoomRequest(kinds[0] == "joinRoom", room)


def tab_window_frame(token: str) -> str:
    """``{"tabWindowId": token}``: the first frame of a socket, naming it for ``pushToUser``."""
    return dumps({"tabWindowId": token}, compact=True)


def room_frame(request: RoomRequest) -> str:
    """``{"event": "joined" | "left", "room": r}``: the room request took effect."""
    return dumps({"event": "joined" if request.join else "left", "room": request.room},
                 compact=True)


def joined_at_frame(room: str, offset: int, epoch: str) -> str:
    """``{"event": "joined", "room": r, "offset": N, "epoch": E}``: a durable room joined live
    after ``offset`` of the log's ``epoch`` (a client resumes the room from there)."""
    return dumps({"event": "joined", "room": room, "offset": offset, "epoch": epoch},
                 compact=True)


def room_error_frame(error: str, room: Optional[str] = None) -> str:
    """``{"event": "error", "error": reason, "room": r}``: a refused or invalid room request."""
    return error_frame(error, compact=True, room=room)
