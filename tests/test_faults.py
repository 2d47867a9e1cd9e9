"""Bad clients under real gunicorn: each is dropped and everyone else keeps receiving."""

import json
import socket
import struct

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Ping, Pong, TextMessage

from .helpers import (
    Ws,
    http_get,
    pg_notify,
    raw_upgrade,
    read_frame,
    serve,
    socket_closed_by_peer,
    value,
    wait_for,
    wait_sockets,
)

PAD = "x" * 7000  # large frames fill the stalled client's buffers quickly
ROUNDS = 60  # 4.2 MB for the pong test


def masked_frame(opcode, data, fin=True):
    mask = b"\x01\x02\x03\x04"
    size = len(data)
    head = bytes([(0x80 if fin else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def close_payload(frame_payload):
    return struct.unpack("!H", frame_payload[:2])[0], frame_payload[2:].decode()


@pytest.fixture(scope="module")
def shared_strict(pg_dsn):
    g = serve(pg_dsn, options={"max_queue": 4, "write_timeout": 3.0, "ping_interval": None,
                               "max_message_size": 4096}).wait_up()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def shared_pinging(pg_dsn):
    g = serve(pg_dsn, options={"ping_interval": 0.5}).wait_up()
    yield g
    g.stop()


# The tests count the sockets of the module's servers: each starts once the sockets of earlier
# tests (closed as those tests ended) are gone.


@pytest.fixture
def strict(shared_strict):
    wait_sockets(shared_strict, 0)
    return shared_strict


@pytest.fixture
def pinging(shared_pinging):
    wait_sockets(shared_pinging, 0)
    return shared_pinging


def publish_until_dropped(server, sender, healthy, expected_sockets, limit=5000):
    """Send one notification at a time (each its own poll), until the slow socket is dropped.

    The healthy client reads every message before the next is sent, so it must
    see each one, in order.
    """
    for i in range(limit):
        pg_notify(sender, "pgws", 'default,{"i": %d, "pad": "%s"}' % (i, PAD))
        assert healthy.recv_json()["payload"]["i"] == i
        if i % 20 == 19 and server.stats()["sockets"] == expected_sockets:
            return i + 1
    raise AssertionError(f"the slow client was not dropped after {limit} messages")


def test_client_that_never_reads_is_dropped_and_others_lose_nothing(strict, sender, clients):
    healthy = clients(strict.ws_url())
    other = clients(strict.ws_url())
    stalled, head = raw_upgrade(strict.port, rcvbuf=4096)
    assert head.startswith(b"HTTP/1.1 101")
    wait_sockets(strict, 3)
    sent = publish_until_dropped(strict, sender, healthy, expected_sockets=2)
    print(f"stalled client dropped after {sent} messages")
    for i in range(sent):
        assert other.recv_json()["payload"]["i"] == i
    # the write that stays blocked past write_timeout ends the connection
    wait_for(lambda: socket_closed_by_peer(stalled), timeout=20, message="the server to drop it")
    stalled.close()
    pg_notify(sender, "pgws", 'default,{"after": true}')
    assert healthy.recv_json()["payload"] == {"after": True}
    assert other.recv_json()["payload"] == {"after": True}
    assert "send queue is full" in strict.log()


def test_client_that_catches_up_sees_close_1013(strict, sender, clients):
    healthy = clients(strict.ws_url())
    paused, head = raw_upgrade(strict.port, rcvbuf=4096)
    wait_sockets(strict, 2)
    publish_until_dropped(strict, sender, healthy, expected_sockets=1)
    # it reads again: what was already written arrives in order, then the close frame
    last = -1
    while True:
        opcode, payload = read_frame(paused)
        if opcode == 0x8:
            assert close_payload(payload) == (1013, "send queue full")
            break
        assert opcode == 0x1
        i = json.loads(payload)["payload"]["i"]
        assert i == last + 1
        last = i
    paused.close()


def test_oversized_client_message_closes_with_1009(strict, sender, clients):
    healthy = clients(strict.ws_url())
    big = clients(strict.ws_url())
    wait_sockets(strict, 2)
    big.client.send("y" * 5000)
    assert big.expect_close()[0] == 1009
    wait_sockets(strict, 1)
    pg_notify(sender, "pgws", 'default,{"fine": 1}')
    assert healthy.recv_json()["payload"] == {"fine": 1}


def test_client_that_never_answers_pings_is_closed(pinging, sender, clients):
    healthy = clients(pinging.ws_url())  # simple-websocket answers pings itself
    mute, head = raw_upgrade(pinging.port)
    wait_sockets(pinging, 2)
    frames = []
    while True:
        opcode, payload = read_frame(mute)
        frames.append(opcode)
        if opcode == 0x8:
            break
    assert frames[0] == 0x9  # a ping first, never answered
    assert close_payload(payload)[0] == 1008
    wait_sockets(pinging, 1)
    pg_notify(sender, "pgws", 'default,{"alive": 1}')
    assert healthy.recv_json()["payload"] == {"alive": 1}
    mute.close()


@pytest.mark.parametrize("garbage", [
    b"\x00" * 64,                                   # not a frame at all
    b"GET / HTTP/1.1\r\n\r\n",
    masked_frame(0x1, b"\xff\xfe invalid utf-8"),   # text frame that is not UTF-8
    masked_frame(0x3, b"reserved opcode"),
    bytes([0x81, 0x05]) + b"hello",                 # unmasked client frame
    masked_frame(0x9, b"p" * 200),                  # control frame over 125 bytes
])
def test_garbage_frames_end_only_that_socket(strict, sender, clients, garbage):
    healthy = clients(strict.ws_url())
    bad, head = raw_upgrade(strict.port)
    wait_sockets(strict, 2)
    bad.sendall(garbage)
    wait_for(lambda: socket_closed_by_peer(bad), message="the server to drop the garbage sender")
    bad.close()
    wait_sockets(strict, 1)
    pg_notify(sender, "pgws", 'default,{"ok": true}')
    assert healthy.recv_json()["payload"] == {"ok": True}


def test_client_messages_are_ignored_but_the_socket_stays(strict, sender, clients):
    talker = clients(strict.ws_url())
    wait_sockets(strict, 1)
    talker.client.send("hello server")
    talker.client.send(b"\x00\x01binary")
    pg_notify(sender, "pgws", 'default,{"n": 1}')
    assert talker.recv_json()["payload"] == {"n": 1}


def vanish(port):
    sock, head = raw_upgrade(port)
    assert head.startswith(b"HTTP/1.1 101")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, no close frame


def test_1000_connect_disconnect_cycles_leave_no_residue(pg_dsn, sender):
    g = serve(pg_dsn, threads=16).wait_up()
    try:
        # fill gunicorn's thread pool first (as many sockets as the worker takes: 16 threads
        # less the 4 max_sockets="auto" keeps for plain requests): its threads live on
        warm = [Ws(g.ws_url()) for _ in range(12)]
        wait_sockets(g, 12)
        for ws in warm:
            ws.close()
        wait_sockets(g, 0)
        before = g.stats()
        for i in range(1000):
            if i % 2:
                vanish(g.port)
            else:
                ws = Ws(g.ws_url())
                ws.close()
        keeper = Ws(g.ws_url())
        wait_for(lambda: g.stats()["sockets"] == 1, message="every gone socket unregistered")
        pg_notify(sender, "pgws", 'default,{"after": 1000}')
        assert keeper.recv_json()["payload"] == {"after": 1000}
        keeper.close()
        wait_for(lambda: g.stats()["sockets"] == 0, message="no sockets")
        wait_for(lambda: g.stats()["threads"] == before["threads"],
                 message=f"threads back to {before['threads']}: {g.stats()['thread_names']}")
        after = g.stats()
        assert after["audiences"] == 0
    finally:
        g.stop()


def test_pongs_never_interleave_with_large_frames(pg_dsn, sender):
    """The client pings all the time while the writer pushes 4 MB through a small receive
    buffer, so the server's reader thread writes pongs while data writes are blocked
    mid-frame: every frame the client parses must still be whole."""
    g = serve(pg_dsn, options={"ping_interval": None, "max_queue": 100000}).wait_up()
    sock, head = raw_upgrade(g.port, rcvbuf=2048)
    try:
        assert head.startswith(b"HTTP/1.1 101")
        wait_sockets(g, 1)
        with sender.cursor() as cur:
            for round_ in range(ROUNDS):
                cur.execute(
                    "SELECT pg_notify('pgws', format('default,{\"r\": %%s, \"i\": %%s, \"pad\": \"%%s\"}',"
                    " %s, i, repeat('p', 7000))) FROM generate_series(0, 9) AS i", (round_,))
        client = Connection(ConnectionType.CLIENT)
        got, pongs, parts, reads = [], 0, [], 0
        sock.settimeout(10)
        while len(got) < ROUNDS * 10:
            data = sock.recv(512)  # small reads: the server keeps finding the buffer full
            assert data, "server closed the socket"
            reads += 1
            if reads % 4 == 0:
                sock.sendall(client.send(Ping(b"%d" % reads)))
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, Pong):
                    pongs += 1
                    continue
                assert isinstance(event, TextMessage), event
                parts.append(event.data)
                if event.message_finished:
                    got.append(json.loads("".join(parts))["payload"])
                    parts = []
        assert [(p["r"], p["i"]) for p in got] == [(r, i) for r in range(ROUNDS) for i in range(10)]
        assert all(len(p["pad"]) == 7000 for p in got)
        assert pongs > 0
    finally:
        sock.close()
        g.stop()


def test_sockets_past_the_workers_cap_get_503_and_plain_requests_still_answer(pg_dsn, sender):
    """--threads 16: max_sockets="auto" leaves 4 threads to plain requests, so the 13th
    socket gets 503 with Retry-After before any upgrade (counted), and a plain GET answers
    at once."""
    g = serve(pg_dsn, threads=16, options={"max_sockets_per_address": 20,
                                           "metrics_path": "/metrics"}).wait_up()
    refused = 'pgws_sync_sockets_refused_total{endpoint="Pgws",status="503"}'
    socks = []
    try:
        socks = [Ws(g.ws_url()) for _ in range(12)]
        wait_sockets(g, 12)
        for _ in range(3):
            sock, head = raw_upgrade(g.port)
            sock.close()
            assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in head, head
        assert value(g, refused) == 3
        for path in ("/healthz", "/debug/stats") * 3:  # the app's own requests keep threads
            status, _body = http_get(g.url(path), timeout=5)
            assert status == 200
        pg_notify(sender, "pgws", 'default,{"still": "delivering"}')
        assert all(ws.recv_json()["payload"] == {"still": "delivering"} for ws in socks)
        socks.pop().close()
        wait_sockets(g, 11)
        socks.append(Ws(g.ws_url()))  # room again
        wait_sockets(g, 12)
    finally:
        for ws in socks:
            ws.close()
        g.stop()


def test_a_cap_per_address(pg_dsn):
    g = serve(pg_dsn, options={"max_sockets_per_address": 2}).wait_up()
    socks = []
    try:
        socks = [Ws(g.ws_url()) for _ in range(2)]
        wait_sockets(g, 2)
        sock, head = raw_upgrade(g.port)
        sock.close()
        assert head.startswith(b"HTTP/1.1 503"), head
    finally:
        for ws in socks:
            ws.close()
        g.stop()
