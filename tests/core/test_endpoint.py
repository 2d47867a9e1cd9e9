"""End to end under real gunicorn: format, audiences, channel names, origins, compression, health."""

import json
import socket
import uuid
import threading

import psycopg2
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from flask import Flask
from werkzeug.serving import make_server

from pgws_sync import InvalidChannel, Listener, Pgws, PgwsError
from pgws_sync._core.origin import origin_allowed
from pgws_sync._core import endpoint as endpoint_module

from ..helpers import Gunicorn, Ws, http_get, pg_notify, raw_upgrade, serve, wait_for, wait_sockets


@pytest.fixture(scope="module")
def shared_server(pg_dsn):
    g = serve(pg_dsn, channels=["pgws", "Other Channel"]).wait_up()
    yield g
    g.stop()


@pytest.fixture
def server(shared_server):
    """The module's server, once the sockets of earlier tests are gone: the tests count them."""
    wait_sockets(shared_server, 0)
    return shared_server


def kill_listener(server, sender):
    """Terminate the worker's listener backend: every socket then gets a resync frame."""
    pid = server.stats()["listener"]["backend_pid"]
    with sender.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_frame_format_same_id_and_payload_kept_exactly(server, sender, clients):
    socks = [clients(server.ws_url()) for _ in range(3)]
    wait_sockets(server, 3)
    body = '{"message": "hello, world",  "z": 1, "a": 123456789012345678901234567890, "u": "\u00e9\u2603"}'
    pg_notify(sender, "pgws", "default," + body)
    frames = [ws.recv() for ws in socks]
    decoded = [json.loads(f) for f in frames]
    assert all(list(d) == ["payload", "channel", "id"] for d in decoded)
    assert all(body in f for f in frames)  # verbatim: spacing, key order, big number, unicode
    assert decoded[0]["payload"]["a"] == 123456789012345678901234567890
    assert {d["channel"] for d in decoded} == {"pgws"}
    assert len({d["id"] for d in decoded}) == 1
    assert uuid.UUID(decoded[0]["id"]).version == 4
    pg_notify(sender, "Other Channel", 'default,{"second": true}')
    second = [ws.recv_json() for ws in socks]
    assert {d["channel"] for d in second} == {"Other Channel"}
    assert second[0]["id"] != decoded[0]["id"]


def test_audiences_route_and_empty_list_receives_nothing(server, sender, clients):
    both = clients(server.ws_url(), headers={"X-Audience": "noosa,coolum"})
    coolum = clients(server.ws_url(), headers={"X-Audience": "coolum"})
    nobody = clients(server.ws_url(), headers={"X-Audience": ""})
    wait_sockets(server, 3)
    for audience in ("noosa", "coolum", "elsewhere", "default"):
        pg_notify(sender, "pgws", audience + ',{"to": "' + audience + '"}')
    kill_listener(server, sender)  # the resync frame comes after anything sent before it
    def until_resync(ws):
        seen = []
        while True:
            frame = ws.recv_json()
            if frame.get("event") == "resync":
                return seen
            seen.append(frame["payload"]["to"])
    assert until_resync(both) == ["noosa", "coolum"]
    assert until_resync(coolum) == ["coolum"]
    assert until_resync(nobody) == []
    server.wait_up()


def test_malformed_notifications_are_dropped_with_a_warning(server, sender, clients):
    ws = clients(server.ws_url())
    wait_sockets(server, 1)
    bad = ["no separator", "default,{broken", 'default,["not", "object"]', 'default,{"a": 1} junk',
           'default,{"a": NaN}', "default," + "{" * 5000, "\u2603,{\u2603"]
    for payload in bad:
        pg_notify(sender, "pgws", payload)
    pg_notify(sender, "pgws", 'default,{"ok": 1}')
    assert ws.recv_json()["payload"] == {"ok": 1}
    log = server.log()
    assert "dropped a notification on channel 'pgws'" in log
    assert "payload starts 'no separator'" in log and "payload starts 'default,{broken'" in log
    pg_notify(sender, "pgws", 'default,{"ok": 2}')
    assert ws.recv_json()["payload"] == {"ok": 2}


def test_channel_names_work_end_to_end(pg_dsn, sender, clients):
    names = ["MixedCase", "with-dash and space", 'quo"te', "\u00e9" * 31]
    g = serve(pg_dsn, channels=names).wait_up()
    try:
        ws = clients(g.ws_url())
        wait_sockets(g, 1)
        pg_notify(sender, "mixedcase", 'default,{"n": 0}')  # a different channel in PostgreSQL
        for i, name in enumerate(names):
            pg_notify(sender, name, 'default,{"n": %d}' % (i + 1))
        got = [ws.recv_json() for _ in names]
        assert [(f["channel"], f["payload"]["n"]) for f in got] == [(n, i + 1) for i, n in enumerate(names)]
    finally:
        g.stop()


