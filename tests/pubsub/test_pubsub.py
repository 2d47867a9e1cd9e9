"""PubSub end to end under real gunicorn: subscriptions, publishing, hooks, bad input, workers."""

import base64
import json
import urllib.request
import uuid
import re
import threading

import psycopg2
import pytest
import simple_websocket

from pgws_sync import InvalidChannel, Listener, PayloadTooLarge, PubSub, publish
from pgws_sync._formats import MAX_NAME_CHARS as MAX_TOPIC_CHARS

from ..helpers import Gunicorn, ROOT, Ws, http_get, raw_upgrade, wait_for
from ..pubsub_helpers import Client, post, serve_pubsub, sql_publish, stats, until_event, wait_sockets


@pytest.fixture(scope="module")
def server(pg_dsn):
    # no client_rate: the cycle tests send 1000 frames at once (the limiter has its own tests)
    g = serve_pubsub(pg_dsn, options={"max_message_size": 65536, "client_rate": None})
    yield g
    g.stop()


@pytest.fixture
def connect(server):
    made = []

    def make(headers=None):
        client = Client(server, headers=headers)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    wait_sockets(server, 0)


def test_connect_count_list_and_metadata(server, connect):
    a = connect({"X-User": "ann"})
    b = connect()
    a.subscribe("news")
    a.subscribe("weather", backpressure="drop")
    listed = {c["id"]: c for c in stats(server)["connections"]}
    assert stats(server)["sockets"] == 2 and set(listed) == {a.id, b.id}
    assert listed[a.id]["metadata"] == {"user": "ann"}
    assert listed[b.id]["metadata"] == {"user": "anonymous"}
    assert listed[a.id]["subscriptions"] == ["news", "weather"] and listed[b.id]["subscriptions"] == []
    assert listed[a.id]["audiences"] == ["default"]
    assert listed[a.id]["queue_depth"] == 0 and listed[a.id]["dropped"] == {}
    a.close()
    wait_sockets(server, 1)
    assert [c["id"] for c in stats(server)["connections"]] == [b.id]
    assert a.id in stats(server)["disconnects"]


def test_subscribe_publish_unsubscribe(server, connect, sender):
    sub, other = connect(), connect()
    sub.subscribe("g")
    other.subscribe("h")
    post(server, "/debug/publish", {"channel": "g", "message": {"n": 1}})
    frame = sub.recv_json()
    assert frame["channel"] == "g" and frame["payload"] == {"n": 1} and uuid.UUID(frame["id"])
    assert sub.request(action="subscribe", channel="g", id="again") == \
        {"event": "subscribed", "channel": "g", "reply_to": "again"}  # idempotent
    assert sub.request(action="unsubscribe", channel="g", id="m2") == \
        {"event": "unsubscribed", "channel": "g", "reply_to": "m2"}
    post(server, "/debug/publish", {"channel": "g", "message": {"n": 2}})
    post(server, "/debug/publish", {"channel": "h", "message": {"n": 3}})
    assert other.recv_json()["payload"] == {"n": 3}
    sub.subscribe("h")
    post(server, "/debug/publish", {"channel": "h", "message": {"n": 4}})
    assert sub.recv_json()["payload"] == {"n": 4}  # {"n": 2} never came
    assert other.recv_json()["payload"] == {"n": 4}


def test_envelope_per_type_from_python_and_sql(server, connect, sender):
    sub = connect()
    sub.subscribe("types")
    post(server, "/debug/publish", {"channel": "types", "message": {"json": [1, "two"]}})
    post(server, "/debug/publish", {"channel": "types", "message": "a line\nand \u00e9", "type": "text"})
    blob = bytes(range(256)) * 4
    post(server, "/debug/publish", {"channel": "types", "type": "binary",
                                    "message": base64.b64encode(blob).decode()})
    frames = [sub.recv() for _ in range(3)]
    first, second = json.loads(frames[0]), json.loads(frames[1])
    assert list(first) == ["channel", "payload", "id"] and first["payload"] == {"json": [1, "two"]}
    assert second["type"] == "text" and second["payload"] == "a line\nand \u00e9"
    assert second["channel"] == "types" and second["id"] != first["id"]
    assert frames[2] == blob  # a binary WebSocket frame, bytes as published
    # from SQL, in a transaction: nothing until commit, then the payload as written
    body = '{"z" : 1, "big" : 123456789012345678901234567890, "f" : 1.50}'
    sender.autocommit = False
    with sender.cursor() as cur:
        cur.execute("SELECT pg_notify('pgws_sync', %s)",
                    ('{"channel": "types", "id": "sql-1", "payload": ' + body + "}",))
    sql_publish(sender, "types", "json_build_object('n', %s)", (5,))
    post(server, "/debug/publish", {"channel": "types", "message": "committed first"})
    assert json.loads(sub.recv())["payload"] == "committed first"
    sender.commit()
    sender.autocommit = True
    raw = sub.recv()
    assert body in raw and json.loads(raw)["id"] == "sql-1"
    assert json.loads(sub.recv())["payload"] == {"n": 5}


