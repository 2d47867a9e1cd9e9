"""The one adapter to simple-websocket's undocumented parts (pinned; tests/core/test_simple_ws.py)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from simple_websocket import Client as _Client  # type: ignore[import-untyped]
from simple_websocket import ConnectionClosed, Server
from simple_websocket import ConnectionError as HandshakeFailed
from wsproto import ConnectionType
from wsproto.connection import Connection as FrameConnection
from wsproto.events import Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from .wire import Frame, switching_protocols

__all__ = [
    "ConnectionClosed", "Frame", "HandshakeFailed", "LocalProtocolError", "PlainServer",
    "WsClient", "accept", "accept_plain", "chosen_subprotocol",
    "feed", "inbound", "owner_of", "pong_missing", "receive_size", "send_ping",
]

def header_tokens(value: Optional[str]) -> List[str]:
    """The comma-separated tokens of a header value, stripped."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


class PlainServer(Server):  # type: ignore[misc]
    """simple-websocket's server for a socket without extensions, built and answered here.

    The web server and the endpoint have already parsed and checked the request:
    simple-websocket's constructor would build wsproto's HTTP handshake (an h11
    connection) only to throw it away, so the attributes ``Base.__init__`` sets
    are set here and the 101 is written straight from the key. wsproto's frame
    parser is made when the socket first needs it (a frame from the client, a
    ping, the close): most sockets of a fan-out receive nothing for a while.
    """

    def __init__(self, sock: Any, key: str, subprotocol: Optional[str], *,
                 ping_interval: Optional[float], max_message_size: Optional[int],
                 event: Any, thread_class: Callable[..., Any]) -> None:
        # Server.__init__'s attributes
        self.environ = None
        self.subprotocols = (subprotocol,) if subprotocol else ()  # read by nothing after
        self.mode = "plain"
        # Base.__init__'s attributes, in its order
        self.subprotocol = subprotocol
        self.sock = sock
        self.receive_bytes = RECEIVE_BYTES
        self.ping_interval = ping_interval
        self.max_message_size = max_message_size
        self.pong_received = True
        self.input_buffer: List[Frame] = []
        self.incoming_message = None
        self.incoming_message_len = 0
        self.connected = False
        self.is_server = True
        self.close_reason = CloseReason.NO_STATUS_RCVD
        self.close_message = None
        self.selector_class = None  # read only by simple-websocket's own thread, never run here
        self.event = event
        self._frames: Optional[FrameConnection] = None
        sock.send(switching_protocols(key, subprotocol))
        self.connected = True
        self.thread = thread_class(target=self._thread)
        self.thread.start()

    @property
    def ws(self) -> FrameConnection:
        """wsproto's frame parser and writer for this socket, made on first use."""
        frames = self._frames
        if frames is None:
            frames = self._frames = FrameConnection(ConnectionType.SERVER)
            # wsproto appends, pops from the left and tests emptiness
            frames._events = EventList()  # type: ignore[assignment]
        return frames


#: How many bytes simple-websocket reads at a time (its default).
RECEIVE_BYTES = 4096