@pytest.mark.parametrize("bad", ["", "x" * 64, "\u00e9" * 32])
def test_bad_channel_names_fail_when_the_endpoint_is_created(bad):
    listener = Listener("")
    with pytest.raises(InvalidChannel) as info:
        Pgws(listener, "fine", bad)
    assert isinstance(info.value, PgwsError)
    with pytest.raises(PgwsError):
        Pgws(listener)


def test_origin_rules():
    assert origin_allowed(None, "example.com")
    assert origin_allowed("https://example.com", "example.com")
    assert origin_allowed("http://localhost:8080", "localhost:8080")
    assert origin_allowed("https://example.com", "example.com:443")
    assert not origin_allowed("https://example.com:8443", "example.com")
    assert not origin_allowed("https://evil.com", "example.com")
    assert not origin_allowed("null", "example.com")
    assert not origin_allowed("https://example.com.evil.com", "example.com")
    assert origin_allowed("https://app.example.org", "api.example.com", ["https://app.example.org"])
    assert origin_allowed("https://x.org", "api.example.com", ["*"])


def test_origin_checked_before_the_upgrade(pg_dsn):
    g = serve(pg_dsn, options={"allowed_origins": ["https://app.example.org"]}).wait_up()
    try:
        cases = [({}, 101), ({"Origin": f"http://127.0.0.1:{g.port}"}, 101),
                 ({"Origin": "https://app.example.org"}, 101),
                 ({"Origin": "https://evil.example.com"}, 403), ({"Origin": "null"}, 403)]
        for headers, status in cases:
            sock, head = raw_upgrade(g.port, headers=headers)
            sock.close()
            assert head.startswith(f"HTTP/1.1 {status}".encode()), (headers, head)
        status, body = http_get(g.url("/ws"))
        assert status == 426
    finally:
        g.stop()


