"""Push end to end under real gunicorn: users, tab windows, rooms, guests, hooks, bad input,
two workers, source restarts — with backend messages from NOTIFY and from Redis."""

import itertools
import json
import re

import psycopg2
import psycopg2.extensions
import pytest

from pgws_sync.push.messages import sign_auth_event
from pgws_sync import InvalidPayload, Listener, Push

from ..helpers import http_get, pg_notify, raw_upgrade, wait_for
from ..push_helpers import AUTH_KEY, Tab, api, push, serve_push, stats

_names = itertools.count()


def fresh(prefix: str) -> str:
    """A user or room name no other test uses (the module shares one server per source)."""
    return f"{prefix}{next(_names)}"


@pytest.fixture(scope="module", params=["notify", "redis"])
def shared_server(request, pg_dsn):
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    # no client_rate: the cycle tests send 1000 frames at once (the limiter has its own tests)
    g = serve_push(pg_dsn, redis_url, options={"client_rate": None, "health_detail": True})
    g.source = request.param
    yield g
    g.stop()


def held(server):
    """What the server holds for its sockets: sockets, hub keys, kept requests."""
    s = stats(server)
    return s["sockets"], s["keys"], s["requests"]


@pytest.fixture
def server(shared_server):
    """The module's server, once the tabs of earlier tests are gone from it (they close as
    those tests end): every test starts with nothing held for a socket."""
    wait_for(lambda: held(shared_server) == (0, 0, 0), message="earlier tests' sockets gone")
    return shared_server


@pytest.fixture
def tabs():
    made = []

    def connect(server, **kwargs):
        tab = Tab(server, **kwargs)
        made.append(tab)
        return tab

    yield connect
    for tab in made:
        tab.close()


def sentinel(server, tab_list, room=None):
    """Push a marker to a fresh room every tab in ``tab_list`` joins; each must get it next.

    Messages from one source arrive in order, so anything that was going to
    reach a tab before the marker would have come first.
    """
    room = room or fresh("sentinel-")
    for tab in tab_list:
        tab.join(room)
    push(server, {"pushToRoom": room, "payload": {"sentinel": room}})
    for tab in tab_list:
        assert tab.recv_json() == {"sentinel": room}


def test_first_frame_is_an_unguessable_tab_window_id(server, tabs):
    seen = set()
    for _ in range(20):
        tab = tabs(server)
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", tab.tab), tab.tab  # >= 128 random bits
        seen.add(tab.tab)
    assert len(seen) == 20


def test_push_to_user_reaches_every_socket_of_that_user_only(server, tabs):
    u1, u2 = fresh("user-"), fresh("user-")
    a, b = tabs(server, user=u1), tabs(server, user=u1)
    other, anonymous = tabs(server, user=u2), tabs(server)
    text = '{"pushToUser": "%s", "payload": {"n": 1.50, "list": [1,  2]}}' % u1
    push(server, text)
    for tab in (a, b):  # exactly the JSON text of the payload, as the backend wrote it
        assert tab.recv() == '{"n": 1.50, "list": [1,  2]}'
    sentinel(server, [a, b, other, anonymous])


def test_tab_window_id_narrows_to_one_socket_of_that_user(server, tabs):
    u1, u2 = fresh("user-"), fresh("user-")
    a, b, c = tabs(server, user=u1), tabs(server, user=u1), tabs(server, user=u2)
    push(server, {"pushToUser": u1, "tabWindowId": b.tab, "payload": "only b"})
    assert b.recv_json() == "only b"
    # another user's tab id does not reach it; an unknown one reaches nobody
    push(server, {"pushToUser": u1, "tabWindowId": c.tab, "payload": "not c"})
    push(server, {"pushToUser": u1, "tabWindowId": "no-such-tab", "payload": "nobody"})
    sentinel(server, [a, b, c])


def test_push_to_room_reaches_members_until_they_leave(server, tabs):
    room = fresh("room-")
    a, b, outside = tabs(server, user=fresh("u")), tabs(server), tabs(server)
    a.join(room)
    b.join(room)
    push(server, {"pushToRoom": room, "payload": {"x": 1}})
    assert a.recv_json() == {"x": 1} and b.recv_json() == {"x": 1}
    b.leave(room)
    push(server, {"pushToRoom": room, "payload": {"x": 2}})
    assert a.recv_json() == {"x": 2}
    sentinel(server, [a, b, outside])


