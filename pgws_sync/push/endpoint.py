"""Push: users, rooms and tab windows fed by backend messages (websocket-push's model)."""

from __future__ import annotations

import logging
import secrets
import threading
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from werkzeug.wrappers import Request

from .._core.connection import Connection
from .._core.wire import Frame
from .._formats import check_notify_size, dumps, json_message, name_problem, preview
from ..errors import ConfigError, InvalidPayload, LogUnavailable, ProtocolError, Refused
from ..pubsub.endpoint import SUBSCRIPTION_PREFIX, PubSub
from ..pubsub.publication import message_body
from ..pubsub.streams import Reply, SubscribeAnswer
from ..sources.base import Notification, Source
from .messages import (
    DEFAULT_PUSH_CHANNEL,
    AuthEvent,
    auth_event_signed,
    sign_auth_event,
    BackendMessage,
    ToRoom,
    ToUser,
    format_backend_message,
    joined_at_frame,
    parse_backend_message,
    parse_room_request,
    room_error_frame,
    room_frame,
    tab_window_frame,
)

logger = logging.getLogger(__name__)

#: Hub keys of users, of guests and of tab windows (rooms are subscriptions: ``sub:<room>``).
#: Guests and users live in separate key spaces: a guest id is never a user id.
USER_PREFIX = "user:"
GUEST_PREFIX = "guest:"
TAB_PREFIX = "tab:"

#: On a durable endpoint, the log channels of users and of tabs: ``pgws:user:<user>`` and
#: ``pgws:tab:<user>:<tabWindowId>``. Clients may subscribe to their own only.
STREAM_PREFIX = "pgws:"
USER_STREAM = STREAM_PREFIX + "user:"
TAB_STREAM = STREAM_PREFIX + "tab:"


def user_stream(user: str) -> str:
    """The durable channel of pushes to ``user``."""
    return USER_STREAM + user


def tab_stream(user: str, tab_window_id: str) -> Optional[str]:
    """The durable channel of pushes to one tab of ``user`` (None if the name would be too
    long for a channel)."""
    name = f"{TAB_STREAM}{user}:{tab_window_id}"
    return name if name_problem(name) is None else None


def parse_tab_stream(channel: str) -> Optional[Tuple[str, str]]:
    """(user, tab window id) of a tab's durable channel, or None if ``channel`` is not one.

    Tab window ids never hold ``:``, so the id is what follows the last one and the user
    is everything between the prefix and it (user ids may hold ``:``).
    """
    if not channel.startswith(TAB_STREAM):
        return None
    user, colon, tab = channel[len(TAB_STREAM):].rpartition(":")
    if not colon or not user or not tab:
        return None
    return user, tab