def wsproto_client(port, deflate):
    """A client that offers permessage-deflate, as browsers do."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = WSConnection(ConnectionType.CLIENT)
    ext = [PerMessageDeflate()] if deflate else []
    sock.sendall(conn.send(Request(host=f"127.0.0.1:{port}", target="/ws", extensions=ext)))
    return sock, conn


def events(sock, conn, want, timeout=10):
    sock.settimeout(timeout)
    got = []
    while len(got) < want:
        conn.receive_data(sock.recv(65536))
        got.extend(conn.events())
    return got


@pytest.mark.parametrize("compression", [False, True])
def test_permessage_deflate_only_when_enabled(pg_dsn, sender, compression):
    g = serve(pg_dsn, options={"compression": compression}).wait_up()
    try:
        sock, conn = wsproto_client(g.port, deflate=True)
        accept = events(sock, conn, 1)[0]
        assert isinstance(accept, AcceptConnection)
        assert bool(accept.extensions) is compression
        wait_sockets(g, 1)
        text = '{"text": "' + "compressible " * 200 + '"}'
        pg_notify(sender, "pgws", "default," + text)
        sock.settimeout(10)
        wire = b""
        got = []
        while not got:
            chunk = sock.recv(65536)
            wire += chunk
            conn.receive_data(chunk)
            got.extend(conn.events())
        assert isinstance(got[0], TextMessage) and text in got[0].data
        # Compressed when negotiated: the frame on the wire is much smaller than the text.
        assert (len(wire) < len(text) / 4) is compression
        sock.close()
    finally:
        g.stop()


@pytest.mark.parametrize("headers, status, says", [
    ({"Sec-WebSocket-Key": "not base64!", "Sec-WebSocket-Version": "13"}, 400, b"Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Key": "c2hvcnQ=", "Sec-WebSocket-Version": "13"}, 400, b"Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Version": "13"}, 400, b"Sec-WebSocket-Key"),
    ({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "8"}, 426,
     b"Sec-WebSocket-Version: 13"),
])
def test_bad_upgrade_requests_get_a_clear_http_answer(server, sender, clients, headers, status, says):
    sock = socket.create_connection(("127.0.0.1", server.port))
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket",
             "Connection: Upgrade", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"\n") and len(answer) < 400:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    assert answer.startswith(f"HTTP/1.1 {status}".encode())
    assert says in answer
    ws = clients(server.ws_url())  # the server goes on serving
    wait_sockets(server, 1)
    pg_notify(sender, "pgws", 'default,{"after": "bad upgrade"}')
    assert ws.recv_json()["payload"] == {"after": "bad upgrade"}


def test_health_reports_listener_state(pg_server, clients):
    """Database down at start-up: the app starts, health says 503, sockets connect;
    once the database is up: 200, and sockets get a resync frame and then messages."""
    pg_server.stop()
    g = serve(pg_server.dsn, options={"health_detail": True}).wait_up(healthy=False)
    try:
        status, body = http_get(g.url("/healthz"))
        assert status == 503
        health = json.loads(body)
        assert health["reason"] == "database unreachable" and health["listener"] == "disconnected"
        assert health["error"]
        ws = clients(g.ws_url())
        wait_sockets(g, 1)
        pg_server.start()
        g.wait_up(healthy=True)
        status, body = http_get(g.url("/healthz"))
        assert status == 200 and json.loads(body) == {"status": "ok", "listener": "connected",
                                                      "sockets": 1}
        resync = ws.recv_json()
        assert resync["event"] == "resync" and resync["channels"] == ["pgws"]
        assert "payload" not in resync and resync["reason"]
        conn = psycopg2.connect(pg_server.dsn)
        conn.autocommit = True
        pg_notify(conn, "pgws", 'default,{"after": "start"}')
        assert ws.recv_json()["payload"] == {"after": "start"}
        # the database restarts: 503 while it is down, resync, and delivery again
        pg_server.stop()
        wait_for(lambda: http_get(g.url("/healthz"))[0] == 503, message="health 503")
        pg_server.start()
        g.wait_up(healthy=True)
        assert ws.recv_json()["event"] == "resync"
        conn = psycopg2.connect(pg_server.dsn)
        conn.autocommit = True
        pg_notify(conn, "pgws", 'default,{"after": "restart"}')
        assert ws.recv_json()["payload"] == {"after": "restart"}
        conn.close()
    finally:
        g.stop()


def test_killed_listener_backend_resyncs_and_sockets_stay_open(server, sender, clients):
    socks = [clients(server.ws_url()) for _ in range(3)]
    wait_sockets(server, 3)
    kill_listener(server, sender)
    for ws in socks:
        frame = ws.recv_json()
        assert frame["event"] == "resync" and set(frame["channels"]) == {"pgws", "Other Channel"}
        assert frame["reason"] == "listener reconnected"  # the driver's words stay in the log
    assert "terminating connection" in server.log()
    server.wait_up()
    pg_notify(sender, "pgws", 'default,{"still": "open"}')
    assert all(ws.recv_json()["payload"] == {"still": "open"} for ws in socks)


def test_plain_wsgi_under_gunicorn(pg_dsn, sender):
    g = Gunicorn("tests.apps.plain:application", env={
        "PGWS_DB_URI": pg_dsn, "PGWS_OPTIONS": '{"health_detail": true}'}).wait_up()
    try:
        ws = Ws(g.ws_url("/any/path"))
        wait_for(lambda: json.loads(http_get(g.url("/healthz"))[1])["sockets"] == 1,
                 message="socket registered")
        pg_notify(sender, "pgws", 'default,{"plain": "wsgi"}')
        assert ws.recv_json()["payload"] == {"plain": "wsgi"}
        assert http_get(g.url("/other"))[0] == 426
        ws.close()
    finally:
        g.stop()


def test_plain_wsgi_under_werkzeug_dev_server(pg_dsn, sender):
    """What `flask run` users get: Werkzeug's threaded development server."""
    listener = Listener(pg_dsn, min_reconnect=0.2, max_reconnect=2.0)
    endpoint = Pgws(listener, "pgws")
    httpd = make_server("127.0.0.1", 0, endpoint, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="test-werkzeug", daemon=True)
    thread.start()
    try:
        url = f"ws://127.0.0.1:{httpd.server_port}/ws"
        ws = Ws(url)
        assert listener.wait_connected(10)
        wait_for(lambda: len(endpoint.hub) == 1, message="socket registered")
        pg_notify(sender, "pgws", 'default,{"dev": "server"}')
        assert ws.recv_json()["payload"] == {"dev": "server"}
        ws.close()
        wait_for(lambda: len(endpoint.hub) == 0, message="socket unregistered")
        endpoint.close()
    finally:
        httpd.shutdown()
        listener.stop()


def test_a_socket_flask_answers_otherwise_after_on_connect_is_forgotten(pg_dsn):
    """An after_request function that raises makes Flask answer 500 instead of serving the
    socket: the admitted connection leaves the hub, on_disconnect runs once, nothing leaks."""
    app = Flask(__name__)
    ended = []

    class Hooked(Pgws):
        def on_disconnect(self, conn):
            ended.append(conn.id)

    listener = Listener(pg_dsn)
    hooked = Hooked(listener, "pgws")
    hooked.init_app(app, "/ws")

    @app.after_request
    def fail(response):
        raise RuntimeError("an after_request function failed on purpose")

    ours, theirs = socket.socketpair()
    open_before = endpoint_module._sockets.open
    try:
        answer = app.test_client().get("/ws", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
            environ_overrides={"werkzeug.socket": ours})
        assert answer.status_code == 500  # ended at the request's teardown, not by the GC
        assert len(hooked.hub) == 0 and len(ended) == 1
        assert endpoint_module._sockets.open == open_before
    finally:
        ours.close()
        theirs.close()
        listener.stop()
