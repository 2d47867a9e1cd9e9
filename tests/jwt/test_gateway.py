"""The JWT gateway end to end: real gunicorn, real PostgreSQL, real WebSocket clients.

Covers postgres-websockets' own server cases (relaying, "test data" writes,
multi-channel writes and reads) plus refusals, expiry, error frames and meta events.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import simple_websocket

from pgws_sync.jwt.endpoint import CLOSE_JWT_EXPIRED

from ..helpers import ROOT, Gunicorn, http_get, pg_notify, raw_upgrade, wait_for
from ..jwt_helpers import SECRET, DbListener, make_token, upgrade_refused
from ..pgserver import PgServer


def start(dsn: str, listen: str, **env: str) -> Gunicorn:
    return Gunicorn("tests.apps.jwt_app:app", env={
        "PGWS_DB_URI": dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_LISTEN_CHANNEL": listen, **env,
    }).wait_up()


@pytest.fixture(scope="module")
def listen() -> str:
    return f"pgws-listen-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def meta() -> str:
    return f"meta-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(pg_dsn: str, listen: str, meta: str) -> Iterator[Gunicorn]:
    g = start(pg_dsn, listen, PGWS_META_CHANNEL=meta)
    yield g
    g.stop()


@pytest.fixture
def db(pg_dsn: str, listen: str) -> Iterator[DbListener]:
    listener = DbListener(pg_dsn, listen)
    yield listener
    listener.close()


def url(server: Gunicorn, channel: Optional[str], claims: Dict[str, Any]) -> str:
    tok = make_token(claims)
    return server.ws_url(f"/{channel}/{tok}" if channel else f"/{tok}")


# ------------------------------------------------ database -> browser (relay)


def test_notify_reaches_the_channel_readers_as_raw_text(server: Gunicorn, listen: str,
                                                        sender: Any, clients: Any,
                                                        channel: str) -> None:
    reader = clients(url(server, channel, {"mode": "r"}))
    other = clients(url(server, channel + "-other", {"mode": "r"}))
    payload = '{ "channel" : "%s",  "n": 123456789012345678901234567890, "u": "\u00e9\u2603" }' % channel
    pg_notify(sender, listen, payload)
    assert reader.recv() == payload  # the entire payload, byte for byte
    pg_notify(sender, listen, json.dumps({"channel": channel + "-other", "n": 2}))
    assert json.loads(other.recv()) == {"channel": channel + "-other", "n": 2}  # not the first


@pytest.mark.parametrize("payload", ["plain text", '{"no": "channel"}', '{"channel": 5}',
                                     '["channel", "x"]', '{"channel": "x", "bad": NaN}'])
def test_other_payloads_go_to_the_channel_named_like_the_listen_channel(
        server: Gunicorn, listen: str, sender: Any, clients: Any, channel: str,
        payload: str) -> None:
    reader = clients(url(server, listen, {"mode": "r"}))
    named = clients(url(server, channel, {"mode": "r"}))
    pg_notify(sender, listen, payload)
    assert reader.recv() == payload
    pg_notify(sender, listen, json.dumps({"channel": channel}))
    assert named.recv() == json.dumps({"channel": channel})


def test_mode_w_sockets_receive_nothing(server: Gunicorn, listen: str, sender: Any,
                                        clients: Any, channel: str) -> None:
    writer = clients(url(server, channel, {"mode": "w"}))
    reader = clients(url(server, channel, {"mode": "r"}))
    pg_notify(sender, listen, json.dumps({"channel": channel, "n": 1}))
    assert reader.recv_json()["n"] == 1  # fanned out to every reader by now
    writer.client.send(b"\xff\xfe")  # answered with an error frame: the first frame it gets
    assert writer.recv_json()["event"] == "error"


# ------------------------------------------------ browser -> database (writes)


def test_write_reaches_readers_sender_and_database(server: Gunicorn, listen: str, db: DbListener,
                                                   clients: Any, channel: str) -> None:
    # postgres-websockets: a write on /test/<rw token> reaches readers with payload "test data".
    tok = make_token({"mode": "rw"})
    writer = clients(server.ws_url(f"/{channel}/{tok}"))
    reader = clients(server.ws_url(f"/{channel}/{tok}"))
    before = time.time()
    writer.client.send("test data")
    in_db = db.next()
    got_reader, got_writer = reader.recv(), writer.recv()
    assert got_reader == got_writer == in_db  # the NOTIFY text itself
    message = json.loads(in_db)
    assert list(message) == ["event", "channel", "payload", "claims"]
    assert message["event"] == "WebsocketMessage"
    assert message["channel"] == channel and message["payload"] == "test data"
    delivered = message["claims"].pop("message_delivered_at")
    assert isinstance(delivered, float) and before - 1 <= delivered <= time.time() + 1
    assert message["claims"] == {"mode": "rw"}


def test_one_write_to_two_channels_reaches_each_reader_with_its_channel(
        server: Gunicorn, db: DbListener, clients: Any, channel: str) -> None:
    test, secondary = channel, channel + "-secondary"
    rw = {"mode": "rw"}
    test_reader = clients(url(server, test, rw))
    secondary_reader = clients(url(server, secondary, rw))
    both = make_token({"mode": "rw", "channels": [test, secondary]})
    writer = clients(server.ws_url(f"/{both}"))
    writer.client.send("test data")
    first, second = json.loads(test_reader.recv()), json.loads(secondary_reader.recv())
    assert (first["payload"], first["channel"]) == ("test data", test)
    assert (second["payload"], second["channel"]) == ("test data", secondary)
    assert first["claims"]["channels"] == [test, secondary]
    assert {json.loads(db.next())["channel"] for _ in range(2)} == {test, secondary}
    # postgres-websockets: a reader of several channels receives both messages.
    got = [json.loads(writer.recv()) for _ in range(2)]
    assert sorted(m["channel"] for m in got) == sorted([test, secondary])
    assert all(m["payload"] == "test data" for m in got)


def test_binary_utf8_frames_are_sent_as_text(server: Gunicorn, clients: Any, channel: str) -> None:
    ws = clients(url(server, channel, {"mode": "rw"}))
    ws.client.send("caf\u00e9 \u2603".encode())
    assert json.loads(ws.recv())["payload"] == "caf\u00e9 \u2603"


# ------------------------------------------------------------- error frames


def test_mode_r_message_gets_an_error_frame_and_the_socket_stays(
        server: Gunicorn, listen: str, sender: Any, db: DbListener, clients: Any,
        channel: str) -> None:
    reader = clients(url(server, channel, {"mode": "r"}))
    reader.client.send("let me write")
    error = reader.recv_json()
    assert error == {"event": "error",
                     "error": "this socket may only read (mode r): the message was not sent"}
    pg_notify(sender, listen, json.dumps({"channel": channel, "after": True}))
    assert reader.recv_json()["after"] is True
    assert json.loads(db.next()) == {"channel": channel, "after": True}  # nothing else was sent


def test_too_large_message_gets_an_error_frame_and_nothing_is_sent(
        server: Gunicorn, db: DbListener, clients: Any, channel: str) -> None:
    writer = clients(url(server, channel, {"mode": "rw"}))
    reader = clients(url(server, channel, {"mode": "r"}))
    writer.client.send("x" * 7900)  # the claims and the envelope push it past 8000 bytes
    error = writer.recv_json()
    assert error["event"] == "error" and error["error"].startswith("message too large")
    assert "7999" in error["error"]
    writer.client.send("small")
    assert json.loads(reader.recv())["payload"] == "small"  # the first frame it gets
    assert json.loads(writer.recv())["payload"] == "small"
    assert json.loads(db.next())["payload"] == "small"


def test_too_large_for_one_channel_sends_to_none(server: Gunicorn, db: DbListener,
                                                  clients: Any, channel: str) -> None:
    short, long_name = channel, channel + "-" + "l" * 700
    writer = clients(server.ws_url("/" + make_token({"mode": "w", "channels": [short, long_name]})))
    reader = clients(url(server, short, {"mode": "r"}))
    writer.client.send("y" * (7999 - 300 - len(long_name)))  # fits for short, not for long
    assert writer.recv_json()["error"].startswith("message too large")
    writer.client.send("ok")
    assert json.loads(reader.recv())["payload"] == "ok"


def test_binary_frame_that_is_not_utf8_gets_an_error_frame(
        server: Gunicorn, clients: Any, channel: str) -> None:
    writer = clients(url(server, channel, {"mode": "rw"}))
    writer.client.send(b"\x80\x81 not text")
    assert writer.recv_json() == {
        "event": "error", "error": "a binary frame that is not UTF-8 text cannot be sent"}
    writer.client.send("still open")
    assert json.loads(writer.recv())["payload"] == "still open"


def test_failed_notify_gets_an_error_frame_and_writes_resume(pg_server: PgServer,
                                                             clients: Any) -> None:
    listen = "pgws-listen-restart"
    server = start(pg_server.dsn, listen)
    try:
        tok = make_token({"mode": "rw"})
        writer = clients(server.ws_url(f"/room/{tok}"))
        writer.client.send("before")
        assert json.loads(writer.recv())["payload"] == "before"  # the pool has a connection
        pg_server.stop()
        writer.client.send("while down")
        error = writer.recv_until(lambda f: f.get("event") == "error")
        assert error["error"].startswith(("cannot connect to the database", "NOTIFY failed"))
        pg_server.start()
        resync = writer.recv_until(lambda f: f.get("event") == "resync", timeout=20)
        assert resync["channels"] == ["room"]
        writer.client.send("after")
        assert json.loads(writer.recv())["payload"] == "after"
    finally:
        server.stop()


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("claims,path_channel,body", [
    ({"mode": "r", "exp": 1}, "c", "Token expired"),
    ({"channels": ["c"]}, "c", "Missing mode"),
    ({"mode": "r", "channels": ["a", "b"]}, "c", "No allowed channels"),
    ({"mode": "r"}, None, "No allowed channels"),
    ({"mode": "r", "nbf": int(time.time()) + 3600}, "c", "Error: token not yet valid (nbf)"),
    ({"mode": "q"}, "c", "Error: mode must be r, w or rw, got 'q'"),
])
def test_refused_claims(server: Gunicorn, claims: Dict[str, Any], path_channel: Optional[str],
                        body: str) -> None:
    tok = make_token(claims)
    path = f"/{path_channel}/{tok}" if path_channel else f"/{tok}"
    assert upgrade_refused(server, path) == (400, body)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bad_tokens() -> List[Tuple[str, str, str]]:
    good = make_token({"mode": "rw", "channel": "c"})
    head, _, sig = good.split(".")
    tampered = f"{head}.{_b64(json.dumps({'mode': 'rw', 'channel': 'admin'}).encode())}.{sig}"
    none_head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{none_head}.{_b64(json.dumps({'mode': 'rw'}).encode())}."
    return [
        ("tampered", tampered, "Error: invalid signature"),
        ("wrong key", make_token({"mode": "rw"}, secret="x" * 32), "Error: invalid signature"),
        ("alg none", unsigned, "Error: unsigned tokens (alg none) are not accepted"),
        ("garbage", "garbage", "Error: malformed token"),
        ("huge garbage", "a" * 3000, "Error: malformed token"),
    ]


@pytest.mark.parametrize("name,tok,body", bad_tokens(), ids=[b[0] for b in bad_tokens()])
def test_bad_tokens_are_refused_and_readers_keep_receiving(
        server: Gunicorn, listen: str, sender: Any, clients: Any, channel: str,
        name: str, tok: str, body: str) -> None:
    reader = clients(url(server, channel, {"mode": "r"}))
    status, text = upgrade_refused(server, f"/{channel}/{tok}")
    assert status == 400 and text.startswith(body), text
    status, text = upgrade_refused(server, f"/{channel}", {"Authorization": f"Bearer {tok}"})
    assert status == 400 and text.startswith(body), text
    pg_notify(sender, listen, json.dumps({"channel": channel, "still": name}))
    assert reader.recv_json()["still"] == name


def test_tokens_beyond_gunicorn_limits_are_refused(server: Gunicorn, listen: str,
                                                   sender: Any, clients: Any,
                                                   channel: str) -> None:
    reader = clients(url(server, channel, {"mode": "r"}))
    status, text = upgrade_refused(server, f"/{channel}/" + "a" * 20000)
    # gunicorn's own limit on the request line: 414 before gunicorn 27, 400 since
    assert status == 414 or (status == 400 and "Request Line is too large" in text), text
    huge_valid = make_token({"mode": "r", "pad": "p" * 20000})
    status, _ = upgrade_refused(server, f"/{channel}", {"Authorization": f"Bearer {huge_valid}"})
    assert status == 431  # gunicorn's own limit on a header field
    pg_notify(sender, listen, json.dumps({"channel": channel, "ok": 1}))
    assert reader.recv_json()["ok"] == 1


def test_huge_valid_token_opens_and_its_claims_count_toward_the_limit(
        server: Gunicorn, clients: Any, channel: str) -> None:
    big = make_token({"mode": "rw", "pad": "p" * 5500})  # about 7.5 KB: under gunicorn's limits
    writer = clients(server.ws_url(f"/{channel}"), headers={"Authorization": f"Bearer {big}"})
    writer.client.send("hi")
    echoed = json.loads(writer.recv())
    assert echoed["payload"] == "hi" and len(echoed["claims"]["pad"]) == 5500
    writer.client.send("h" * 2500)  # fine alone, too large with 5.5 KB of claims
    assert writer.recv_json()["error"].startswith("message too large")


def test_missing_token_is_refused_with_a_hint(server: Gunicorn) -> None:
    status, text = upgrade_refused(server, "/")
    assert status == 400 and text.startswith("Error: no token") and "Bearer" in text


# ----------------------------------------------------------- token sources


def test_token_from_the_authorization_header(server: Gunicorn, listen: str, sender: Any,
                                             clients: Any, channel: str) -> None:
    tok = make_token({"mode": "r", "channels": [channel]})
    by_channel = clients(server.ws_url(f"/{channel}"), headers={"Authorization": f"Bearer {tok}"})
    all_channels = clients(server.ws_url("/"), headers={"Authorization": f"Bearer {tok}"})
    pg_notify(sender, listen, json.dumps({"channel": channel}))
    assert by_channel.recv_json() == all_channels.recv_json() == {"channel": channel}


def test_token_from_sec_websocket_protocol_is_answered_with_it(
        server: Gunicorn, listen: str, sender: Any, channel: str) -> None:
    tok = make_token({"mode": "r"})
    sock, head = raw_upgrade(server.port, f"/{channel}", {"Sec-WebSocket-Protocol": tok})
    try:
        assert head.startswith(b"HTTP/1.1 101")
        assert f"\r\nSec-WebSocket-Protocol: {tok}\r\n".encode() in head
    finally:
        sock.close()
    client = simple_websocket.Client.connect(server.ws_url(f"/{channel}"),
                                             subprotocols=["chat", tok])
    try:
        assert client.subprotocol == tok
        pg_notify(sender, listen, json.dumps({"channel": channel, "via": "protocol"}))
        assert json.loads(client.receive(timeout=10))["via"] == "protocol"
    finally:
        client.close()
        client.thread.join(5)


# ------------------------------------------------------------------ expiry


def test_token_expiring_while_connected_closes_with_3001(server: Gunicorn, listen: str,
                                                         sender: Any, clients: Any,
                                                         channel: str) -> None:
    lasting = clients(url(server, channel, {"mode": "r"}))
    expiring = clients(url(server, channel, {"mode": "r", "exp": int(time.time()) + 2}))
    assert expiring.expect_close(timeout=15) == (CLOSE_JWT_EXPIRED, "JWT expired")
    pg_notify(sender, listen, json.dumps({"channel": channel, "after": "expiry"}))
    assert lasting.recv_json()["after"] == "expiry"


# -------------------------------------------------------------- meta events


def test_meta_channel_open_and_close_events(server: Gunicorn, meta: str, clients: Any,
                                            channel: str) -> None:
    watcher = clients(url(server, meta, {"mode": "r"}))
    marker = uuid.uuid4().hex
    claims = {"mode": "r", "channels": [channel, channel + "-2"], "marker": marker}
    ws = clients(url(server, None, claims))

    def mine(event: str) -> Any:
        return lambda f: f.get("event") == event and f["claims"].get("marker") == marker

    opened = watcher.recv_until(mine("ConnectionOpen"))
    assert opened["channel"] == meta
    assert opened["payload"] == f"{channel},{channel}-2"
    assert isinstance(opened["claims"].pop("message_delivered_at"), float)
    assert opened["claims"] == claims
    ws.close()
    closed = watcher.recv_until(mine("ConnectionClose"))
    assert closed["payload"] == opened["payload"] and closed["channel"] == meta
    # Exactly once: the next event about our marker is a new socket's open, not a second close.
    clients(url(server, None, claims))
    assert watcher.recv_until(lambda f: f["claims"].get("marker") == marker)["event"] == (
        "ConnectionOpen")


def test_refused_sockets_send_no_meta_events(server: Gunicorn, meta: str, clients: Any,
                                             channel: str) -> None:
    watcher = clients(url(server, meta, {"mode": "r"}))
    marker = uuid.uuid4().hex
    assert upgrade_refused(server, "/" + make_token({"mode": "r", "marker": marker}))[0] == 400
    clients(url(server, channel, {"mode": "r", "marker": marker, "n": 2}))
    event = watcher.recv_until(lambda f: f["claims"].get("marker") == marker)
    assert event["event"] == "ConnectionOpen" and event["claims"]["n"] == 2


# ------------------------------------------------------------------ health


def test_any_browser_origin_may_open_a_socket(server: Gunicorn, listen: str, sender: Any,
                                              clients: Any, channel: str) -> None:
    # As postgres-websockets: the token, not a cookie, authorises the socket.
    ws = clients(url(server, channel, {"mode": "r"}), headers={"Origin": "https://elsewhere.example"})
    pg_notify(sender, listen, json.dumps({"channel": channel}))
    assert ws.recv_json() == {"channel": channel}


def test_health_and_plain_http(server: Gunicorn) -> None:
    status, body = http_get(server.url("/healthz"))
    assert (status, json.loads(body)) == (200, {"status": "ok"})  # no detail by default
    status, body = http_get(server.url("/anything"))
    assert status == 426 and "WebSocket" in body


def test_mounted_in_a_flask_app(pg_dsn: str, sender: Any, clients: Any, channel: str) -> None:
    listen = f"pgws-flask-{uuid.uuid4().hex[:6]}"
    server = Gunicorn("tests.apps.jwt_flask:app", env={
        "PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_LISTEN_CHANNEL": listen})
    try:
        wait_for(lambda: _healthy(server), 20, "the mounted gateway's health check")
        assert http_get(server.url("/")) == (200, "the Flask app")
        ws = clients(server.ws_url(f"/ws/{channel}/" + make_token({"mode": "rw"})))
        ws.client.send("through Flask")
        assert json.loads(ws.recv())["payload"] == "through Flask"
        assert upgrade_refused(server, "/ws/c/" + make_token({"channel": "c"})) == (
            400, "Missing mode")
    finally:
        server.stop()


def _healthy(server: Gunicorn) -> bool:
    try:
        return http_get(server.url("/ws/healthz"), timeout=1)[0] == 200
    except OSError:
        return False


def test_readme_snippet_serves_sockets_and_files(pg_dsn: str, sender: Any, clients: Any,
                                                 channel: str, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "guides" / "jwt-gateway.md").read_text()
    code = re.search(r"```python\n(from pgws_sync import JwtAuth, JwtGateway.*?)```", text,
                     re.S).group(1)
    public = tmp_path / "public"
    public.mkdir()
    (public / "index.html").write_text("the page")
    (tmp_path / "readme_jwt.py").write_text(
        code.replace("postgresql://localhost/app", pg_dsn).replace('"public"', repr(str(public))))
    server = Gunicorn("readme_jwt:app", env={"PYTHONPATH": str(tmp_path)}).wait_up()
    try:
        assert http_get(server.url("/")) == (200, "the page")
        ws = clients(server.ws_url(f"/{channel}/" + make_token({"mode": "rw"})))
        pg_notify(sender, "postgres-websockets-listener", json.dumps({"channel": channel}))
        assert ws.recv_json() == {"channel": channel}
    finally:
        server.stop()
