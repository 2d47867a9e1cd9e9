"""The endpoint's hooks end to end under real gunicorn: refusal, subprotocols, inbound messages,
close_at, the inbound backlog bound, and on_disconnect exactly once."""

import json
import socket
import threading
import time

import pytest
import simple_websocket

from .helpers import Client, Gunicorn, http_get, pg_notify, raw_upgrade, wait_for


@pytest.fixture(scope="module")
def shared_server(pg_dsn):
    g = Gunicorn("tests.apps.hooks:app", env={"PGWS_DB_URI": pg_dsn,
                                              "PGWS_OPTIONS": json.dumps({"max_backlog": 4})})
    g.wait_up()
    yield g
    g.stop()


def hooks(server):
    return server.stats()["hooks"]


@pytest.fixture
def server(shared_server):
    """The module's server, once every socket of earlier tests has ended (asynchronously, after
    those tests): each test counts hook calls from there."""
    wait_for(lambda: (h := hooks(shared_server))["connect"] == h["disconnect"],
             message="the earlier tests' sockets to end")
    return shared_server


def hello(ws, user="anonymous"):
    assert ws.recv_json() == {"hello": user}  # sent from on_connect: the first frame


def test_inbound_text_and_binary_reach_on_message_and_replies_keep_order(server, sender, clients):
    ws = clients(server.ws_url(), headers={"X-User": "ann"})
    hello(ws, "ann")
    ws.client.send("one")
    assert ws.recv() == "echo:one"
    ws.client.send(b"\x00\x01\xff")
    assert ws.recv() == b"\xff\x01\x00"
    for _ in range(10):  # bursts of max_backlog (4) messages stay within the bound
        for i in range(4):
            ws.client.send(f"m{i}")
        assert [ws.recv() for _ in range(4)] == [f"echo:m{i}" for i in range(4)]
    pg_notify(sender, "pgws", 'default,{"n": 1}')
    assert json.loads(ws.recv())["payload"] == {"n": 1}


def test_a_failing_hook_is_logged_and_the_socket_stays_open(server, sender, clients):
    ws = clients(server.ws_url())
    other = clients(server.ws_url())
    hello(ws)
    hello(other)
    ws.client.send("boom")
    ws.client.send("after")
    assert ws.recv() == "echo:after"
    pg_notify(sender, "pgws", 'default,{"still": true}')
    assert ws.recv_json()["payload"] == {"still": True}
    assert other.recv_json()["payload"] == {"still": True}
    assert "the hook failed on purpose" in server.log()


def test_refused_in_on_connect_gets_the_http_answer_and_no_socket(server, clients):
    before = hooks(server)
    sock, head = raw_upgrade(server.port, headers={"X-Refuse": "Token expired"})
    body = sock.recv(4096)
    sock.close()
    assert head.startswith(b"HTTP/1.1 401")
    assert b"Token expired" in head + body
    after = hooks(server)
    assert after["connect"] == before["connect"]
    assert after["disconnect"] == before["disconnect"]
    ws = clients(server.ws_url())  # the server goes on accepting
    hello(ws)


def test_the_subprotocol_chosen_in_on_connect_is_answered(server):
    client = Client.connect(server.ws_url(), subprotocols=["other", "echo.v1"])
    try:
        assert client.subprotocol == "echo.v1"
        assert json.loads(client.receive(10)) == {"hello": "anonymous"}
    finally:
        client.close()
    plain = Client.connect(server.ws_url())
    try:
        assert plain.subprotocol is None
    finally:
        plain.close()


def test_close_at_closes_with_its_code_and_reason(server, sender, clients):
    ws = clients(server.ws_url(), headers={"X-Close-In": "0.3"})
    other = clients(server.ws_url())
    hello(ws)
    hello(other)
    assert ws.expect_close() == (3001, "JWT expired")
    pg_notify(sender, "pgws", 'default,{"after": 1}')
    assert other.recv_json()["payload"] == {"after": 1}