def test_a_notify_on_the_push_channel_arrives_whichever_the_source(server, tabs, sender):
    """With a Redis source, NOTIFYs on BackgroundPush are read too: both sources at once."""
    room = fresh("both-")
    member = tabs(server)
    member.join(room)
    pg_notify(sender, "BackgroundPush", json.dumps({"pushToRoom": room, "payload": {"via": "sql"}}))
    assert member.recv_json() == {"via": "sql"}
    push(server, {"pushToRoom": room, "payload": {"via": server.source}})
    assert member.recv_json() == {"via": server.source}
    health = json.loads(http_get(server.url("/healthz"))[1])
    assert ("push_notify" in health) is (server.source == "redis"), health


def test_rooms_are_subscriptions(server, tabs):
    """A pub/sub subscriber of channel r is in room r, and a room member gets publications."""
    room = fresh("room-")
    member, subscriber = tabs(server), tabs(server)
    member.join(room)
    subscriber.send({"action": "subscribe", "channel": room, "id": 1})
    assert subscriber.recv_json() == {"event": "subscribed", "channel": room, "reply_to": 1}
    push(server, {"pushToRoom": room, "payload": "both"})
    assert member.recv_json() == "both" and subscriber.recv_json() == "both"


def test_permit_join_refuses_with_an_error_frame_and_the_socket_stays(server, tabs):
    private = fresh("private-")
    tab = tabs(server, user="mallory")
    tab.send({"joinRoom": private})
    assert tab.recv_json() == {"event": "error", "room": private,
                               "error": f"not allowed to join room {private!r}"}
    tab.send({"joinRoom": "boom"})  # the hook raises: refused, logged
    assert tab.recv_json() == {"event": "error", "room": "boom",
                               "error": "not allowed to join room 'boom'"}
    admin = tabs(server, user="admin")
    admin.join(private)
    push(server, {"pushToRoom": private, "payload": "secret"})
    assert admin.recv_json() == "secret"
    sentinel(server, [tab, admin])
    # the hook saw the user, the room and the upgrade request
    assert ["mallory", private, "/ws"] in stats(server)["joins"]


def test_bad_room_requests_get_error_frames(server, tabs):
    tab = tabs(server)
    tab.send('{"joinRoom": 5}')
    assert tab.recv_json() == {"event": "error", "error": "invalid room name: it must be a string"}
    tab.send('{"joinRoom": "a", "leaveRoom": "b"}')
    assert tab.recv_json()["event"] == "error"
    tab.send("garbage")
    assert tab.recv_json()["event"] == "error"
    tab.send(b"\x00\xff")
    assert tab.recv_json()["event"] == "error"
    sentinel(server, [tab])


def test_permit_connection_refuses_with_403(server):
    sock, head = raw_upgrade(server.port, headers={"X-Deny": "1"})
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, body
        body += chunk
    sock.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert body == b"connection not permitted"


def test_guest_sockets_move_to_the_user_who_logged_in(server, tabs):
    guest, user, other_guest = fresh("guest-"), fresh("user-"), fresh("guest-")
    g1, g2 = tabs(server, guest=guest), tabs(server, guest=guest)
    already, bystander = tabs(server, user=user), tabs(server, guest=other_guest)
    # with both headers, the user header wins
    both = tabs(server, user=user, headers={"X-Auth-Guest": guest})
    # guests and users live apart: a guest id is no user id, its pushes reach nobody
    push(server, {"pushToUser": guest, "payload": "a guest is not a user"})
    forged = {"guestId": guest, "authUserId": "mallory"}  # no sig, then a wrong one
    push(server, forged)
    push(server, {**forged, "sig": sign_auth_event("another key of 16+ chars", guest, "mallory")})
    push(server, {"guestId": guest, "authUserId": user,
                  "sig": sign_auth_event(AUTH_KEY, guest, user)})
    push(server, {"pushToUser": user, "payload": "as user"})
    for tab in (g1, g2, already, both):
        assert tab.recv_json() == "as user"
    push(server, {"pushToUser": guest, "payload": "nobody is this guest now"})
    sentinel(server, [g1, g2, already, bystander, both])
    moved = [c for c in stats(server)["connections"]
             if c["metadata"].get("tabWindowId") in (g1.tab, g2.tab)]
    assert [c["metadata"]["user"] for c in moved] == [user, user]


