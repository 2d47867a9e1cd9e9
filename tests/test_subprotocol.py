"""The app-level heartbeat and the ``pgws.v2`` envelope, on every endpoint kind, end to end.

Each kind (the pgws gateway, the JWT gateway, PubSub, Push) answers
``{"action": "ping", "id": ...}`` with ``{"event": "pong", "reply_to": ...}``; a client that
offers ``pgws.v2`` gets every app frame in an envelope, and one that does not gets today's
frames byte for byte.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterator

import pytest

from pgws_sync._core.connection import APP_JSON, APP_TEXT, Connection, Delivery

from .clirun import Serve
from .helpers import Gunicorn, Ws, pg_notify
from .jwt_helpers import SECRET, make_token
from .pubsub_helpers import post, serve_pubsub
from .push_helpers import push, serve_push

V2 = "pgws.v2"
PING = '{"action": "ping", "id": "hb-1"}'
PONG = '{"event":"pong","reply_to":"hb-1"}'
# Push payloads an app may well send, shaped like the protocols' own frames.
LOOKALIKES = [
    {"event": "error", "error": "card declined"},
    {"event": "streams", "user": "alice"},
    {"event": "subscribed", "channel": "x", "reply_to": "pgws-1"},
    {"tabWindowId": "not-a-tab"},
    {"event": "pong", "reply_to": "hb-1"},
]


@pytest.fixture(scope="module")
def gateway(pg_dsn: str) -> Iterator[Serve]:
    channel = f"v2-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    server = Serve(["--dsn", pg_dsn, "--channel", channel]).wait_up()
    server.channel = channel  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jwt(pg_dsn: str) -> Iterator[Gunicorn]:
    listen = f"v2-listen-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    server = Gunicorn("tests.apps.jwt_app:app", env={
        "PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_LISTEN_CHANNEL": listen}).wait_up()
    server.listen = listen  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pubsub(pg_dsn: str) -> Iterator[Gunicorn]:
    server = serve_pubsub(pg_dsn)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pushing(pg_dsn: str) -> Iterator[Gunicorn]:
    server = serve_push(pg_dsn)
    yield server
    server.stop()


def connect(url: str, v2: bool, clients: Any) -> Ws:
    ws: Ws = clients(url, subprotocols=[V2] if v2 else None)
    assert ws.client.subprotocol == (V2 if v2 else None)
    return ws


def ping(ws: Ws) -> None:
    """Ping and read until the pong: frames before it (a welcome, a tab window id) are skipped."""
    ws.client.send(PING)
    for _ in range(5):
        frame = ws.recv()
        if frame == PONG:
            return
    raise AssertionError("no pong")


@pytest.mark.parametrize("v2", [False, True], ids=["plain", "v2"])
def test_every_endpoint_kind_answers_a_ping(gateway: Serve, jwt: Gunicorn, pubsub: Gunicorn,
                                            pushing: Gunicorn, clients: Any, v2: bool) -> None:
    token = make_token({"mode": "rw", "channels": ["hb"]})
    for url in [gateway.ws_url("/ws"), jwt.ws_url(f"/hb/{token}"), pubsub.ws_url(),
                pushing.ws_url("/ws")]:
        ping(connect(url, v2, clients))


def test_a_ping_on_the_jwt_gateway_is_not_relayed_and_other_frames_still_are(
        jwt: Gunicorn, clients: Any, sender: Any) -> None:
    token = make_token({"mode": "rw", "channels": ["hb-relay"]})
    ws = connect(jwt.ws_url(f"/hb-relay/{token}"), False, clients)
    ping(ws)
    ws.client.send('{"action": "ping", "id": "x", "more": 1}')  # not exactly a ping: relayed
    relayed = json.loads(ws.recv())
    assert relayed["event"] == "WebsocketMessage"
    assert relayed["payload"] == '{"action": "ping", "id": "x", "more": 1}'


def test_pgws_gateway_frames_plain_and_enveloped(gateway: Serve, clients: Any, sender: Any) -> None:
    plain = connect(gateway.ws_url("/ws"), False, clients)
    wrapped = connect(gateway.ws_url("/ws"), True, clients)
    pg_notify(sender, gateway.channel, 'default,{"event": "error", "error": "x"}')  # type: ignore[attr-defined]
    frame = plain.recv()
    assert json.loads(frame)["payload"] == {"event": "error", "error": "x"}
    assert wrapped.recv() == '{"message":' + frame + "}"


def test_jwt_gateway_frames_plain_and_enveloped(jwt: Gunicorn, clients: Any, sender: Any) -> None:
    channel = f"env-{uuid.uuid4().hex[:8]}"
    token = make_token({"mode": "r", "channels": [channel]})
    plain = connect(jwt.ws_url(f"/{channel}/{token}"), False, clients)
    wrapped = connect(jwt.ws_url(f"/{channel}/{token}"), True, clients)
    raw = '{"channel": "%s", "event": "error", "big": 123456789012345678901}' % channel
    pg_notify(sender, jwt.listen, raw)  # type: ignore[attr-defined]
    assert plain.recv() == raw  # byte for byte, as postgres-websockets sends it
    assert json.loads(wrapped.recv()) == {"text": raw}  # raw text: as a JSON string
    # A token offered as the subprotocol wins: the socket speaks the plain protocol.
    offered: Ws = clients(jwt.ws_url(f"/{channel}"), subprotocols=[token, V2])
    assert offered.client.subprotocol == token


def test_pubsub_frames_plain_and_enveloped(pubsub: Gunicorn, clients: Any) -> None:
    plain = connect(pubsub.ws_url(), False, clients)
    wrapped = connect(pubsub.ws_url(), True, clients)
    for ws in (plain, wrapped):
        assert json.loads(ws.recv())["event"] == "welcome"  # the app's own frame, as written
        ws.client.send(json.dumps({"action": "subscribe", "channel": "env", "id": "s1"}))
        # the protocol's replies are never wrapped
        assert json.loads(ws.recv()) == {"event": "subscribed", "channel": "env", "reply_to": "s1"}
    post(pubsub, "/debug/publish", {"channel": "env", "message": {"event": "resync"}})
    frame = plain.recv()
    assert json.loads(frame)["payload"] == {"event": "resync"}
    assert wrapped.recv() == '{"message":' + frame + "}"


def test_push_payloads_shaped_like_control_frames_are_enveloped(pushing: Gunicorn,
                                                                clients: Any) -> None:
    plain = connect(pushing.ws_url("/ws"), False, clients)
    wrapped = connect(pushing.ws_url("/ws"), True, clients)
    for ws in (plain, wrapped):
        assert list(json.loads(ws.recv())) == ["tabWindowId"]  # a control frame: never wrapped
        ws.client.send(json.dumps({"joinRoom": "lookalikes"}))
        assert json.loads(ws.recv()) == {"event": "joined", "room": "lookalikes"}
    for payload in LOOKALIKES:
        text = json.dumps(payload)
        push(pushing, '{"pushToRoom": "lookalikes", "payload": ' + text + "}")
        assert plain.recv() == text  # today's wire format, byte for byte
        assert wrapped.recv() == '{"message":' + text + "}"


def test_frames_of_one_fan_out_are_enveloped_once_for_every_v2_socket() -> None:
    item = Delivery.join([Delivery.of('{"a":1}', APP_JSON), Delivery.of(b"\x00", APP_JSON),
                          Delivery.of("not json", APP_TEXT)])
    wrapped = item.enveloped()
    assert wrapped is item.enveloped()  # made once, shared
    assert wrapped.texts == ('{"message":{"a":1}}', b"\x00", '{"text":"not json"}')
    control = Delivery.of('{"event":"gap"}')
    assert control.enveloped() is control
    mixed = Delivery.join([control, Delivery.of("1", APP_JSON)])
    assert mixed.enveloped().texts == ('{"event":"gap"}', '{"message":1}')
    assert Connection(["a"]).envelope is False