def test_publish_from_another_process_with_the_library_function(server, connect, pg_dsn):
    sub = connect()
    sub.subscribe("elsewhere")
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn:  # one transaction: leaves at commit
            message_id = publish(conn, "elsewhere", {"from": "a script"})
            publish(conn, None, "just you", type="text", to=sub.id)
        frames = [sub.recv_json(), sub.recv_json()]
    finally:
        conn.close()
    assert frames[0] == {"channel": "elsewhere", "payload": {"from": "a script"}, "id": message_id}
    assert frames[1]["payload"] == "just you" and "channel" not in frames[1]


def test_client_publish_needs_permission_and_gets_an_ack(server, connect):
    writer = connect({"X-User": "writer"})
    anonymous = connect()
    reader = connect()
    reader.subscribe("room")
    ack = writer.request(action="publish", channel="room", payload={"b": 2,  "a": 1}, id="m3")
    assert ack["event"] == "published" and ack["reply_to"] == "m3" and ack["channel"] == "room"
    frame = reader.recv_json()
    assert frame == {"channel": "room", "payload": {"b": 2, "a": 1}, "id": ack["id"]}
    refused = anonymous.request(action="publish", channel="room", payload=1, id="m4")
    assert refused == {"event": "error", "error": "not allowed to publish to 'room'", "reply_to": "m4"}
    refused = writer.request(action="publish", channel="readonly-x", payload=1, id="m5")
    assert refused["error"] == "not allowed to publish to 'readonly-x'"
    ack = writer.request(action="publish", channel="room", payload="after refusals", id="m6")
    assert ack["event"] == "published"
    assert reader.recv_json()["payload"] == "after refusals"  # nothing refused was delivered


def test_send_to_reaches_only_its_target(server, connect):
    target, bystander = connect(), connect()
    target.subscribe("shared")
    bystander.subscribe("shared")
    post(server, "/debug/send_to", {"to": target.id, "message": {"secret": 1}})
    post(server, "/debug/send_to", {"to": target.id, "message": "hi", "type": "text", "channel": "shared"})
    post(server, "/debug/send_to", {"to": str(uuid.uuid4()), "message": {"nobody": 1}})
    post(server, "/debug/publish", {"channel": "shared", "message": {"everyone": 1}})
    assert target.recv_json()["payload"] == {"secret": 1}
    second = target.recv_json()
    assert second["payload"] == "hi" and second["channel"] == "shared" and second["type"] == "text"
    assert target.recv_json()["payload"] == {"everyone": 1}
    assert bystander.recv_json()["payload"] == {"everyone": 1}  # first thing it saw


def test_hooks_refusing(server, connect):
    sock, head = raw_upgrade(server.port, headers={"X-Refuse": "no token"})
    assert head.startswith(b"HTTP/1.1 401") and b"no token" in sock.recv(1000) + head
    sock.close()
    client, other = connect(), connect()
    other.subscribe("ok")
    assert client.request(action="subscribe", channel="forbidden-1", id=1) == \
        {"event": "error", "error": "not allowed to subscribe to 'forbidden-1'", "reply_to": 1}
    assert client.request(action="subscribe", channel="boom", id=2) == \
        {"event": "error", "error": "not allowed to subscribe to 'boom'", "reply_to": 2}
    assert "can_subscribe failed" in server.log()
    listed = {c["id"]: c for c in stats(server)["connections"]}
    assert listed[client.id]["subscriptions"] == []
    post(server, "/debug/publish", {"channel": "forbidden-1", "message": 1})
    post(server, "/debug/publish", {"channel": "ok", "message": 2})
    assert other.recv_json()["payload"] == 2
    client.subscribe("ok")
    post(server, "/debug/publish", {"channel": "ok", "message": 3})
    assert client.recv_json()["payload"] == 3  # nothing from forbidden-1 came first