class EventList(List[Any]):
    """wsproto's queue of received events, as a list: an empty deque holds a block of its
    own per socket, and this queue rarely holds more than one event (docs/performance.md)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def chosen_subprotocol(offered: Optional[str], wanted: Optional[str]) -> Optional[str]:
    """``wanted`` if the client offered it in its Sec-WebSocket-Protocol header ``offered``."""
    return wanted if wanted and wanted in header_tokens(offered) else None


def accept_plain(sock: Any, key: str, subprotocol: Optional[str], *,
                 ping_interval: Optional[float], max_message_size: Optional[int], event: Any,
                 thread_class: Callable[..., Any]) -> Any:
    """Answer a checked upgrade request without extensions with a 101 on ``sock`` and return
    simple-websocket's server object for it (:class:`PlainServer`).

    ``key`` is the request's Sec-WebSocket-Key, ``subprotocol`` the one to answer with
    (one the client offered, see :func:`chosen_subprotocol`), ``event`` the object
    simple-websocket sets when something arrives.
    """
    return PlainServer(sock, key, subprotocol, ping_interval=ping_interval,
                       max_message_size=max_message_size, event=event,
                       thread_class=thread_class)


def accept(environ: Dict[str, Any], *, deflate: bool, ping_interval: Optional[float],
           max_message_size: Optional[int], subprotocols: Optional[List[str]],
           event_class: Callable[[], Any], thread_class: Callable[..., Any]) -> Any:
    """Answer the upgrade and return simple-websocket's server object for the socket.

    ``deflate``: simple-websocket's own handshake (it accepts permessage-deflate);
    otherwise :func:`accept_plain`'s, which accepts no extension.
    """
    if not deflate:
        sock = environ.get("werkzeug.socket") or environ["gunicorn.socket"]
        offered = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")
        wanted = next((p for p in subprotocols or () if p in header_tokens(offered)), None)
        return accept_plain(sock, environ["HTTP_SEC_WEBSOCKET_KEY"], wanted,
                            ping_interval=ping_interval, max_message_size=max_message_size,
                            event=event_class(), thread_class=thread_class)
    ws = Server.accept(environ, ping_interval=ping_interval, max_message_size=max_message_size,
                       subprotocols=subprotocols, event_class=event_class,
                       thread_class=thread_class)
    ws.environ = None  # read only by the handshake
    return ws


def owner_of(thread_target: Callable[[], None]) -> Any:
    """The server object whose ``thread_class`` was called with ``thread_target``.

    simple-websocket passes its bound ``_thread`` method as the target.
    """
    return getattr(thread_target, "__self__")


def receive_size(ws: Any) -> int:
    """How many bytes simple-websocket reads at a time."""
    return int(ws.receive_bytes)


def feed(ws: Any, data: bytes) -> bool:
    """Hand bytes read from the socket to ``ws``'s frame parser; False once the socket is over.

    Messages land in its input buffer (see :func:`inbound`), pings are
    answered and close frames acknowledged, all by simple-websocket itself.
    """
    ws.ws.receive_data(data)
    connected: bool = ws._handle_events()
    return connected


def inbound(ws: Any) -> List[Frame]:
    """The messages received and not yet handled, oldest first (the caller pops them)."""
    buffer: List[Frame] = ws.input_buffer
    return buffer


def limit_inbound(ws: Any, limit: Tuple[int, int]) -> None:
    """Mark ``ws`` so that :func:`inbound_over_limit` says when more than ``limit[0]``
    messages or ``limit[1]`` bytes of them wait to be handled (a tuple sockets may share)."""
    ws.pgws_inbound_limit = limit


def inbound_over_limit(ws: Any) -> bool:
    """Whether more messages (or bytes) wait than :func:`limit_inbound` allows."""
    limit = getattr(ws, "pgws_inbound_limit", None)
    if limit is None:
        return False
    buffer = inbound(ws)
    return bool(len(buffer) > limit[0] or sum(len(m) for m in buffer) > limit[1])


def pong_missing(ws: Any) -> bool:
    """Whether the pong answering the last ping has not come back."""
    return not ws.pong_received


def send_ping(ws: Any) -> None:
    """Send a ping on ``ws``'s socket and expect its pong."""
    ws.pong_received = False
    ws.sock.send(ws.ws.send(Ping()))


class WsClient(_Client):  # type: ignore[misc]
    """simple-websocket's client (for :mod:`pgws_sync.testing`), minus two bugs: frames that
    arrive in the same read as the handshake's answer waited for the next read, and the Host
    header left out a port other than the scheme's default (browsers send it)."""

    def handshake(self) -> None:
        if self.port not in (80, 443):  # connected already: the name is used for Host only
            self.host = f"{getattr(self, 'host')}:{self.port}"
        super().handshake()
        self.connected = self._handle_events()

    def waiting(self) -> List[Frame]:
        """The frames received and not read yet."""
        buffer: List[Frame] = self.input_buffer
        return buffer
