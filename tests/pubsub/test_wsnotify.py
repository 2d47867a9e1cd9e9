"""What wsnotify has beside subscriptions: client messages to an application handler, ids and
reply_to on server-side messages, a time field, the slow-client close reason, an origin function."""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterator

import psycopg2
import pytest

from pgws_sync import ConfigError, Connection, Listener, PubSub
from pgws_sync._core.hub import Hub

from ..helpers import pg_notify, raw_upgrade
from ..pubsub_helpers import Client, post, serve_pubsub


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Any]:
    g = serve_pubsub(pg_dsn, options={"timestamps": True})
    yield g
    g.stop()


def test_client_messages_reach_the_handler_and_its_reply_comes_back(server):
    c = Client(server, headers={"X-User": "ann"})
    try:
        reply = c.request(action="message", channel="room", payload={"echo": [1, "two"]}, id="m1")
        assert reply["payload"] == {"echoed": [1, "two"], "channel": "room", "user": "ann"}
        assert reply["channel"] == "room" and reply["reply_to"] == "m1" and reply["id"] != "m1"
        assert c.request(action="message", payload="ack", id=2) == \
            {"event": "received", "reply_to": 2}  # no channel: none named
        assert c.request(action="message", channel="c", payload="refuse", id=3) == \
            {"event": "error", "error": "refused on purpose", "reply_to": 3}
        assert c.request(action="message", payload="crash", id=4) == \
            {"event": "error", "error": "the message could not be handled", "reply_to": 4}
        assert c.request(action="message", payload={"echo": 5})["payload"]["echoed"] == 5
    finally:
        c.close()
    assert "the handler failed on purpose" in server.log()  # logged, socket kept


def test_server_side_messages_carry_the_given_id_and_reply_to(server):
    sub_ = Client(server)
    try:
        sub_.subscribe("news")
        post(server, "/debug/publish", {"channel": "news", "message": {"x": 1}, "id": "srv-1",
                                        "reply_to": "client-9"})
        frame = sub_.recv_json()
        assert (frame["id"], frame["reply_to"], frame["payload"]) == ("srv-1", "client-9", {"x": 1})
        post(server, "/debug/send_to", {"to": sub_.id, "message": "direct", "type": "text",
                                        "reply_to": 42, "channel": "news"})
        frame = sub_.recv_json()
        assert (frame["type"], frame["payload"], frame["reply_to"]) == ("text", "direct", 42)
    finally:
        sub_.close()


def test_time_is_when_it_was_published_the_same_for_every_recipient(server, pg_dsn):
    a, b = Client(server), Client(server)
    try:
        a.subscribe("clock")
        b.subscribe("clock")
        before = datetime.datetime.now(datetime.timezone.utc)
        post(server, "/debug/publish", {"channel": "clock", "message": 1})
        fa, fb = a.recv_json(), b.recv_json()
        assert fa["time"] == fb["time"] and fa["time"].endswith("Z")
        stamped = datetime.datetime.fromisoformat(fa["time"].replace("Z", "+00:00"))
        assert stamped >= before.replace(microsecond=before.microsecond // 1000 * 1000)
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        pg_notify(conn, "pgws_sync", '{"channel": "clock", "payload": 2}')  # SQL sets no time
        conn.close()
        assert a.recv_json()["time"].endswith("Z")  # stamped on arrival
    finally:
        a.close()
        b.close()


def test_the_slow_client_close_reason_is_configurable():
    hub = Hub()
    conn = Connection([], max_queue=1)
    conn.slow_reason = "going away: backpressure"
    hub.add(conn)
    hub.join(conn, "k")
    hub.fan_out([("k", "1")])
    hub.fan_out([("k", "2")])  # does not fit
    assert (conn.close_code, conn.close_reason) == (1013, "going away: backpressure")
    listener = Listener("")
    with pytest.raises(ConfigError, match="123"):
        PubSub(listener, slow_close_reason="x" * 124)
    endpoint = PubSub(listener, slow_close_reason="going away: backpressure")
    assert endpoint.slow_close_reason == "going away: backpressure"
    endpoint.close(0)


def test_an_origin_function_decides_instead_of_the_list(pg_dsn):
    g = serve_pubsub(pg_dsn, extra_env={"PGWS_ORIGIN_SUFFIX": ".example"})
    try:
        sock, head = raw_upgrade(g.port, headers={"Origin": "https://app.example"})
        assert head.startswith(b"HTTP/1.1 101")
        sock.close()
        sock, head = raw_upgrade(g.port, headers={"Origin": "http://127.0.0.1:%d" % g.port})
        assert head.startswith(b"HTTP/1.1 403")  # even the page's own origin: the function says
        sock.close()
    finally:
        g.stop()
    with pytest.raises(ConfigError, match="check_origin"):
        PubSub(Listener(""), check_origin="not callable")
