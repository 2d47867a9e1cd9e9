"""The shared reader: one thread reads every socket, wakes its writer, pings, and notices the end."""

from __future__ import annotations

import base64
import os
import select
import socket
import threading
from typing import Any, Iterator, List

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as FrameConnection
from wsproto.events import CloseConnection, Ping, TextMessage

from pgws_sync._core import simple_ws
from pgws_sync._core.connection import GuardedSocket
from pgws_sync._threads import WakingEvent
from pgws_sync._core import reader
from pgws_sync._core.reader import reading_thread

from ..helpers import wait_for


class Socket:
    """One server socket read by the shared reader, and the wsproto client at its other end."""

    def __init__(self, ping_interval: Any = None, server: Any = None) -> None:
        self.server, self.client_sock = server or socket.socketpair()
        self.wakes = threading.Event()
        guarded = GuardedSocket(self.server, 5.0, on_close=self.wakes.set)
        key = base64.b64encode(os.urandom(16)).decode()
        self.ws = simple_ws.accept(
            {"gunicorn.socket": guarded, "HTTP_SEC_WEBSOCKET_KEY": key}, deflate=False,
            ping_interval=ping_interval, max_message_size=1 << 16, subprotocols=None,
            event_class=lambda: WakingEvent(self.wakes.set), thread_class=reading_thread)
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.client_sock.recv(4096)
        self.client = FrameConnection(ConnectionType.CLIENT)

    def send(self, event: Any) -> None:
        self.client_sock.sendall(self.client.send(event))

    def events(self) -> List[Any]:
        self.client_sock.settimeout(10)
        self.client.receive_data(self.client_sock.recv(65536))
        return list(self.client.events())

    def close(self) -> None:
        self.server.close()
        self.client_sock.close()


@pytest.fixture(params=["epoll", "selector"])
def sockets(request, monkeypatch) -> Iterator[List[Socket]]:
    """Sockets read by a shared reader of its own, polling with epoll (Linux) or with the
    selector every other platform uses."""
    if request.param == "selector":
        monkeypatch.setattr(reader, "_EpollPoller", reader._SelectorPoller)
    elif not hasattr(select, "epoll"):
        pytest.skip("no epoll on this platform")
    reader.stop_reader()  # the next socket starts a reader with this poller
    made: List[Socket] = []
    yield made
    started = reader._state["reader"]
    if made and started is not None:  # the sockets were read by the poller asked for
        assert isinstance(started._poller, reader._SelectorPoller) == (
            request.param == "selector")
    for s in made:
        s.close()
    reader.stop_reader()


def test_messages_from_many_sockets_reach_their_own_buffers(sockets):
    for _ in range(20):
        sockets.append(Socket())
    for i, s in enumerate(sockets):
        s.send(TextMessage(f"from {i}"))
    for i, s in enumerate(sockets):
        wait_for(lambda: simple_ws.inbound(s.ws), message=f"socket {i}'s message")
        assert simple_ws.inbound(s.ws) == [f"from {i}"] and s.wakes.is_set()
    threads = [t for t in threading.enumerate() if t.name == "pgws-reader"]
    assert len(threads) == 1 and threads[0].daemon  # one thread for all of them


def test_a_client_close_is_answered_and_ends_the_socket(sockets):
    s = Socket()
    sockets.append(s)
    s.send(CloseConnection(1000, "bye"))
    wait_for(lambda: not s.ws.thread.is_alive(), message="the reader to finish the socket")
    assert not s.ws.connected
    event = s.events()[0]
    assert isinstance(event, CloseConnection) and event.code == 1000


def test_pings_go_out_and_a_missing_pong_closes_with_1008(sockets):
    s = Socket(ping_interval=0.2)
    sockets.append(s)
    got: List[Any] = []
    wait_for(lambda: got.extend(s.events()) or any(isinstance(e, Ping) for e in got),
             message="a ping")
    s.send(next(e for e in got if isinstance(e, Ping)).response())  # answer the first
    # the next one goes unanswered: the socket is closed with 1008
    wait_for(lambda: got.extend(s.events()) or any(isinstance(e, CloseConnection) for e in got),
             message="the 1008 close")
    close = next(e for e in got if isinstance(e, CloseConnection))
    assert close.code == 1008 and sum(isinstance(e, Ping) for e in got) >= 2
    wait_for(lambda: not s.ws.thread.is_alive(), message="the socket to end")


def test_a_socket_is_read_again_after_each_read(sockets):
    """Registrations are one-shot: the reader re-arms a socket after reading it."""
    s = Socket()
    sockets.append(s)
    for i in range(3):
        s.send(TextMessage(f"message {i}"))
        wait_for(lambda: len(simple_ws.inbound(s.ws)) == i + 1, message=f"message {i}")
    assert simple_ws.inbound(s.ws) == ["message 0", "message 1", "message 2"]
    assert s.ws.thread.is_alive()


def test_a_new_socket_on_a_closed_ones_descriptor_replaces_it(sockets):
    """A socket closed without the reader seeing it: the next socket given its descriptor
    number ends it and is read in its place."""
    old = Socket()
    sockets.append(old)
    number = old.server.fileno()
    old.server.close()  # the kernel drops its registration; the reader sees nothing
    server, client_sock = socket.socketpair()
    if server.fileno() != number:  # give the new socket the old one's number
        os.dup2(server.fileno(), number)
        server.close()
        server = socket.socket(fileno=number)
    new = Socket(server=(server, client_sock))
    sockets.append(new)
    wait_for(lambda: not old.ws.thread.is_alive(), message="the old socket to be ended")
    assert not old.ws.connected
    new.send(TextMessage("hello"))
    wait_for(lambda: simple_ws.inbound(new.ws) == ["hello"], message="the new socket's message")


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux's")
def test_registration_keeping_the_gil_is_one_shot_and_read_back_by_select_epoll():
    poller = select.epoll()
    server, client = socket.socketpair()
    try:
        assert reader._register_holding_gil is not reader._register_fallback
        assert reader._register_holding_gil(poller.fileno(), server.fileno())
        client.send(b"x")
        assert poller.poll(5) == [(server.fileno(), select.EPOLLIN)]
        assert poller.poll(0.05) == []  # one-shot: disarmed until re-armed
        poller.modify(server.fileno(), reader._ONE_READ)
        assert poller.poll(5) == [(server.fileno(), select.EPOLLIN)]
        # registered already: refused, and the caller falls back to select.epoll
        assert not reader._register_holding_gil(poller.fileno(), server.fileno())
    finally:
        poller.close()
        server.close()
        client.close()