def test_auth_events_forged_by_another_database_role_move_no_guest(server, tabs, pg_dsn):
    """A role that is not the app's, with no grant at all, NOTIFYs AuthEvents for a guest: no
    sig, a wrong one, one that is not ASCII. None moves the guest, and what the same
    transaction sends after them is still delivered (the check refuses, it does not fail)."""
    guest, room = fresh("guest-"), fresh("room-")
    g = tabs(server, guest=guest)
    g.join(room)
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgws_forger")
        cur.execute("CREATE ROLE pgws_forger LOGIN")
    forger = psycopg2.connect(psycopg2.extensions.make_dsn(pg_dsn, user="pgws_forger"))
    try:
        with forger:  # one transaction: one batch for the push source
            for sig in (None, sign_auth_event("not the app's key, 16+", guest, "mallory"),
                        "é" * 64):
                event = {"guestId": guest, "authUserId": "mallory"}
                pg_notify(forger, "BackgroundPush", json.dumps(
                    event if sig is None else {**event, "sig": sig}))
            pg_notify(forger, "BackgroundPush",
                      json.dumps({"pushToRoom": room, "payload": "after the forgeries"}))
        assert g.recv_json() == "after the forgeries"
        push(server, {"pushToUser": "mallory", "payload": "for mallory"})
        sentinel(server, [g])  # nothing for mallory came first
        (conn,) = [c for c in stats(server)["connections"]
                   if c["metadata"].get("tabWindowId") == g.tab]
        assert conn["metadata"].get("guest") == guest and "user" not in conn["metadata"]
        wait_for(lambda: server.log().count("ignored an AuthEvent for guest "
                                            f"{guest!r}") == 3, message="a warning each")
    finally:
        forger.close()
        with admin.cursor() as cur:
            cur.execute("DROP ROLE pgws_forger")
        admin.close()


def test_server_side_api(server, tabs):
    user, room, guest = fresh("user-"), fresh("room-"), fresh("guest-")
    a, b, g = tabs(server, user=user), tabs(server, user=user), tabs(server, guest=guest)
    a.join(room)
    api(server, {"user": user, "payload": {"to": "user"}})
    assert a.recv_json() == {"to": "user"} and b.recv_json() == {"to": "user"}
    api(server, {"user": user, "tab": b.tab, "payload": "tab"})
    assert b.recv_json() == "tab"
    api(server, {"room": room, "payload": [1, "room"]})
    assert a.recv() == '[1,"room"]'
    api(server, {"guest": guest, "auth_user": user})
    api(server, {"user": user, "payload": "all three"})
    for tab in (a, b, g):
        assert tab.recv_json() == "all three"


def test_malformed_backend_messages_are_dropped_and_delivery_goes_on(server, tabs):
    user = fresh("user-")
    tab = tabs(server, user=user)
    bad = ["not json", "[1]", json.dumps({"pushToUser": user}), json.dumps({"payload": 1}),
           json.dumps({"pushToUser": user, "pushToRoom": "r", "payload": 1}),
           json.dumps({"pushToUser": 7, "payload": 1}), json.dumps({"guestId": "g"}), ""]
    for text in bad:
        push(server, text)
    push(server, {"pushToUser": user, "payload": "after the bad ones"})
    assert tab.recv_json() == "after the bad ones"
    wait_for(lambda: server.log().count("dropped a push message") >= len(bad),
             message="a warning per bad message")
    assert "without 'payload'" in server.log()


def test_an_anonymous_socket_is_in_no_user_set(server, tabs):
    tab = tabs(server)
    (conn,) = [c for c in stats(server)["connections"] if c["metadata"].get("tabWindowId") == tab.tab]
    assert "user" not in conn["metadata"]


def test_join_leave_cycles_leave_no_residue(server, tabs):
    before = held(server)
    tab = tabs(server, user=fresh("user-"))
    room = fresh("room-")
    for burst in range(10):  # 100 at a time: more than 256 unread frames is a policy close
        names = [f"{room}-{(burst * 100 + i) % 7}" for i in range(100)]
        for name in names:
            tab.send({"joinRoom": name})
            tab.send({"leaveRoom": name})
        replies = [tab.recv_json() for _ in range(200)]
        assert replies == [{"event": event, "room": name}
                           for name in names for event in ("joined", "left")]
    tab.close()
    wait_for(lambda: held(server) == before, message="nothing left of the socket")


def test_large_payloads(server, tabs):
    """NOTIFY takes less than 8000 bytes (a clear error); Redis takes far more."""
    user = fresh("user-")
    tab = tabs(server, user=user)
    big = "x" * 100_000
    if server.source == "notify":
        with pytest.raises(AssertionError, match="PayloadTooLarge|500"):
            api(server, {"user": user, "payload": big})
        assert "PayloadTooLarge" in server.log() or "8000" in server.log()
    else:
        api(server, {"user": user, "payload": big})
        assert tab.recv_json() == big
    sentinel(server, [tab])