class Push(PubSub):
    """websocket-push's model on pgws_sync: push to users, to one tab, or to rooms.

    Backend services send JSON messages as a NOTIFY on ``push_channel`` (or a
    Redis ``PUBLISH`` with ``source=RedisSource(...)``): ``{"pushToUser": u,
    "payload": P}`` (optionally with ``"tabWindowId"``), ``{"pushToRoom": r,
    "payload": P}``, or ``{"guestId": g, "authUserId": u}``. Each recipient
    gets P's JSON text as one text frame. Clients join rooms with
    ``{"joinRoom": r}`` / ``{"leaveRoom": r}``; a room is a pub/sub channel.
    Hooks: :meth:`get_user`, :meth:`get_guest`, :meth:`permit_connection`,
    :meth:`permit_join`; a subclass overriding :meth:`on_connect` calls
    ``super().on_connect`` first. Identity comes from the app: by default a
    socket is anonymous until :meth:`get_user` says otherwise.

    :param listener: the source of publications, and of backend messages unless ``source``
        says otherwise.
    :param source: where backend messages come from besides the listener's NOTIFYs on
        ``push_channel`` (e.g. a :class:`RedisSource`; default: the listener alone).
    :param push_channel: the channel backend messages travel on.
    :param tab_windows: send each socket ``{"tabWindowId": "<token>"}`` first.
    :param user_header: a request header to take the user id from (None: trust no header).
        Only behind a proxy that sets it and strips it from what clients send.
    :param guest_header: a request header to take a guest id from, when there is no user
        (None: trust no header); the same warning applies.
    :param auth_key: the secret that signs guest-to-user AuthEvents (``sig``, see
        :func:`sign_auth_event`); without it no AuthEvent is acted on, since any database
        role could send one.
    :param **options: those of :class:`PubSub`.
    """

    def __init__(
        self,
        listener: Source,
        *,
        source: Optional[Source] = None,
        push_channel: str = DEFAULT_PUSH_CHANNEL,
        tab_windows: bool = True,
        user_header: Optional[str] = None,
        guest_header: Optional[str] = None,
        auth_key: Optional[Union[str, bytes]] = None,
        **options: Any,
    ) -> None:
        self.push_source: Source = listener if source is None else source
        self.push_channel = push_channel
        self.tab_windows = tab_windows
        self.user_header = user_header
        self.guest_header = guest_header
        if auth_key is not None and len(auth_key) < 16:
            raise ConfigError("auth_key must be at least 16 characters (a random secret)")
        self.auth_key = auth_key
        # The upgrade request of each socket, only if permit_join wants it later.
        self._keep_requests = type(self).permit_join is not Push.permit_join
        self._requests: Dict[Connection, Request] = {}
        self._requests_lock = threading.Lock()  # guards _requests
        super().__init__(listener, **options)
        self._pushes: _Pushes = (_DurablePushes(self) if self.channels.durable
                                 else _NotifyPushes(self))
        if self.push_source is listener and push_channel in (self.pubsub_channel,
                                                              self.control_channel):
            raise ConfigError(f"push_channel is {push_channel!r}, as pubsub_channel or "
                              "control_channel is; give them different names")
        self.add_source(self.push_source, _PushSink(self), [push_channel], name="push_source")
        if self.push_source is not listener and push_channel != self.pubsub_channel:
            # NOTIFYs on the push channel are read too: both sources at once
            self.add_source(listener, _PushSink(self), [push_channel], name="push_notify")

    # ---------------------------------------------------- application hooks

    def get_user(self, request: Request) -> Optional[str]:
        """The user id of a new socket, or None for none (called once, before the upgrade).

        Override it with your app's authentication (the session, a token). The
        default trusts no client: None, unless the endpoint was given
        ``user_header`` (only behind a proxy that sets and strips it).
        """
        if self.user_header is None:
            return None
        return request.headers.get(self.user_header) or None

    def get_guest(self, request: Request) -> Optional[str]:
        """The guest id of a new socket that has no user, or None (called once, before the
        upgrade). A guest gets no user's pushes; :meth:`authenticate` moves it to a user.
        Default: None, unless the endpoint was given ``guest_header``."""
        if self.guest_header is None:
            return None
        return request.headers.get(self.guest_header) or None

    def permit_connection(self, request: Request) -> bool:
        """Whether to accept this upgrade at all (False: HTTP 403). Default: yes."""
        return True

    SUBSCRIPTION_HOOK = "permit_join"

    def _decides_subscriptions(self) -> bool:
        return type(self).permit_join is not Push.permit_join

    def permit_join(self, user: Optional[str], room: str, request: Request) -> bool:
        """Whether the socket of ``user`` (None: anonymous) may join ``room``. Default: yes
        (a durable endpoint must override it, or be made with ``public=True``).

        ``request`` is the socket's upgrade request. Also decides pub/sub
        subscriptions, which are the same thing.
        """
        return True

    def presence_info(self, conn: Connection) -> Dict[str, Any]:
        """A room member's public info: ``{"user": <id>}`` when the socket has a user, else
        ``{}``."""
        user = conn.metadata.get("user")
        return {} if user is None else {"user": user}

    # ---------------------------------------------------- server-side API

    def push_to_user(self, user: str, payload: Any, *,
                     tab_window_id: Optional[str] = None, json_text: bool = False) -> None:
        """Send ``payload`` (a Python value, sent as JSON; JSON text as written with
        ``json_text=True``) to every socket of ``user``, or one tab, in every worker. On a
        durable endpoint it goes into the user's (or the tab's) stream in the log, so a tab
        that reconnects gets it too."""
        self._pushes.to_user(user, payload, tab_window_id=tab_window_id, json_text=json_text)

    def push_to_room(self, room: str, payload: Any, *, json_text: bool = False) -> None:
        """Send ``payload`` (as :meth:`push_to_user` takes it) to every socket in ``room``, in
        every worker (on a durable endpoint through the log: subscribers resume it)."""
        self._pushes.to_room(room, payload, json_text=json_text)

    def authenticate(self, guest: str, user: str) -> None:
        """Move guest ``guest``'s sockets to user ``user``, in every worker (a signed
        AuthEvent: needs ``auth_key``)."""
        if self.auth_key is None:
            raise ConfigError("authenticate() needs Push(..., auth_key=<a secret every worker "
                              "shares>): AuthEvents are signed so that no database role can "
                              "forge one")
        self.send_backend_message(AuthEvent(guest, user,
                                            sign_auth_event(self.auth_key, guest, user)))

    def disconnect_user(self, user: str, *, code: int = 4000, reason: str = "") -> None:
        """Close every socket of ``user``, in every worker and host, with ``code`` and
        ``reason`` (:meth:`PubSub.disconnect` with ``user=user``): a logout that reaches
        every open tab. 4400-4499 tell pgws.js not to reconnect."""
        if not isinstance(user, str) or not user:
            raise InvalidPayload("disconnect_user() needs a user id (a non-empty string)")
        self.disconnect(code=code, reason=reason, user=user)

    def send_backend_message(self, message: BackendMessage) -> None:
        """Send ``message`` through the push source, exactly as a backend service would.

        Raises :class:`InvalidPayload` for a name receivers would refuse (not
        a non-empty string of at most 200 characters), :class:`PayloadTooLarge`
        when a NOTIFY would reach 8000 bytes, :class:`PublishFailed`
        (PostgreSQL) or :class:`RedisPublishFailed` when the source does not
        take it.
        """
        text = format_backend_message(message)
        parse_backend_message(text)  # InvalidPayload now, not a warning in every worker later
        publish = getattr(self.push_source, "publish", None)
        if self.push_source is self.listener:
            self.publisher.notify(check_notify_size(text, self.push_channel),
                                  channel=self.push_channel)
        elif publish is not None:
            publish(self.push_channel, text)
        else:
            raise ConfigError(f"the push source {type(self.push_source).__name__} cannot publish")

    # ---------------------------------------------------- endpoint hooks

    def connection_audiences(self, request: Request) -> Sequence[str]:
        return ()  # reachable only once on_connect has sent the tab window frame

    def on_connect(self, conn: Connection, request: Request) -> None:
        """Permit, identify, send the tab window frame, and join the user's key."""
        try:
            permitted = self.permit_connection(request)
        except Exception:  # an application hook: refuse, log
            logger.exception("permit_connection failed; refused the socket")
            raise Refused(500, "permit_connection failed") from None
        if not permitted:
            raise Refused(403, "connection not permitted")
        user = self._identify(request)
        if self.tab_windows:
            token = secrets.token_urlsafe(16)
            conn.send(tab_window_frame(token))
            conn.metadata["tabWindowId"] = token
            self.hub.join(conn, TAB_PREFIX + token)
        if user is not None:
            conn.metadata["user"] = user
            self.hub.join(conn, USER_PREFIX + user)
            self._pushes.identified(conn, user)
        else:
            guest = self._identify(request, self.get_guest, "guest")
            if guest is not None:
                conn.metadata["guest"] = guest
                self.hub.join(conn, GUEST_PREFIX + guest)
        if self._keep_requests:
            with self._requests_lock:
                self._requests[conn] = request

    def _identify(self, request: Request,
                  hook: Optional[Callable[[Request], Optional[str]]] = None,
                  what: str = "user") -> Optional[str]:
        """What ``hook`` (default :meth:`get_user`) says, checked as a name."""
        hook = self.get_user if hook is None else hook
        try:
            name = hook(request)
        except Exception:  # an application hook: refuse, log
            logger.exception("get_%s failed; refused the socket", what)
            raise Refused(500, f"get_{what} failed") from None
        if name is None or name == "":
            return None
        problem = name_problem(name)
        if problem is not None:
            raise Refused(400, f"invalid {what} id: {problem}")
        return str(name)

    def _forget(self, conn: Connection) -> None:
        super()._forget(conn)
        if self._keep_requests:
            with self._requests_lock:
                self._requests.pop(conn, None)

    def can_subscribe(self, conn: Connection, channel: str) -> bool:
        own = self._pushes.may_read(conn, channel)
        if own is not None:
            return own
        with self._requests_lock:
            request = self._requests.get(conn)
        return self.permit_join(conn.metadata.get("user"), channel, request)  # type: ignore[arg-type]

    def on_message(self, conn: Connection, data: Frame) -> None:
        """Room requests here; everything else is the pub/sub protocol."""
        try:
            request = parse_room_request(data)
        except ProtocolError as exc:
            conn.send(room_error_frame(exc.reason))
            return
        if request is None:
            super().on_message(conn, data)
            return
        if request.join:
            problem = self._subscribe_problem(conn, request.room, "join room")
            if problem is not None:
                conn.send(room_error_frame(problem, request.room))
                return
            # durable: the streams thread answers once the room is joined, with the position
            # it is live from, so a client can resume it before any message came
            durable = self.channels.durable
            answer: Reply = SubscribeAnswer(
                partial(joined_at_frame, request.room),
                partial(room_error_frame, room=request.room)) if durable else False
            try:
                self.subscribe(conn, request.room, reply=answer)
            except LogUnavailable as exc:  # the durable log is not answering: try again
                conn.send(room_error_frame(str(exc), request.room))
                return
            if durable:
                return
        else:
            self.unsubscribe(conn, request.room)
        conn.send(room_frame(request))

    def resync_channels(self, conn: Connection) -> Optional[Sequence[str]]:
        """None for a socket that has not had its tab window frame yet (it must be the first)."""
        if self.tab_windows and "tabWindowId" not in conn.metadata:
            return None
        return self.subscriptions(conn)

    # ---------------------------------------------------- internals

    def deliver_backend_messages(self, batch: Sequence[Notification]) -> None:
        """Hand each backend message to its sockets, in order (on the source's thread)."""
        pending: List[Tuple[str, Frame]] = []
        for note in batch:
            try:
                message = parse_backend_message(note.payload)
            except InvalidPayload as exc:
                logger.warning("dropped a push message on channel %r: %s (%s)",
                               note.channel, exc, preview(note.payload))
                continue
            if isinstance(message, ToRoom):
                pending.append((SUBSCRIPTION_PREFIX + message.room, message.payload))
            elif isinstance(message, ToUser):
                if message.tab_window_id is None:
                    pending.append((USER_PREFIX + message.user, message.payload))
                    continue
                key = TAB_PREFIX + message.tab_window_id
                if any(c.metadata.get("user") == message.user for c in self.hub.members(key)):
                    pending.append((key, message.payload))
            else:
                self.hub.fan_out(pending)  # what came before reaches the guest's sockets
                pending = []
                self._log_in(message)
        self.hub.fan_out(pending)

    def _log_in(self, event: AuthEvent) -> None:
        if self.auth_key is None or not auth_event_signed(self.auth_key, event):
            logger.warning("ignored an AuthEvent for guest %r: %s", event.guest,
                           "this Push has no auth_key" if self.auth_key is None else
                           "its sig is missing or wrong (forged, or signed with another key)")
            return
        moved = 0
        for conn in self.hub.members(GUEST_PREFIX + event.guest):
            self.hub.leave(conn, GUEST_PREFIX + event.guest)
            if self.hub.join(conn, USER_PREFIX + event.user):
                conn.metadata.pop("guest", None)
                conn.metadata["user"] = event.user
                moved += 1
                self._pushes.identified(conn, event.user)
        logger.info("guest %r logged in as %r: %d sockets moved", event.guest, event.user, moved)


