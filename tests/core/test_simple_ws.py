"""The simple-websocket contract: what pgws_sync._core.simple_ws relies on, against the installed release.

Each step drives the adapter over a real socket pair with a wsproto client at
the other end, so a simple-websocket (or wsproto) release that renames a
private member, changes how it builds its reader thread, or stops parsing
frames the same way fails here, not in production.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as FrameConnection
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from pgws_sync._core import simple_ws
from pgws_sync._core.wire import accept_key


class _Thread:
    """A ``thread_class`` that records its target and never runs it."""

    made: List["_Thread"] = []

    def __init__(self, target: Callable[[], None], **_: Any) -> None:
        self.target = target
        self.name = "recorded"
        self.started = False
        _Thread.made.append(self)

    def start(self) -> None:
        self.started = True


class _Event:
    def __init__(self) -> None:
        self.flag = False

    def set(self) -> None:
        self.flag = True

    def clear(self) -> None:
        self.flag = False

    def is_set(self) -> bool:
        return self.flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.flag


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


def _read_http(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the socket closed before the 101 answer"
        data += chunk
    return data.decode("latin-1")


def _accept(server: socket.socket, *, deflate: bool = False, **environ: str) -> Any:
    _Thread.made.clear()
    env = {"gunicorn.socket": server, **environ}
    return simple_ws.accept(env, deflate=deflate, ping_interval=5.0, max_message_size=64,
                            subprotocols=["two"], event_class=_Event, thread_class=_Thread)


def _frames(client: FrameConnection, sock: socket.socket) -> List[Any]:
    client.receive_data(sock.recv(65536))
    return list(client.events())


def test_plain_handshake_answers_the_key_and_the_subprotocol(pair) -> None:
    server, client = pair
    key = base64.b64encode(os.urandom(16)).decode()
    ws = _accept(server, HTTP_SEC_WEBSOCKET_KEY=key, HTTP_SEC_WEBSOCKET_PROTOCOL="one, two")
    answer = _read_http(client)
    assert answer.startswith("HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {accept_key(key)}\r\n" in answer
    assert "Sec-WebSocket-Protocol: two\r\n" in answer
    assert ws.connected and ws.subprotocol == "two"
    assert ws.environ is None  # dropped once the handshake is done
    # simple-websocket built its reader "thread" with our class and its bound _thread method
    assert len(_Thread.made) == 1 and _Thread.made[0].started
    assert simple_ws.owner_of(_Thread.made[0].target) is ws
    assert simple_ws.receive_size(ws) > 0


def test_deflate_handshake_is_simple_websockets_own(pair) -> None:
    server, client = pair
    key = base64.b64encode(os.urandom(16)).decode()
    _accept(server, deflate=True, HTTP_HOST="example", HTTP_UPGRADE="websocket",
            HTTP_CONNECTION="Upgrade", HTTP_SEC_WEBSOCKET_VERSION="13",
            HTTP_SEC_WEBSOCKET_KEY=key, HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate")
    answer = _read_http(client)
    assert answer.startswith("HTTP/1.1 101 ")
    assert "permessage-deflate" in answer


def test_feed_parses_messages_answers_pings_and_sees_the_close(pair) -> None:
    server, sock = pair
    key = base64.b64encode(os.urandom(16)).decode()
    ws = _accept(server, HTTP_SEC_WEBSOCKET_KEY=key)
    _read_http(sock)
    client = FrameConnection(ConnectionType.CLIENT)

    assert simple_ws.feed(ws, client.send(TextMessage("hé"))) is True
    assert simple_ws.feed(ws, client.send(TextMessage("second"))) is True
    assert simple_ws.inbound(ws) == ["hé", "second"]  # oldest first, popped by the caller
    assert ws.event.is_set()

    # several frames in one read, a ping between them: in order, the ping answered
    chunk = (client.send(TextMessage("a")) + client.send(Ping(b"p0"))
             + client.send(TextMessage("b")))
    assert simple_ws.feed(ws, chunk) is True
    assert simple_ws.inbound(ws)[2:] == ["a", "b"]
    del simple_ws.inbound(ws)[:]
    assert isinstance(ws.ws._events, simple_ws.EventList) and not ws.ws._events
    assert [type(e) for e in _frames(client, sock)] == [Pong]

    assert simple_ws.feed(ws, client.send(Ping(b"p1"))) is True
    events = _frames(client, sock)
    assert len(events) == 1 and isinstance(events[0], Pong) and events[0].payload == b"p1"

    assert simple_ws.feed(ws, client.send(CloseConnection(1000, "bye"))) is False
    events = _frames(client, sock)
    assert isinstance(events[0], CloseConnection) and events[0].code == 1000


def test_pings_and_missing_pongs(pair) -> None:
    server, sock = pair
    ws = _accept(server, HTTP_SEC_WEBSOCKET_KEY=base64.b64encode(os.urandom(16)).decode())
    _read_http(sock)
    client = FrameConnection(ConnectionType.CLIENT)
    assert not simple_ws.pong_missing(ws)
    simple_ws.send_ping(ws)
    assert simple_ws.pong_missing(ws)
    events = _frames(client, sock)
    assert len(events) == 1 and isinstance(events[0], Ping)
    assert simple_ws.feed(ws, client.send(events[0].response())) is True
    assert not simple_ws.pong_missing(ws)


def test_a_message_over_the_limit_is_refused_with_1009(pair) -> None:
    server, sock = pair
    ws = _accept(server, HTTP_SEC_WEBSOCKET_KEY=base64.b64encode(os.urandom(16)).decode())
    _read_http(sock)
    client = FrameConnection(ConnectionType.CLIENT)
    assert simple_ws.feed(ws, client.send(TextMessage("x" * 65))) is False
    events = _frames(client, sock)
    assert isinstance(events[0], CloseConnection) and events[0].code == 1009
    assert simple_ws.inbound(ws) == []