@pytest.mark.parametrize("frame, error, reply_to", [
    ("this is not json", "invalid JSON: not a JSON object", None),
    ('{"action": "subscribe", "channel": "g"', "invalid JSON", None),
    (b"\x00\x01binary", "binary frames are not understood; send JSON text frames", None),
    ('{"action": "jump", "channel": "g", "id": "x"}', "unknown action 'jump'", "x"),
    ('{"action": "subscribe", "id": "y"}', "missing field 'channel'", "y"),
    ('{"action": "publish", "channel": "g", "id": "z"}', "missing field 'payload'", "z"),
    ('{"action": "subscribe", "channel": "' + "c" * (MAX_TOPIC_CHARS + 1) + '", "id": 1}',
     "invalid channel name", 1),
    ('{"action": "subscribe", "channel": "g", "backpressure": "ignore", "id": 2}', "backpressure", 2),
    ('{"id": "deep", "action": ' + "[" * 20000 + "]" * 20000 + "}", "invalid JSON: nested too deeply",
     None),
])
def test_garbage_gets_an_error_frame_and_the_socket_stays(server, connect, frame, error, reply_to):
    bad, other = connect(), connect()
    other.subscribe("still")
    bad.subscribe("still")
    bad.ws.client.send(frame)
    reply = bad.recv_json()
    assert reply["event"] == "error" and error in reply["error"], reply
    assert reply.get("reply_to") == reply_to
    post(server, "/debug/publish", {"channel": "still", "message": "delivered"})
    assert bad.recv_json()["payload"] == "delivered"
    assert other.recv_json()["payload"] == "delivered"


def test_oversized_client_frames(server, connect):
    writer, other = connect({"X-User": "w"}), connect()
    other.subscribe("big")
    # fits the WebSocket limit but not a NOTIFY: an error frame, nothing delivered
    reply = writer.request(action="publish", channel="big", payload="x" * 9000, id="huge")
    assert reply["event"] == "error" and reply["reply_to"] == "huge"
    assert reply["error"].startswith("payload too large: the message would be")
    ack = writer.request(action="publish", channel="big", payload="x" * 7000, id="fits")
    assert ack["event"] == "published"
    assert other.recv_json()["payload"] == "x" * 7000
    # over max_message_size (64 KiB here): the core closes that socket with 1009
    writer.ws.client.send("y" * 70000)
    assert writer.ws.expect_close()[0] == 1009
    post(server, "/debug/publish", {"channel": "big", "message": "after"})
    assert other.recv_json()["payload"] == "after"


def test_server_side_publish_errors_are_clear(pg_dsn):
    endpoint = PubSub(Listener(pg_dsn))
    try:
        with pytest.raises(PayloadTooLarge) as info:
            endpoint.publish("g", "x" * 8000, type="text")
        assert "8000" in str(info.value) or "7999" in str(info.value)
        with pytest.raises(InvalidChannel):
            endpoint.publish("", 1)
        with pytest.raises(Exception) as info:
            endpoint.publish("g", 1, type="yaml")
        assert "unknown message type 'yaml'" in str(info.value)
    finally:
        endpoint.close()
        endpoint.listener.stop()


def test_ten_concurrent_clients(server, connect):
    clients = [connect() for _ in range(10)]
    for c in clients:
        c.subscribe("ten")
    results = {}

    def read_all(c):
        results[c.id] = [c.recv_json()["payload"]["i"] for _ in range(50)]

    readers = [threading.Thread(target=read_all, args=(c,), name=f"test-reader-{i}", daemon=True)
               for i, c in enumerate(clients)]
    for t in readers:
        t.start()
    for i in range(50):
        post(server, "/debug/publish", {"channel": "ten", "message": {"i": i}})
    for t in readers:
        t.join(30)
    assert len(results) == 10 and all(v == list(range(50)) for v in results.values())