class _PushSink:
    """Feeds a :class:`Push` endpoint from its push source."""

    def __init__(self, endpoint: Push) -> None:
        self.endpoint = endpoint

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        self.endpoint.deliver_backend_messages(batch)

    def on_resync(self, reason: str) -> None:
        if self.endpoint.push_source is not self.endpoint.listener:  # else PubSub said it
            self.endpoint.on_resync(reason)


class _Pushes:
    """How a :class:`Push` reaches users and rooms: backend messages (NOTIFY), chosen once."""

    def __init__(self, endpoint: Push) -> None:
        self.endpoint = endpoint

    def to_user(self, user: str, payload: Any, *, tab_window_id: Optional[str],
                json_text: bool) -> None:
        body = str(message_body(json_message(payload, json_text)))
        self.endpoint.send_backend_message(ToUser(user, body, tab_window_id))

    def to_room(self, room: str, payload: Any, *, json_text: bool) -> None:
        body = str(message_body(json_message(payload, json_text)))
        self.endpoint.send_backend_message(ToRoom(room, body))

    def identified(self, conn: Connection, user: str) -> None:
        """``conn`` belongs to ``user`` now (it connected, or its guest logged in)."""

    def may_read(self, conn: Connection, channel: str) -> Optional[bool]:
        """Whether ``conn`` may subscribe to ``channel``, if this delivery decides it (else
        None: :meth:`Push.permit_join` does)."""
        return None


