"""pgws.js, the browser client, in a real headless Chromium against real gunicorn and PostgreSQL.

Its backoff; reconnecting, re-subscribing and re-joining rooms across server restarts
(PubSub, Push); resync and gap events; the tabWindowId; fresh tokens after 3001 (JWT
gateway); the README snippet; and where pgws.js is served.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Iterator, List, Optional
import threading

import pytest
from flask import Flask
from playwright.sync_api import Page
import psycopg2

from pgws_sync import Listener, Pgws, publish_durable
from pgws_sync._core.assets import client_esm, client_js

from .clirun import Serve, no_database_env
from .helpers import Gunicorn, ROOT, TcpProxy, http_get, pg_notify, wait_for
from .jwt_helpers import SECRET, make_token
from .pubsub_helpers import post, serve_pubsub, stats
from .push_helpers import api, push, serve_push
from .push_helpers import stats as push_stats
from .durable_helpers import new_log, serve_durable

EVENTS = ["open", "close", "message", "resync", "gap", "tabwindow", "error", "reconnecting"]

# Defines window.record(sock): every event of ``sock`` lands in window.events as {name, ...detail};
# and within(promise): the promise, or a rejection if it is not settled in 15 s.
RECORDER = """names => {
  window.events = [];
  window.within = (promise) => Promise.race([promise, new Promise((resolve, reject) =>
    setTimeout(() => reject(new Error("no answer within 15 s")), 15000))]);
  window.record = (sock) => {
    for (const name of names) {
      sock.on(name, (detail) => {
        const entry = Object.assign({name}, detail);
        delete entry.cause;
        window.events.push(entry);
      });
    }
    window.sock = sock;
    return sock;
  };
}"""

# The Fibonacci numbers pgws.js scales its first delay by, attempt 1 to 14.
FIBONACCI = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377]
DEFAULT_MIN_MS = 1200
DEFAULT_MAX_MS = 30_000
GUIDE = ROOT / "docs" / "guides" / "browser-client.md"


def load_client(page: Page, server: Gunicorn, path: str = "/") -> None:
    """Open ``path`` of ``server`` and load the server's /pgws.js into it with a script tag."""
    page.goto(server.url(path))
    page.add_script_tag(url=server.url("/pgws.js"))
    page.evaluate(RECORDER, EVENTS)


def events(page: Page, name: Optional[str] = None) -> List[Dict[str, Any]]:
    return page.evaluate("n => window.events.filter(e => n === null || e.name === n)", name)


def wait_count(page: Page, name: str, count: int, timeout: float = 15.0) -> None:
    page.wait_for_function("([n, c]) => window.events.filter(e => e.name === n).length >= c",
                           arg=[name, count], timeout=timeout * 1000)


def wait_message(page: Page, text: str, timeout: float = 15.0) -> Dict[str, Any]:
    """The first message event whose payload contains ``text``."""
    page.wait_for_function(
        "t => window.events.some(e => e.name === 'message' && JSON.stringify(e.payload).includes(t))",
        arg=text, timeout=timeout * 1000)
    return next(e for e in events(page, "message")
                if text in json.dumps(e["payload"], separators=(",", ":")))


def subscriptions(server: Gunicorn) -> List[List[str]]:
    return [c["subscriptions"] for c in stats(server)["connections"]]


# ------------------------------------------------------------------------ backoff


def test_backoff_is_fibonacci_from_1_2_s_capped_at_30_s_with_jitter(page: Page) -> None:
    page.add_script_tag(content=client_js())
    nominal = page.evaluate("n => Array.from({length: n}, (_, i) => PgwsSocket.backoff(i + 1, () => 0.5))",
                            len(FIBONACCI))
    assert nominal == [min(DEFAULT_MAX_MS, DEFAULT_MIN_MS * f) for f in FIBONACCI]
    assert nominal[:6] == [1200, 1200, 2400, 3600, 6000, 9600]
    assert nominal[8:] == [DEFAULT_MAX_MS] * 6  # 1.2 s x 34 is over the cap
    assert page.evaluate("PgwsSocket.backoff(1000, () => 0.5)") == DEFAULT_MAX_MS

    # Jitter: +-20% around the nominal delay, never above the cap; the extremes and real draws.
    low = page.evaluate("n => Array.from({length: n}, (_, i) => PgwsSocket.backoff(i + 1, () => 0))",
                        len(FIBONACCI))
    high = page.evaluate("n => Array.from({length: n}, (_, i) => PgwsSocket.backoff(i + 1, () => 0.999999))",
                         len(FIBONACCI))
    assert low == [round(0.8 * n) for n in nominal]
    assert high[:5] == [1440, 1440, 2880, 4320, 7200] and max(high) == DEFAULT_MAX_MS
    drawn = page.evaluate("""() => Array.from({length: 14}, (_, i) =>
        Array.from({length: 200}, () => PgwsSocket.backoff(i + 1)))""")
    for attempt, (n, draws) in enumerate(zip(nominal, drawn), start=1):
        assert all(round(0.8 * n) <= d <= min(DEFAULT_MAX_MS, round(1.2 * n)) for d in draws), attempt
        assert len(set(draws)) > 10, f"attempt {attempt}: no jitter in {sorted(set(draws))}"

    # The base and the cap are options.
    custom = page.evaluate("""() => [1, 2, 3, 4, 5].map(a =>
        PgwsSocket.backoff(a, () => 0.5, {minDelay: 100, maxDelay: 250}))""")
    assert custom == [100, 100, 200, 250, 250]
    defaults = page.evaluate("() => PgwsSocket.DEFAULTS")
    assert (defaults["minDelay"], defaults["maxDelay"], defaults["jitter"]) == (1200, 30000, 0.2)
    assert (defaults["heartbeatInterval"], defaults["heartbeatTimeout"], defaults["resetAfter"]) == (
        25000, 10000, 5000)