def test_shutdown_closes_sockets_and_refuses_new_upgrades(pg_dsn):
    g = serve_pubsub(pg_dsn)
    try:
        clients = [Client(g) for _ in range(3)]
        wait_sockets(g, 3)
        assert http_get(g.url("/debug/close"))[0] == 200
        for c in clients:
            assert c.ws.expect_close() == (1001, "server shutdown")
        sock, head = raw_upgrade(g.port)
        assert head.startswith(b"HTTP/1.1 503")
        sock.close()
        assert stats(g)["sockets"] == 0
    finally:
        g.stop()


def test_1000_subscribe_unsubscribe_cycles_leave_no_residue(server, connect):
    client, other = connect(), connect()
    other.subscribe("steady")
    base_keys = stats(server)["keys"]
    replies = []
    for start in range(0, 1000, 50):  # in rounds: more than max_backlog unread would be 1008
        for i in range(start, start + 50):
            channel = f"cycle-{i % 7}"
            client.send(action="subscribe", channel=channel, id=i,
                        **({"backpressure": "drop"} if i % 2 else {}))
            client.send(action="unsubscribe", channel=channel, id=-i - 1)
        replies += [client.recv_json() for _ in range(100)]
    assert [r["event"] for r in replies] == ["subscribed", "unsubscribed"] * 1000
    assert [r["reply_to"] for r in replies[:4]] == [0, -1, 1, -2]
    now = stats(server)
    assert now["keys"] == base_keys and now["policies"] == 0
    assert {c["id"]: c["subscriptions"] for c in now["connections"]}[client.id] == []
    post(server, "/debug/publish", {"channel": "cycle-3", "message": "nobody"})
    post(server, "/debug/publish", {"channel": "steady", "message": "somebody"})
    assert other.recv_json()["payload"] == "somebody"
    client.subscribe("steady")
    post(server, "/debug/publish", {"channel": "steady", "message": "again"})
    assert client.recv_json()["payload"] == "again"


def test_subscription_limit(pg_dsn):
    g = serve_pubsub(pg_dsn, options={"max_subscriptions": 3})
    try:
        c = Client(g)
        for name in "abc":
            c.subscribe(name)
        assert c.request(action="subscribe", channel="d", id="4th") == {
            "event": "error", "reply_to": "4th",
            "error": "too many subscriptions: at most 3 per connection"}
        c.subscribe("a")  # already subscribed: still fine
        post(g, "/debug/publish", {"channel": "c", "message": "c"})
        assert c.recv_json()["payload"] == "c"
        c.close()
    finally:
        g.stop()


def test_two_workers_publish_across(pg_dsn):
    g = serve_pubsub(pg_dsn, workers=2)
    try:
        listening = set()  # both workers' listeners, whichever answers each request

        def both_listening():
            now = stats(g)
            if "pgws_sync" in now["listener"]["channels"]:
                listening.add(now["pid"])
            return len(listening) == 2

        wait_for(both_listening, message="both workers listening")
        by_pid = {}
        spare = []
        while len(by_pid) < 2:  # the kernel picks the worker: connect until both have one
            c = Client(g, headers={"X-User": "w"})
            if c.pid in by_pid:
                spare.append(c)
            else:
                by_pid[c.pid] = c
            assert len(spare) < 50, "every socket landed on one worker"
        a, b = by_pid.values()
        assert a.pid != b.pid
        for c in (a, b):
            c.subscribe("across")
        # a client on worker A publishes; the subscriber on worker B receives it
        a.send(action="publish", channel="across", payload={"from": a.pid}, id="x")
        # the ack and the publisher's own copy may come in either order
        ack, own = sorted([a.recv_json(), a.recv_json()], key=lambda f: "event" not in f)
        assert ack["event"] == "published" and own["id"] == ack["id"]
        assert b.recv_json() == {"channel": "across", "payload": {"from": a.pid}, "id": ack["id"]}
        # send_to reaches a connection whichever worker takes the HTTP request
        served = set()
        for i in range(40):
            served.add(post(g, "/debug/send_to", {"to": b.id, "message": {"i": i}})["pid"])
            assert b.recv_json()["payload"] == {"i": i}
            if len(served) == 2:
                break
        assert served == {a.pid, b.pid}
        # server-side publish from either worker reaches both, once each
        post(g, "/debug/publish", {"channel": "across", "message": "both"})
        assert a.recv_json()["payload"] == "both" and b.recv_json()["payload"] == "both"
        for c in [a, b, *spare]:
            c.close()
    finally:
        g.stop()