_NotifyPushes = _Pushes


class _DurablePushes(_Pushes):
    """Pushes through the log: each user and each tab has its own durable channel."""

    def to_user(self, user: str, payload: Any, *, tab_window_id: Optional[str],
                json_text: bool) -> None:
        channel = (user_stream(user) if tab_window_id is None
                   else tab_stream(user, tab_window_id))
        if channel is None or name_problem(channel) is not None:
            raise InvalidPayload("the user id is too long for a durable stream")
        self.endpoint.publish(channel, payload, json_text=json_text)

    def to_room(self, room: str, payload: Any, *, json_text: bool) -> None:
        self.endpoint.publish(room, payload, json_text=json_text)

    def identified(self, conn: Connection, user: str) -> None:
        """Send ``{"event": "streams", "user": ..., "tab": ...}``: the durable channels of
        this socket's user and tab, for the client to subscribe to (and resume)."""
        frame = {"event": "streams", "user": user_stream(user)}
        tab = conn.metadata.get("tabWindowId")
        if tab is not None and tab_stream(user, tab) is not None:
            frame["tab"] = str(tab_stream(user, tab))
        conn.send(dumps(frame))

    def may_read(self, conn: Connection, channel: str) -> Optional[bool]:
        """A user's streams are its own (its old tabs' included); other channels are rooms."""
        if not channel.startswith(STREAM_PREFIX):
            return None
        user = conn.metadata.get("user")
        if user is None:
            return False
        tab = parse_tab_stream(channel)
        return channel == user_stream(user) or (tab is not None and tab[0] == user)
