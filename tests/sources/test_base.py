"""SourceThread, the machinery every source shares, driven through a small line-protocol source.

The source below connects to a TCP server the test runs, reads ``channel payload``
lines and hands them on: the same hooks the Listener and RedisSource fill in.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from typing import Any, Dict, Iterator, List, Sequence

import pytest

from pgws_sync.errors import ListenerStopped
from pgws_sync.sources.base import Notification
from pgws_sync.sources.base import MAX_BATCH, NoAnswer, SourceThread, Stopping, live_sources

from ..helpers import wait_for


class LineSource(SourceThread):
    _thread_prefix = "test-lines"
    _what = "line source"
    _log = logging.getLogger("tests.line_source")
    _stopped_message = "this LineSource was stopped"
    _connect_errors = (OSError, NoAnswer)
    _serve_errors = (OSError, NoAnswer)

    def __init__(self, port: int) -> None:
        super().__init__(min_reconnect=0.05, max_reconnect=0.2, heartbeat_interval=10.0,
                         connect_timeout=5.0, coalesce=0.0)
        self.port = port

    def _validate_channel(self, channel: str) -> str:
        return channel

    def _describe(self) -> Dict[str, Any]:
        return {"port": self.port}

    def _open(self) -> None:
        self._conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        with self._lock:
            self._listening = self._wanted()

    def _serve(self) -> None:
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._conn, selectors.EVENT_READ, "conn")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                for key, _ in sel.select(1.0):
                    if key.data == "wake":
                        self._drain_wake()
                        if self._stopped:
                            raise Stopping()
                        continue
                    data = self._conn.recv(65536)
                    if not data:
                        raise ConnectionResetError("the server closed the connection")
                    buffer += data
                *lines, buffer = buffer.split(b"\n")
                batch = [Notification(*line.decode().split(" ", 1)) for line in lines if line]
                if batch:
                    self._deliver(batch)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Server:
    """Accepts the source's connections; ``send`` writes to the newest one."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: List[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def send(self, text: str) -> None:
        self.accepted[-1].sendall(text.encode())

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.batches: List[List[Notification]] = []
        self.resyncs: List[str] = []
        self.fail = fail

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        self.batches.append(list(batch))
        if self.fail:
            raise RuntimeError("a broken sink")

    def on_resync(self, reason: str) -> None:
        self.resyncs.append(reason)

    def payloads(self) -> List[str]:
        return [n.payload for batch in self.batches for n in batch]


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def source(server: Server) -> Iterator[LineSource]:
    s = LineSource(server.port)
    yield s
    s.stop()


def test_each_sink_gets_its_channels_in_order_in_slices(server, source):
    a, b, broken = Sink(), Sink(), Sink(fail=True)
    source.add_sink(broken, ["a"])
    source.add_sink(a, ["a"])
    source.add_sink(b, ["b"])
    assert source.wait_connected(10)
    wait_for(lambda: server.accepted, message="the connection")
    server.send("".join(f"a {i}\n" for i in range(150)) + "b only\n")
    wait_for(lambda: len(a.payloads()) == 150, message="150 notifications")
    assert a.payloads() == [str(i) for i in range(150)]  # a broken sink stopped nobody
    assert max(len(batch) for batch in a.batches) <= MAX_BATCH
    wait_for(lambda: b.payloads() == ["only"], message="b's notification")
    status = source.status()
    assert status["connected"] and status["channels"] == ["a", "b"] and status["port"] == server.port
    assert source in live_sources()


def test_a_lost_connection_reconnects_and_every_sink_resyncs(server, source):
    sink = Sink()
    source.add_sink(sink, ["a"])
    assert source.wait_connected(10)
    wait_for(lambda: server.accepted, message="the connection")
    server.accepted[-1].close()
    wait_for(lambda: sink.resyncs, message="a resync")
    assert sink.resyncs == ["line source reconnected after: the server closed the connection"]
    # the source saw its new connection before the test server's accept loop noted it
    wait_for(lambda: len(server.accepted) == 2, message="the second connection")
    assert len(server.accepted) == 2 and source.wait_connected(10)
    server.send("a after\n")
    wait_for(lambda: sink.payloads() == ["after"], message="delivery after the reconnect")


def test_a_server_that_is_down_is_retried_with_backoff(caplog):
    caplog.set_level(logging.INFO, logger="tests.line_source")
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    source = LineSource(port)
    try:
        source.add_sink(Sink(), ["a"])
        source.start()
        wait_for(lambda: sum("reconnecting in" in r.getMessage() for r in caplog.records) >= 3,
                 message="three retries")
        status = source.status()
        assert not status["connected"] and "refused" in status["error"].lower()
        assert any("line source cannot connect" in r.getMessage() for r in caplog.records)
    finally:
        source.stop()


def test_stop_ends_the_thread_and_a_stopped_source_cannot_restart(server):
    source = LineSource(server.port)
    source.add_sink(Sink(), ["a"])
    assert source.wait_connected(10)
    thread = next(t for t in threading.enumerate() if t.name.startswith("test-lines-"))
    assert thread.daemon
    source.stop(5)
    assert not thread.is_alive() and not source.connected
    with pytest.raises(ListenerStopped, match="was stopped"):
        source.start()