def test_bad_options_fail_at_once(page: Page) -> None:
    page.add_script_tag(content=client_js())
    errors = page.evaluate("""() => [
        () => new PgwsSocket(42),
        () => new PgwsSocket("ftp://example.com/ws"),
        () => new PgwsSocket("ws://127.0.0.1:9/ws", {minDelay: 0}),
        () => new PgwsSocket("ws://127.0.0.1:9/ws", {minDelay: 500, maxDelay: 100}),
        () => new PgwsSocket("ws://127.0.0.1:9/ws", {token: "not a function"}),
        () => new PgwsSocket("ws://127.0.0.1:9/ws", {tokenIn: "cookie"}),
      ].map(make => { try { make().close(); return null; } catch (e) { return e.message; } })""")
    assert all(e is not None and e.startswith("pgws: ") for e in errors), errors


# ------------------------------------------------------------------ PubSub server


@pytest.fixture
def pubsub(pg_dsn: str) -> Iterator[Dict[str, Gunicorn]]:
    """The pub/sub test app under gunicorn, in a dict so a test can swap in a restarted one."""
    held = {"server": serve_pubsub(pg_dsn)}
    yield held
    held["server"].stop()


def test_reconnects_by_itself_resubscribes_and_receives(pubsub: Dict[str, Gunicorn], pg_dsn: str,
                                                         page: Page) -> None:
    server = pubsub["server"]
    load_client(page, server)
    # A fixed random number: the delays are exactly 100 ms x Fibonacci, so the test can check them.
    reply = page.evaluate("""async () => {
        const sock = record(new PgwsSocket("/ws", {minDelay: 100, maxDelay: 5000, random: () => 0.5,
                                                     resetAfter: 300}));
        return await within(sock.subscribe("news"));
    }""")
    assert reply["event"] == "subscribed" and reply["channel"] == "news"
    assert page.evaluate("[sock.connected, sock.readyState, sock.channels]") == [True, 1, ["news"]]
    refused = page.evaluate("() => within(sock.subscribe('forbidden-x')).then(() => null, e => e.message)")
    assert refused == "pgws: not allowed to subscribe to 'forbidden-x'"
    error = events(page, "error")[-1]
    assert (error["action"], error["channel"], error["error"]) == (
        "subscribe", "forbidden-x", "not allowed to subscribe to 'forbidden-x'")
    assert page.evaluate("sock.channels") == ["news"]  # a refused channel is forgotten
    before = f"before {uuid.uuid4()}"
    post(server, "/debug/publish", {"channel": "news", "message": {"text": before}})
    message = wait_message(page, before)
    assert message["channel"] == "news" and message["payload"] == {"text": before}

    server.stop()  # SIGTERM: the page's socket gets 1001
    wait_count(page, "close", 4)  # the 1001 close, then connects the stopped server refuses
    server = pubsub["server"] = serve_pubsub(pg_dsn, port=server.port)
    wait_count(page, "open", 2, timeout=30)
    opened = events(page, "open")
    assert [o["reconnected"] for o in opened] == [False, True]
    closes = events(page, "close")
    assert closes[0]["code"] == 1001 and closes[0]["willReconnect"] is True
    assert all(c["code"] == 1006 for c in closes[1:])  # nobody listened on the port
    delays = [c["delay"] for c in closes]
    assert delays == [100 * f for f in FIBONACCI[:len(delays)]]
    page.wait_for_function("sock.attempt === 0")  # reset once the socket stayed open 300 ms
    reconnecting = [r["attempt"] for r in events(page, "reconnecting")]
    assert reconnecting == list(range(1, len(closes) + 1))

    wait_for(lambda: subscriptions(server) == [["news"]], message="the page to subscribe again")
    after = f"after {uuid.uuid4()}"
    post(server, "/debug/publish", {"channel": "news", "message": {"text": after}})
    assert wait_message(page, after)["channel"] == "news"

    # The backoff starts over after a stable open: the next loss waits the first delay again.
    server.stop()
    wait_count(page, "close", len(closes) + 1)
    assert events(page, "close")[len(closes)]["delay"] == 100


