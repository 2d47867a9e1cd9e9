"""pgws.js in Chromium: presence(channel), join / leave events, and subscriptions the server
makes and ends (subscribe_matching / unsubscribe_matching)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page

from .pubsub_helpers import post, serve_pubsub
from .test_pgws_js import load_client

EVENTS = ["open", "close", "message", "error", "subscribed", "unsubscribed", "join", "leave",
          "presence_count"]


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_pubsub(pg_dsn, {"presence": True, "presence_timeout": 3.0}, workers=2)
    yield g
    g.stop()


def names(page: Page, name: str) -> list:
    return page.evaluate("n => window.events.filter(e => e.name === n)", name)


def test_presence_join_leave_and_server_subscriptions(server, page: Page, channel: str) -> None:
    load_client(page, server)
    page.evaluate("names => { window.events = []; }", EVENTS)
    page.evaluate("""([names, channel]) => {
      const record = (label, sock) => names.forEach(n => sock.on(n, d => {
        const e = Object.assign({name: n, sock: label}, d); delete e.cause; window.events.push(e);
      }));
      window.a = new PgwsSocket("/ws"); record("a", window.a);
      window.b = new PgwsSocket("/ws"); record("b", window.b);
      return window.a.subscribe(channel);
    }""", [EVENTS, channel])
    page.evaluate("c => window.b.subscribe(c)", channel)
    page.wait_for_function("c => window.events.some(e => e.sock === 'a' && e.name === 'join' "
                           "&& e.channel === c)", arg=channel)
    reply = page.evaluate("c => window.a.presence(c)", channel)
    assert reply["event"] == "presence" and reply["count"] == 2 and len(reply["members"]) == 2
    assert all(m["info"] == {"user": "anonymous"} for m in reply["members"])

    # the server subscribes both sockets to another channel, in whichever worker each is
    other = channel + "-srv"
    post(server, "/debug/control", {"op": "subscribe", "channel": other,
                                    "match": {"user": "anonymous"}})
    page.wait_for_function("c => ['a', 'b'].every(s => window.events.some(e => e.sock === s "
                           "&& e.name === 'subscribed' && e.server && e.channel === c))", arg=other)
    assert page.evaluate("c => window.a.channels.includes(c)", other)
    post(server, "/debug/publish", {"channel": other, "message": {"hello": 1}})
    page.wait_for_function("c => window.events.some(e => e.sock === 'a' && e.name === 'message' "
                           "&& e.channel === c)", arg=other)
    post(server, "/debug/control", {"op": "unsubscribe", "channel": other,
                                    "match": {"user": "anonymous"}})
    page.wait_for_function("c => window.events.some(e => e.sock === 'a' && "
                           "e.name === 'unsubscribed' && e.server && e.channel === c)", arg=other)
    assert not page.evaluate("c => window.a.channels.includes(c)", other)

    page.evaluate("() => window.b.close()")
    page.wait_for_function("c => window.events.some(e => e.sock === 'a' && e.name === 'leave' "
                           "&& e.channel === c)", arg=channel, timeout=5000)
    assert page.evaluate("c => window.a.presence(c)", channel)["count"] == 1
    assert not names(page, "error")