def test_resync_after_listener_reconnect_names_the_subscriptions(server, connect, sender):
    client = connect()
    client.subscribe("r1")
    client.subscribe("r2")
    with sender.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (stats(server)["listener"]["backend_pid"],))
    before, resync = until_event(client, "resync")
    assert before == [] and resync["channels"] == ["r1", "r2"]
    server.wait_up()
    post(server, "/debug/publish", {"channel": "r1", "message": "back"})
    assert client.recv_json()["payload"] == "back"


def test_bad_publications_from_sql_are_dropped_with_a_warning(server, connect, sender):
    client = connect()
    client.subscribe("ok")
    with sender.cursor() as cur:
        for bad in ["not json", '{"payload": 1}', '{"channel": "ok"}',
                    '{"channel": "ok", "type": "binary", "payload": "%%%"}']:
            cur.execute("SELECT pg_notify('pgws_sync', %s)", (bad,))
    sql_publish(sender, "ok", "json_build_object('n', %s)", (1,))
    assert client.recv_json()["payload"] == {"n": 1}
    assert "dropped a publication on channel 'pgws_sync'" in server.log()


def test_closed_client_socket_runs_on_disconnect_once(server, connect):
    client = connect()
    client.subscribe("x")
    client.ws.client.close()
    wait_for(lambda: client.id in stats(server)["disconnects"], message="on_disconnect")
    with pytest.raises(simple_websocket.ConnectionClosed):
        client.ws.client.send("late")
    assert stats(server)["disconnects"].count(client.id) == 1


def test_pubsub_example_runs_as_its_docstring_says(pg_dsn, sender):
    text = (ROOT / "examples" / "pubsub.py").read_text()
    assert "gunicorn -c python:pgws_sync.gunicorn" in text and "examples.pubsub:app" in text
    g = Gunicorn("examples.pubsub:app", env={"PGWS_DB_URI": pg_dsn}).wait_up()
    try:
        user, anonymous = Ws(g.ws_url(), headers={"X-User": "ann"}), Ws(g.ws_url())
        for ws in (user, anonymous):
            for channel in ("prices", "chat"):
                ws.client.send(json.dumps({"action": "subscribe", "channel": channel}))
                assert ws.recv_json()["event"] == "subscribed"
        anonymous.client.send(json.dumps({"action": "subscribe", "channel": "other", "id": 1}))
        assert anonymous.recv_json()["error"] == "not allowed to subscribe to 'other'"
        anonymous.client.send(json.dumps({"action": "publish", "channel": "chat", "payload": "hi", "id": 2}))
        assert anonymous.recv_json()["error"] == "not allowed to publish to 'chat'"
        listed = json.loads(http_get(g.url("/connections"))[1])  # one worker's view
        assert listed["count"] == len(listed["connections"]) == 2
        assert {c["metadata"]["user"] for c in listed["connections"]} == {"ann", None}
        request = urllib.request.Request(g.url("/prices/ACME"), data=b"12.5",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
        batch = {"name": "prices", "messages": [{"symbol": "ACME", "price": 12.5}]}
        assert user.recv_json()["payload"] == batch and anonymous.recv_json()["payload"] == batch
        sql_publish(sender, "chat", "json_build_object('text', %s)", ("hello from SQL",))
        assert user.recv_json()["payload"] == {"text": "hello from SQL"}
        assert anonymous.recv_json()["payload"] == {"text": "hello from SQL"}
        user.client.send(json.dumps({"action": "publish", "channel": "chat", "payload": {"text": "hi"}}))
        frames = [user.recv_json(), user.recv_json()]
        assert {f.get("event") for f in frames} == {"published", None}
        assert anonymous.recv_json()["payload"] == {"text": "hi"}
        user.close()
        anonymous.close()
    finally:
        g.stop()


def test_readme_pubsub_snippet_is_the_example():
    section = (ROOT / "docs" / "guides" / "pubsub.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = (ROOT / "examples" / "pubsub.py").read_text()
    assert snippet.strip() and all(line in example for line in snippet.splitlines())