def test_closed_by_the_app_stays_closed(pubsub: Dict[str, Gunicorn], page: Page) -> None:
    server = pubsub["server"]
    load_client(page, server)
    page.evaluate("record(new PgwsSocket('/ws', {minDelay: 50}))")
    wait_count(page, "open", 1)
    page.evaluate("sock.subscribe('news')")
    wait_for(lambda: subscriptions(server) == [["news"]], message="the subscription")
    page.evaluate("sock.close()")
    wait_count(page, "close", 1)
    close = events(page, "close")[0]
    assert close["code"] == 1000 and close["willReconnect"] is False and close["delay"] is None
    wait_for(lambda: stats(server)["sockets"] == 0, message="the server to see the socket go")
    assert page.evaluate("sock.readyState") == 3
    failed = page.evaluate("() => within(sock.publish('news', 1)).then(() => null, e => e.message)")
    assert "close() was called" in failed
    # Nothing can reconnect: no socket, no reconnect timer (a reconnect only ever starts from one).
    assert page.evaluate("[sock._ws, sock._timer]") == [None, None]
    assert not events(page, "reconnecting") and len(events(page, "open")) == 1


def test_messages_sent_while_disconnected_wait_for_the_socket(pubsub: Dict[str, Gunicorn],
                                                              page: Page) -> None:
    server = pubsub["server"]
    load_client(page, server)
    # Called before anything connects: the subscribe is replayed and the publish queued behind it.
    result = page.evaluate("""async () => {
        const sock = record(new PgwsSocket("/ws", {minDelay: 50, maxQueued: 2}));
        const subscribed = sock.subscribe("drafts");
        const refused = within(sock.publish("drafts", {n: 1})).then(() => null, e => e.message);
        sock.send({action: "unsubscribe", channel: "other", id: "mine"});
        let full = null;
        try { sock.send("one too many"); } catch (e) { full = e.message; }
        return [(await within(subscribed)).event, await refused, full];
    }""")
    assert result[0] == "subscribed"
    assert result[1] == "pgws: not allowed to publish to 'drafts'"  # anonymous may not publish
    assert "maxQueued" in result[2]
    # The app's own frame went out too; its answer is the app's message, not swallowed.
    reply = wait_message(page, "mine")
    assert reply["payload"] == {"event": "unsubscribed", "channel": "other", "reply_to": "mine"}
    welcome = next(e for e in events(page, "message") if e["payload"].get("event") == "welcome")
    assert welcome["payload"]["id"] == stats(server)["connections"][0]["id"]


def test_resync_is_an_event(pubsub: Dict[str, Gunicorn], sender: Any, page: Page) -> None:
    server = pubsub["server"]
    load_client(page, server)
    page.evaluate("async () => { await within(record(new PgwsSocket('/ws')).subscribe('r1')); }")
    with sender.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (stats(server)["listener"]["backend_pid"],))
    wait_count(page, "resync", 1)
    resync = events(page, "resync")[0]
    assert resync["channels"] == ["r1"] and resync["reason"]
    assert len(events(page, "open")) == 1 and not events(page, "close")  # the socket stayed up
    server.wait_up()
    post(server, "/debug/publish", {"channel": "r1", "message": "still here"})
    wait_message(page, "still here")


def test_gap_is_an_event(pg_dsn: str, page: Page) -> None:
    """The page stops reading (its main thread busy) while it publishes: frames are dropped."""
    server = serve_pubsub(pg_dsn, options={"backpressure": "drop", "max_queue": 8,
                                           "ping_interval": None, "write_timeout": 60.0})
    try:
        load_client(page, server)
        page.evaluate("async () => { await within(record(new PgwsSocket('/ws')).subscribe('firehose')); }")
        # Synchronous requests keep the page's thread busy, so the socket is not read meanwhile;
        # publish big messages until the server reports drops for this client.
        published = page.evaluate("""() => {
            const get = (path) => { const x = new XMLHttpRequest(); x.open("GET", path, false);
                                    x.send(); return JSON.parse(x.responseText); };
            const publish = (i) => { const x = new XMLHttpRequest();
                x.open("POST", "/debug/publish", false);
                x.setRequestHeader("Content-Type", "application/json");
                x.send(JSON.stringify({channel: "firehose", message: {i, pad: "x".repeat(7000)}})); };
            let i = 0;
            while (i < 20000) {
                for (let k = 0; k < 50; k++) publish(i++);
                const dropped = get("/debug/stats").connections[0].dropped;
                if (dropped.firehose > 0) break;
            }
            return i;
        }""")
        wait_count(page, "gap", 1, timeout=30)
        gap = events(page, "gap")[0]
        assert gap["channel"] == "firehose" and gap["missed"] > 0
        server_side = stats(server)["connections"][0]["dropped"]["firehose"]

        def accounted() -> bool:
            got = [e["payload"]["i"] for e in events(page, "message") if e.get("channel") == "firehose"]
            missed = sum(g["missed"] for g in events(page, "gap"))
            return len(got) + missed == published and missed == server_side
        wait_for(accounted, timeout=30, message="every message received or counted in a gap")
        assert all(e.get("channel") == "firehose" for e in events(page, "gap"))
        print(f"\npublished {published}, dropped {server_side} in {len(events(page, 'gap'))} gaps")
    finally:
        server.stop()


# ----------------------------------------------------------------------- Push server