def test_health_reports_the_push_source(server):
    status, body = http_get(server.url("/healthz"))
    health = json.loads(body)
    assert status == 200 and health["push_source"] == "connected", health
    assert health["listener"] == "connected"


@pytest.mark.parametrize("source", ["notify", "redis"])
def test_two_workers_push_to_user_reaches_each_socket_once(pg_dsn, request, source):
    redis_url = request.getfixturevalue("redis_url") if source == "redis" else None
    g = serve_push(pg_dsn, redis_url, workers=2)
    try:
        up = set()  # workers whose sources are up, whichever answers each request

        def both_up():
            now = stats(g)
            if now["listener"]["connected"] and now["source"]["connected"]:
                up.add(now["pid"])
            return len(up) == 2

        wait_for(both_up, message="both workers' sources up")
        by_pid = {}
        spare = []
        while len(by_pid) < 2:  # the kernel picks the worker: connect until both have one
            tab = Tab(g, user="u1", hello=True)
            if tab.pid in by_pid:
                spare.append(tab)
            else:
                by_pid[tab.pid] = tab
            assert len(spare) < 50, "every socket landed on one worker"
        everyone = [*by_pid.values(), *spare]
        push(g, {"pushToUser": "u1", "payload": {"once": True}})
        for tab in everyone:
            assert tab.recv_json() == {"once": True}
        push(g, {"pushToUser": "u1", "payload": "next"})
        for tab in everyone:  # the next frame is the next message: no duplicate came
            assert tab.recv_json() == "next"
        for tab in everyone:
            tab.close()
    finally:
        g.stop()


def until_event(tab, event):
    """Read frames until a control frame with ``event``; returns (frames before, that frame)."""
    before = []
    while True:
        frame = tab.recv_json()
        if isinstance(frame, dict) and frame.get("event") == event:
            return before, frame
        before.append(frame)


def test_listener_reconnect_sends_one_resync_naming_the_rooms(pg_dsn, sender, tabs):
    g = serve_push(pg_dsn)
    try:
        tab = tabs(g, user="u1")
        tab.join("r2")
        tab.join("r1")
        with sender.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (stats(g)["listener"]["backend_pid"],))
        before, resync = until_event(tab, "resync")
        assert before == [] and resync["channels"] == ["r1", "r2"] and resync["reason"]
        g.wait_up()
        push(g, {"pushToUser": "u1", "payload": "back"})
        assert tab.recv_json() == "back"  # and not a second resync: PubSub already said it
    finally:
        g.stop()


def test_redis_restart_mid_stream(pg_dsn, redis_server, tabs):
    g = serve_push(pg_dsn, redis_server.url, options={"health_detail": True})
    try:
        tab = tabs(g, user="u1")
        tab.join("live")
        other = tabs(g, user="u2")
        for i in range(20):
            push(g, {"pushToRoom": "live", "payload": i})
        redis_server.stop()  # killed: whatever was in flight may be lost, and clients are told
        status, body = http_get(g.url("/healthz"))
        wait_for(lambda: http_get(g.url("/healthz"))[0] == 503, message="unhealthy without Redis")
        health = json.loads(http_get(g.url("/healthz"))[1])
        assert health["reason"] == "redis unreachable" and health["push_source"] == "disconnected"
        redis_server.start()
        before, resync = until_event(tab, "resync")
        assert before == list(range(20)) and resync["channels"] == ["live"], (before, resync)
        assert until_event(other, "resync")[1]["channels"] == []
        g.wait_up()  # healthy again: subscribed on the new connection
        for i in range(20, 40):
            push(g, {"pushToRoom": "live", "payload": i})
        assert [tab.recv_json() for _ in range(20)] == list(range(20, 40))
        push(g, {"pushToUser": "u2", "payload": "u2 too"})
        assert other.recv_json() == "u2 too"
    finally:
        g.stop()


def test_server_side_api_refuses_names_receivers_would_drop(pg_dsn):
    endpoint = Push(Listener(pg_dsn))
    try:
        for bad in ("", "x" * 201, "tab\n"):
            with pytest.raises(InvalidPayload, match="not a valid name"):
                endpoint.push_to_user(bad, {"a": 1})
            with pytest.raises(InvalidPayload, match="not a valid name"):
                endpoint.push_to_room(bad, 1)
        with pytest.raises(InvalidPayload, match="cannot be sent as JSON"):
            endpoint.push_to_room("r", object())
        with pytest.raises(InvalidPayload, match="'tabWindowId' is not a valid name"):
            endpoint.push_to_user("u", 1, tab_window_id="")
    finally:
        endpoint.close()
        endpoint.listener.stop()