def test_an_inbound_flood_beyond_max_backlog_closes_with_1008_and_others_go_on(server, sender, clients):
    ws = clients(server.ws_url())
    other = clients(server.ws_url())
    hello(ws)
    hello(other)
    ws.client.send("block")  # the hook waits: later messages pile up
    for i in range(20):
        ws.client.send(f"flood {i}")
    pg_notify(sender, "pgws", 'default,{"during": 1}')
    assert other.recv_json()["payload"] == {"during": 1}
    other.client.send("hi")
    assert other.recv() == "echo:hi"
    http_get(server.url("/debug/release"))
    frames = []
    while True:
        try:
            frame = ws.client.receive(timeout=10)
        except simple_websocket.ConnectionClosed as exc:
            assert (exc.reason, exc.message) == (1008, "too many messages")
            break
        assert frame is not None, "no close within 10 s"
        frames.append(frame)
    assert all(not f.startswith("echo:flood") for f in frames if isinstance(f, str))


def test_an_inbound_flood_of_large_frames_is_bounded_in_bytes(pg_dsn, clients):
    """40 frames of 250 KiB (10 MiB) while the hook blocks: well within max_backlog (256
    messages) but past max_backlog_bytes (1 MiB). The server stops reading the socket once
    its backlog passes 1 MiB (the sender blocks), then closes it with 1008."""
    options = {"max_backlog": 256, "max_backlog_bytes": 1 << 20, "max_message_size": 256 << 10}
    g = Gunicorn("tests.apps.hooks:app", env={"PGWS_DB_URI": pg_dsn,
                                              "PGWS_OPTIONS": json.dumps(options)}).wait_up()
    try:
        ws = clients(g.ws_url())
        hello(ws)
        ws.client.send("block")
        sent = []

        def flood() -> None:
            try:
                for n in range(40):
                    ws.client.send("x" * (250 << 10))
                    sent.append(n)
            except (simple_websocket.ConnectionClosed, OSError):
                pass

        sender = threading.Thread(target=flood, name="flood", daemon=True)
        sender.start()
        progress = {"sent": -1, "at": time.monotonic()}

        def stalled() -> bool:
            """The sender made no progress for a second: the server stopped reading."""
            now = time.monotonic()
            if len(sent) != progress["sent"]:
                progress.update(sent=len(sent), at=now)
                return False
            return now - progress["at"] > 1.0

        # released before the backlog passed its limit, the handler could keep up with the
        # flood and rightly never close: release once the server has stopped reading
        wait_for(lambda: not sender.is_alive() or (len(sent) >= 5 and stalled()), 60,
                 message="the server to stop reading the flood")
        http_get(g.url("/debug/release"))
        echoes = 0
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            while True:
                frame = ws.client.receive(timeout=30)  # 10 MiB echoed on a busy machine
                assert frame is not None, "no close within 30 s"
                echoes += 1
        assert (closed.value.reason, closed.value.message) == (1008, "too many messages")
        sender.join(10)
        assert echoes < 40 and not sender.is_alive()
        print(f"\n{len(sent)} of 40 frames of 250 KiB sent before the close, {echoes} echoed")
    finally:
        http_get(g.url("/debug/release"))
        g.stop()


def test_on_disconnect_runs_exactly_once_however_the_socket_ended(server, clients):
    start = hooks(server)  # the earlier tests' sockets have all ended (the fixture waits)
    by_client = clients(server.ws_url())
    by_server = clients(server.ws_url())
    hello(by_client)
    hello(by_server)
    sock, head = raw_upgrade(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    wait_for(lambda: hooks(server)["open"] == start["open"] + 3, message="three opens")
    by_client.close()
    by_server.client.send("close")
    assert by_server.expect_close() == (4000, "asked to")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, no close frame
    end = wait_for(lambda: (h := hooks(server))["disconnect"] >= start["disconnect"] + 3 and h,
                   message="three disconnects")
    assert end["connect"] - start["connect"] == 3
    new_ids = end["disconnect_ids"][len(start["disconnect_ids"]):]
    assert len(new_ids) == len(set(new_ids)) == 3