def test_rooms_are_rejoined_after_the_server_restarts(pg_dsn: str, page: Page) -> None:
    """The page joins a room, the server is stopped and started again, the page reconnects on
    its own (default backoff), rejoins the room, and receives the next room message. Each socket's
    tabWindowId is exposed, and is the one the server knows it by."""
    server = serve_push(pg_dsn)
    try:
        load_client(page, server)
        joined = page.evaluate("""async () => {
            const sock = record(new PgwsSocket("/ws?user=u1"));
            return await within(sock.joinRoom("r1"));
        }""")
        assert joined == {"event": "joined", "room": "r1"}
        refused = page.evaluate("() => within(sock.joinRoom('private-x')).then(() => null, e => e.message)")
        assert refused == "pgws: not allowed to join room 'private-x'"
        error = events(page, "error")[-1]
        assert (error["action"], error["room"]) == ("joinRoom", "private-x")
        assert page.evaluate("sock.rooms") == ["r1"]  # a refused room is forgotten

        first_tab = tab_window(page, server, 1)
        push(server, {"pushToUser": "u1", "tabWindowId": first_tab, "payload": {"to": "this tab"}})
        assert wait_message(page, "this tab")["payload"] == {"to": "this tab"}
        push(server, {"pushToRoom": "r1", "payload": {"room": "before"}})
        wait_message(page, '"room":"before"')

        port = server.port
        server.stop()
        wait_count(page, "close", 1)
        close = events(page, "close")[0]
        assert close["code"] == 1001 and close["willReconnect"] is True
        assert 960 <= close["delay"] <= 1440  # the default first delay: 1.2 s +- 20%
        assert page.evaluate("sock.tabWindowId") is None  # it belonged to the closed socket
        server = serve_push(pg_dsn, port=port)
        wait_count(page, "open", 2, timeout=30)
        wait_for(lambda: [c["subscriptions"] for c in push_stats(server)["connections"]] == [["r1"]],
                 message="the page to rejoin r1")
        second_tab = tab_window(page, server, 2)
        assert second_tab != first_tab
        push(server, {"pushToRoom": "r1", "payload": {"room": "after the restart"}})
        assert wait_message(page, "after the restart")["payload"] == {"room": "after the restart"}
        assert page.evaluate("[sock.rooms, sock.connected]") == [["r1"], True]

        left = page.evaluate("() => within(sock.leaveRoom('r1'))")
        assert left == {"event": "left", "room": "r1"}
        assert page.evaluate("sock.rooms") == []
        wait_for(lambda: push_stats(server)["connections"][0]["subscriptions"] == [],
                 message="the server to take the page out of r1")
    finally:
        server.stop()


def tab_window(page: Page, server: Gunicorn, count: int) -> str:
    """The tab window id of the page's ``count``-th socket: event, property and server agree."""
    wait_count(page, "tabwindow", count)
    token = events(page, "tabwindow")[count - 1]["tabWindowId"]
    assert page.evaluate("sock.tabWindowId") == token and len(token) == 22
    assert [c["metadata"]["tabWindowId"] for c in push_stats(server)["connections"]] == [token]
    return token


def test_readme_snippet_runs(pg_dsn: str, page: Page) -> None:
    """The guide's pgws.js snippet, as written, against the Push app (which speaks PubSub too)."""
    snippet = re.search(r"```javascript\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    server = serve_push(pg_dsn)
    try:
        load_client(page, server)
        page.evaluate("""snippet => {
            window.rendered = [];
            window.render = (channel, payload) => window.rendered.push([channel, payload]);
            window.refetchEverything = () => {};
            window.refetch = () => {};
            window.eval(snippet + "; window.sock = sock;");
        }""", snippet)
        wait_for(lambda: [c["subscriptions"] for c in push_stats(server)["connections"]]
                 == [["lobby", "prices"]], message="the snippet's channel and room")
        push(server, {"pushToRoom": "lobby", "payload": {"hello": "lobby"}})
        post(server, "/debug/api", {"room": "prices", "payload": {"ACME": 12.5}})
        page.wait_for_function("window.rendered.length === 2")
        assert sorted(page.evaluate("window.rendered"), key=json.dumps) == sorted(
            [[None, {"hello": "lobby"}], [None, {"ACME": 12.5}]], key=json.dumps)
    finally:
        server.stop()


# ---------------------------------------------------------------------- JWT gateway

LISTEN = "pgws-js-listener"


@pytest.fixture
def jwt_serve(shared_jwt_serve: Serve) -> Serve:
    """The module's JWT gateway, once the sockets of earlier tests' pages are gone."""
    shared_jwt_serve.wait_sockets(0)
    return shared_jwt_serve


@pytest.fixture(scope="module")
def shared_jwt_serve(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``pgws-sync serve`` in JWT mode, with a blank page at / from PGWS_ROOT_PATH."""
    root = tmp_path_factory.mktemp("pgws_js_root")
    (root / "index.html").write_text("<!doctype html><title>jwt test</title>\n")
    server = Serve(env=no_database_env(PGWS_DB_URI=pg_dsn, PGWS_JWT_SECRET=SECRET,
                                       PGWS_LISTEN_CHANNEL=LISTEN, PGWS_ROOT_PATH=str(root)))
    server.wait_up()
    yield server
    server.stop()


def test_expired_token_3001_gets_a_fresh_token_and_reconnects(jwt_serve: Serve, sender: Any,
                                                             page: Page) -> None:
    channel = f"chat-{uuid.uuid4().hex[:8]}"
    issued: List[float] = []

    def fresh_token() -> str:
        # The first token runs out while the page is connected; the next ones last an hour.
        lifetime = 3 if not issued else 3600
        issued.append(time.time())
        return make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + lifetime})

    page.expose_function("freshToken", fresh_token)
    load_client(page, jwt_serve)
    page.evaluate("""ch => record(new PgwsSocket("/" + ch, {token: () => window.freshToken(),
                                                             minDelay: 60000}))""", channel)
    wait_count(page, "open", 1)
    pg_notify(sender, LISTEN, json.dumps({"channel": channel, "text": "first"}))
    wait_message(page, "first")

    wait_count(page, "open", 2, timeout=20)  # minDelay is a minute: only 3001 reconnects this fast
    close = events(page, "close")[0]
    assert (close["code"], close["reason"], close["willReconnect"], close["delay"]) == (
        3001, "JWT expired", True, 0)
    assert len(issued) == 2 and len(events(page, "close")) == 1
    second = f"after a fresh token {uuid.uuid4()}"
    jwt_serve.wait_sockets(1)
    sent = json.dumps({"channel": channel, "text": second, "big": 2 ** 60})
    pg_notify(sender, LISTEN, sent)
    message = wait_message(page, second)
    assert message["payload"]["text"] == second
    assert message["text"] == sent  # the frame as it came, 2^60 included
    assert message.get("channel") is None  # a raw payload: no PubSub envelope


def test_token_as_subprotocol_and_url_function(jwt_serve: Serve, sender: Any, page: Page) -> None:
    channel = f"proto-{uuid.uuid4().hex[:8]}"
    token = make_token({"mode": "rw", "channels": [channel]})
    load_client(page, jwt_serve)
    page.evaluate("""([ch, token]) => record(new PgwsSocket(() => "/" + ch,
        {token: async () => token, tokenIn: "protocol"}))""", [channel, token])
    wait_count(page, "open", 1)
    assert events(page, "open")[0]["protocol"] == token  # the server answered with the token
    page.evaluate("sock.send('typed in the page')")
    message = wait_message(page, "typed in the page")  # through the database and back
    # {"event": "WebsocketMessage", "channel": c, "payload": text, ...}: channel and payload are read
    assert message["data"]["event"] == "WebsocketMessage"
    assert (message["channel"], message["payload"]) == (channel, "typed in the page")
    pg_notify(sender, LISTEN, json.dumps({"channel": channel, "n": 7}))
    assert wait_message(page, '"n":7')["payload"] == {"channel": channel, "n": 7}


def test_a_failing_token_function_is_an_error_and_retried(jwt_serve: Serve, page: Page) -> None:
    load_client(page, jwt_serve)
    page.evaluate("""() => {
        window.calls = 0;
        record(new PgwsSocket("/news", {minDelay: 50, token: () => {
            window.calls += 1;
            if (window.calls < 3) throw new Error("not logged in yet");
            return window.goodToken;
        }}));
    }""")
    page.evaluate("t => { window.goodToken = t; }", make_token({"mode": "r"}))
    wait_count(page, "open", 1)
    errors = events(page, "error")
    assert [e["error"] for e in errors] == ["pgws: no token: not logged in yet"] * 2
    assert page.evaluate("window.calls") == 3


# -------------------------------------------------------------------- serving pgws.js


def assert_serves_pgws_js(url: str) -> None:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers.get_content_type() == "application/javascript"
        assert "max-age=" in resp.headers["Cache-Control"]
        etag = resp.headers["ETag"]
        body = resp.read().decode()
    assert body == client_js() and "class PgwsSocket" in body
    request = urllib.request.Request(url, headers={"If-None-Match": etag})
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 304
    else:
        raise AssertionError("an unchanged pgws.js should answer 304")


def test_init_app_serves_pgws_js(pubsub: Dict[str, Gunicorn]) -> None:
    assert_serves_pgws_js(pubsub["server"].url("/pgws.js"))


def test_init_app_registers_pgws_js_once_or_not_at_all() -> None:
    listener = Listener("")  # never started: no request here opens a socket
    app = Flask(__name__)
    Pgws(listener, "a").init_app(app, "/ws-a")
    Pgws(listener, "b").init_app(app, "/ws-b", client_path="/static/pgws.js")
    response = app.test_client().get("/pgws.js")
    assert response.status_code == 200 and response.get_data(as_text=True) == client_js()
    assert app.test_client().get("/static/pgws.js").status_code == 404  # the first one won

    bare = Flask(__name__)
    Pgws(listener, "c").init_app(bare, "/ws", client_path=None)
    assert bare.test_client().get("/pgws.js").status_code == 404


def test_gateway_serves_pgws_js(pg_dsn: str, channel: str) -> None:
    serve = Serve(["--dsn", pg_dsn, "--channel", channel]).wait_up()
    try:
        assert_serves_pgws_js(serve.url("/pgws.js"))
        status, page = http_get(serve.url("/"))
        assert status == 200 and "<html" in page
    finally:
        serve.stop()


def test_jwt_gateway_serves_pgws_js(jwt_serve: Serve) -> None:
    assert_serves_pgws_js(jwt_serve.url("/pgws.js"))
    status, body = http_get(jwt_serve.url("/"))  # the static files still answer the rest
    assert status == 200 and "jwt test" in body


def test_a_drain_is_honoured_the_client_comes_back_after_the_hint(pg_dsn: str, page: Page) -> None:
    """Closed with 1012 "reconnect after N s", pgws.js waits N to 2N seconds (jitter), not its
    own backoff, and reconnects."""
    server = serve_pubsub(pg_dsn, extra_env={"PGWS_DRAIN_SECONDS": "1"})
    try:
        load_client(page, server)
        page.evaluate("record(new PgwsSocket('/ws'))")
        wait_count(page, "open", 1)
        server.proc.send_signal(signal.SIGTERM)
        wait_count(page, "close", 1)
        close = events(page, "close")[0]
        assert close["code"] == 1012 and close["willReconnect"] is True
        hint = float(re.fullmatch(r"restart: reconnect after (\d+\.\d)s", close["reason"]).group(1))
        assert hint * 1000 <= close["delay"] <= 2 * hint * 1000
    finally:
        server.stop()


# ------------------------------------------------------------------ durable channels


def test_a_durable_channel_ends_with_every_message_once_across_a_server_restart(
        pg_dsn: str, page: Page) -> None:
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, workers=2)
    load_client(page, server)
    page.evaluate(RECORDER, EVENTS + ["resync_required"])
    reply = page.evaluate("""async () => {
        const sock = record(new PgwsSocket("/ws", {minDelay: 100, maxDelay: 400,
                                                     storage: window.sessionStorage}));
        return await within(sock.subscribe("ticks"));
    }""")
    assert reply["event"] == "subscribed" and reply["offset"] == 0
    total = 600
    published = threading.Event()

    def publish() -> None:  # steadily, in transactions of one message, while the server restarts
        conn = psycopg2.connect(pg_dsn)
        try:
            for n in range(1, total + 1):
                with conn:
                    publish_durable(conn, "ticks", {"n": n}, schema=schema)
                if n == total // 3:
                    published.set()
        finally:
            conn.close()
            published.set()

    publisher = threading.Thread(target=publish, name="publisher", daemon=True)
    publisher.start()
    published.wait(30)
    port = server.port
    server.stop()  # mid-stream: the page reconnects by itself and resumes with since + epoch
    server = serve_durable(pg_dsn, schema, workers=2, port=port)
    try:
        publisher.join(60)
        durable = "window.events.filter(e => e.name === 'message' && e.offset !== undefined)"
        page.wait_for_function(f"n => {durable}.length >= n", arg=total, timeout=60_000)
        got = page.evaluate(f"{durable}.map(e => [e.offset, e.payload.n])")
        assert got == [[n, n] for n in range(1, total + 1)]  # every message once, in order
        assert len(events(page, "open")) >= 2 and not events(page, "resync_required")
        assert page.evaluate("sock.position('ticks').offset") == total
        # Saved under a key naming the endpoint, in writes batched over 100 ms.
        stored = """() => JSON.parse(sessionStorage.getItem(
            Object.keys(sessionStorage).find(k => k.startsWith('pgws:ws://') && k.endsWith('/ws|ticks'))))"""
        page.wait_for_function(f"n => ({stored})().offset === n", arg=total)
        saved = page.evaluate(stored)
        assert saved["offset"] == total and saved["epoch"] == reply["epoch"]
    finally:
        server.stop()


def test_a_durable_push_page_gets_what_was_pushed_to_its_user_tab_and_room_while_away(
        pg_dsn: str, page: Page) -> None:
    schema = new_log(pg_dsn)
    options = {"durable": True, "log_schema": schema}
    server = serve_push(pg_dsn, options=options)
    load_client(page, server)
    page.evaluate(RECORDER, EVENTS + ["streams", "resync_required"])
    page.evaluate("""() => record(new PgwsSocket("/ws?user=bob", {minDelay: 100, maxDelay: 400}))""")
    wait_count(page, "streams", 1)
    streams = events(page, "streams")[0]
    assert streams["user"] == "pgws:user:bob" and streams["tab"].startswith("pgws:tab:bob:")
    page.wait_for_function("sock.channels.length === 2")
    page.evaluate("() => within(sock.joinRoom('news'))")
    wait_for(lambda: sum(len(c["subscriptions"]) for c in push_stats(server)["connections"]) == 3,
             message="the page to subscribe to its streams and join its room")
    api(server, {"room": "news", "payload": {"to": "room", "n": 1}})
    wait_message(page, '"n":1')  # a durable room message: the room has a position now
    port = server.port
    server.stop()

    conn = psycopg2.connect(pg_dsn)  # while the page is away, from the app's own transaction
    with conn:
        publish_durable(conn, streams["user"], {"to": "user"}, schema=schema)
        publish_durable(conn, streams["tab"], {"to": "tab"}, schema=schema)
        publish_durable(conn, "news", {"to": "room", "n": 2}, schema=schema)
    conn.close()
    server = serve_push(pg_dsn, options=options, port=port)
    try:
        wait_message(page, '"to":"user"', timeout=30)
        wait_message(page, '"to":"tab"', timeout=30)
        wait_message(page, '"n":2', timeout=30)  # the room was rejoined after its position
        got = {(e["channel"], e["offset"]): e["payload"] for e in events(page, "message")
               if e.get("offset") is not None}
        assert got == {(streams["user"], 1): {"to": "user"}, (streams["tab"], 1): {"to": "tab"},
                       ("news", 1): {"to": "room", "n": 1}, ("news", 2): {"to": "room", "n": 2}}
        assert page.evaluate("sock.rooms") == ["news"]
        assert len(events(page, "streams")) == 2  # the new socket named its new tab's stream
    finally:
        server.stop()


def test_a_durable_push_room_joined_before_its_first_message_misses_nothing_while_away(
        pg_dsn: str, page: Page) -> None:
    """The joined answer names where the room is live from: a page whose server goes away
    before the room's first message rejoins from there and gets what was published."""
    schema = new_log(pg_dsn)
    options = {"durable": True, "log_schema": schema}
    server = serve_push(pg_dsn, options=options)
    load_client(page, server)
    page.evaluate(RECORDER, EVENTS)
    page.evaluate("""() => record(new PgwsSocket("/ws?user=ann", {minDelay: 100, maxDelay: 400}))""")
    joined = page.evaluate("() => within(sock.joinRoom('quiet'))")
    assert (joined["event"], joined["room"], joined["offset"]) == ("joined", "quiet", 0)
    assert page.evaluate("sock.position('quiet')") == {"offset": 0, "epoch": joined["epoch"]}
    port = server.port
    server.stop()

    conn = psycopg2.connect(pg_dsn)  # while the page is away
    with conn:
        publish_durable(conn, "quiet", {"n": 1}, schema=schema)
        publish_durable(conn, "quiet", {"n": 2}, schema=schema)
    conn.close()
    server = serve_push(pg_dsn, options=options, port=port)
    try:
        wait_message(page, '"n":2', timeout=30)
        got = [(e["offset"], e["payload"]) for e in events(page, "message") if e.get("offset")]
        assert got == [(1, {"n": 1}), (2, {"n": 2})]
    finally:
        server.stop()


# ------------------------------------------------- heartbeat, pgws.v2, tab streams (issue 26)


def test_a_dead_connection_is_noticed_by_the_heartbeat_and_resumed_with_nothing_lost(
        pg_dsn: str, page: Page) -> None:
    """A proxy between page and server stops forwarding (a half-open connection: no close, no
    error). The page notices within heartbeatInterval + heartbeatTimeout, reconnects through
    the proxy, and resumes its durable channel: every message once, in order."""
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema)
    proxy = TcpProxy(server.port)
    conn = psycopg2.connect(pg_dsn)

    def publish(first: int, last: int) -> None:
        for n in range(first, last + 1):
            with conn:
                publish_durable(conn, "beats", {"n": n}, schema=schema)

    interval, timeout = 1000, 1000
    durable = "window.events.filter(e => e.name === 'message' && e.offset !== undefined)"
    try:
        page.goto(f"http://127.0.0.1:{proxy.port}/")  # the page and its socket go through the proxy
        page.add_script_tag(url=f"http://127.0.0.1:{proxy.port}/pgws.js")
        page.evaluate(RECORDER, EVENTS + ["resync_required"])
        page.evaluate("""async ([interval, timeout]) => {
            const sock = record(new PgwsSocket("/ws", {minDelay: 100, maxDelay: 400,
                heartbeatInterval: interval, heartbeatTimeout: timeout, storage: sessionStorage}));
            await within(sock.subscribe("beats"));
        }""", [interval, timeout])
        assert events(page, "open")[0]["protocol"] == "pgws.v2"
        publish(1, 10)
        page.wait_for_function(f"{durable}.length >= 10")
        # Quiet for a while first: the heartbeat pings and the server's pong keeps it open.
        page.wait_for_function("ms => new Promise(r => setTimeout(() => r(true), ms))",
                               arg=interval * 2 + 500, timeout=10_000)
        assert not events(page, "close")

        proxy.freeze()
        frozen = time.monotonic()
        publish(11, 20)  # written by the server, held by the proxy: lost with that socket
        wait_count(page, "close", 1, timeout=10)
        noticed = time.monotonic() - frozen
        close = events(page, "close")[0]
        assert close["willReconnect"] is True and close["code"] == 1006
        assert "ping" in close["reason"]
        assert noticed <= (interval + timeout) / 1000 + 1.0, noticed  # timers on a busy machine
        page.wait_for_function(f"{durable}.length >= 20", timeout=15_000)
        got = page.evaluate(f"{durable}.map(e => [e.offset, e.payload.n])")
        assert got == [[n, n] for n in range(1, 21)]  # every message once, in order
        assert len(events(page, "open")) == 2 and not events(page, "resync_required")
        print(f"\nthe dead connection was noticed {noticed:.2f} s after the proxy froze "
              f"(heartbeatInterval {interval} ms + heartbeatTimeout {timeout} ms)")
    finally:
        page.evaluate("window.sock && window.sock.close()")  # no more connects through the proxy
        conn.close()
        proxy.close()
        server.stop()


LOOKALIKES = [
    {"event": "error", "error": "card declined"},
    {"event": "streams", "user": "pgws:user:alice", "tab": "pgws:tab:alice:1"},
    {"event": "subscribed", "channel": "x", "reply_to": "pgws-1"},
    {"tabWindowId": "not-this-tab"},
    {"event": "resync", "channels": ["lookalikes"], "reason": "a payload"},
    {"event": "joined", "room": "lookalikes"},
    {"event": "pong", "reply_to": "pgws-2"},
]


def test_push_payloads_shaped_like_control_frames_arrive_as_messages(pg_dsn: str,
                                                                     page: Page) -> None:
    server = serve_push(pg_dsn)
    try:
        load_client(page, server)
        page.evaluate(RECORDER, EVENTS + ["streams", "subscribed"])
        page.evaluate("async () => { await within(record(new PgwsSocket('/ws')).joinRoom('lookalikes')); }")
        assert events(page, "open")[0]["protocol"] == "pgws.v2"
        tab = page.evaluate("sock.tabWindowId")
        for payload in LOOKALIKES:
            push(server, '{"pushToRoom": "lookalikes", "payload": ' + json.dumps(payload) + "}")
        wait_count(page, "message", len(LOOKALIKES))
        assert [m["payload"] for m in events(page, "message")] == LOOKALIKES
        assert not events(page, "error") and not events(page, "streams") and not events(page, "resync")
        assert page.evaluate("[sock.channels, sock.tabWindowId, sock.enveloped]") == [[], tab, True]
    finally:
        server.stop()


def test_tab_streams_across_20_reconnects_one_left_and_every_push_received(pg_dsn: str,
                                                                           page: Page) -> None:
    """Each round: a push to this tab while connected; the socket breaks; a push to that tab
    while away; back online. The old tab's stream is read to its end, then dropped."""
    schema = new_log(pg_dsn)
    server = serve_push(pg_dsn, options={"durable": True, "log_schema": schema})
    rounds = 20
    try:
        load_client(page, server)
        page.evaluate(RECORDER, EVENTS + ["streams", "subscribed", "resync_required"])
        # A minute of backoff: only the online event brings the socket back, when the test says.
        page.evaluate("""() => record(new PgwsSocket("/ws?user=bob", {minDelay: 60000,
                                                       maxDelay: 60000, storage: sessionStorage}))""")
        most = 0
        for i in range(rounds):
            wait_count(page, "streams", i + 1)
            tab = events(page, "streams")[i]["tab"]
            page.wait_for_function("t => window.events.some(e => e.name === 'subscribed' && e.channel === t)",
                                   arg=tab)
            tab_id = page.evaluate("sock.tabWindowId")
            assert tab == f"pgws:tab:bob:{tab_id}"
            api(server, {"user": "bob", "tab": tab_id, "payload": {"round": i, "when": "live"}})
            wait_message(page, json.dumps({"round": i, "when": "live"}, separators=(",", ":")))
            most = max(most, max(len(c["subscriptions"]) for c in push_stats(server)["connections"]))
            page.evaluate("sock._ws.close()")  # the connection breaks
            wait_count(page, "close", i + 1)
            api(server, {"user": "bob", "tab": tab_id, "payload": {"round": i, "when": "away"}})
            page.evaluate("window.dispatchEvent(new Event('online'))")
        wait_count(page, "open", rounds + 1)
        wanted = sorted([[i, w] for i in range(rounds) for w in ("live", "away")])

        def received() -> List[List[Any]]:
            return sorted([m["payload"]["round"], m["payload"]["when"]]
                          for m in events(page, "message") if isinstance(m.get("payload"), dict))
        wait_for(lambda: received() == wanted, timeout=20, message="every push to the tab, once")
        # The previous tab's stream stays drainDelay (5 s) after it was read to its end.
        page.wait_for_function("sock.channels.filter(c => c.startsWith('pgws:tab:')).length === 1")
        tabs = page.evaluate("sock.channels")
        assert tabs == ["pgws:user:bob", events(page, "streams")[rounds]["tab"]]
        wait_for(lambda: [sorted(c["subscriptions"]) for c in push_stats(server)["connections"]]
                 == [sorted(tabs)], message="the server to hold the user's and this tab's streams only")
        page.wait_for_function("""() => Object.keys(sessionStorage).filter(k => k.includes('|pgws:tab:'))
                                  .length === 1""")
        assert most <= 3  # the user's stream, this tab's and at most the previous tab's
        assert not events(page, "resync_required")
        print(f"\n{rounds} reconnects: at most {most} subscriptions per socket, {len(wanted)} pushes "
              f"received once each")
    finally:
        server.stop()


def test_the_es_module_build_works_in_chromium(pubsub: Dict[str, Gunicorn], page: Page) -> None:
    """pgws.mjs, imported as a module (no global), subscribes and receives like pgws.js."""
    server = pubsub["server"]
    page.goto(server.url("/"))
    page.evaluate(RECORDER, EVENTS)
    page.evaluate("""async (source) => {
        const url = URL.createObjectURL(new Blob([source], {type: "text/javascript"}));
        const module = await import(url);
        window.noGlobal = typeof window.PgwsSocket === "undefined";
        const sock = record(new module.default("/ws", {minDelay: 100}));
        await within(sock.channel("esm").subscribe());
    }""", client_esm())
    assert page.evaluate("window.noGlobal") is True
    post(server, "/debug/publish", {"channel": "esm", "message": {"via": "pgws.mjs"}})
    message = wait_message(page, "pgws.mjs")
    assert message["channel"] == "esm" and message["payload"] == {"via": "pgws.mjs"}
    assert events(page, "open")[0]["protocol"] == "pgws.v2"
