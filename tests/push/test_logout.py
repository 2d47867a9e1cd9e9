"""examples/logout.py: Flask-Login's logout closes the user's sockets in both workers with 4403,
and pgws.js in Chromium does not come back after it."""

from __future__ import annotations

import http.client
import json
import time
from typing import Dict, List, Tuple

import pytest
from playwright.sync_api import Page

from ..helpers import Gunicorn, Ws, http_get, wait_for

APP = "tests.apps.logout_app:app"


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = Gunicorn(APP, env={"PGWS_DB_URI": pg_dsn, "SECRET_KEY": "a key for the logout tests"},
                 workers=2).wait_up()
    yield g
    g.stop()


def login(server: Gunicorn, user: str) -> str:
    """Log ``user`` in through the app's form; the session cookie to send."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/login", body=f"user={user}",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        assert response.status == 302, response.status
        return str(response.getheader("Set-Cookie")).split(";", 1)[0]
    finally:
        conn.close()


def logout(server: Gunicorn, cookie: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/logout", headers={"Cookie": cookie})
        response = conn.getresponse()
        response.read()
        assert response.status == 302, response.status
    finally:
        conn.close()


def where(server: Gunicorn) -> Dict[str, Tuple[int, str]]:
    """tabWindowId -> (worker pid, user) of every socket, asking until both workers answered."""
    seen: Dict[int, List[dict]] = {}
    for _ in range(100):
        status, body = http_get(server.url("/debug/stats"))
        assert status == 200, body
        stats = json.loads(body)
        seen[stats["pid"]] = stats["connections"]
        if len(seen) == 2:
            break
    assert len(seen) == 2, "one worker never answered"
    return {c["metadata"]["tabWindowId"]: (pid, c["metadata"].get("user"))
            for pid, conns in seen.items() for c in conns}


def tab(server: Gunicorn, cookie: str) -> Tuple[Ws, str]:
    ws = Ws(server.ws_url(), headers={"Cookie": cookie})
    first = ws.recv_json()
    return ws, first["tabWindowId"]


def test_logout_closes_the_users_sockets_in_both_workers_with_4403(server) -> None:
    alice, bob = login(server, "alice"), login(server, "bob")
    tabs: List[Tuple[Ws, str, str]] = []
    try:
        for _ in range(40):  # until alice has sockets in both workers
            ws, tab_id = tab(server, alice)
            tabs.append((ws, tab_id, "alice"))
            placed = where(server)  # a socket is registered before its handshake answer
            if len(tabs) >= 2 and len({placed[t][0] for _, t, _u in tabs}) == 2:
                break
        assert len({placed[t][0] for _, t, _u in tabs}) == 2
        for _ in range(2):
            ws, tab_id = tab(server, bob)
            tabs.append((ws, tab_id, "bob"))
        users = {t: v[1] for t, v in where(server).items()}
        assert all(users[t] == u for _, t, u in tabs)  # Flask-Login named each socket's user

        started = time.monotonic()
        logout(server, alice)
        for ws, _t, user in tabs:
            if user == "alice":
                assert ws.expect_close(timeout=5.0) == (4403, "logged out")
        took = time.monotonic() - started
        print(f"logout: alice's {sum(u == 'alice' for _, _, u in tabs)} sockets in 2 workers "
              f"closed with 4403 in {took * 1000:.0f} ms")
        assert took < 5.0
        # the client has the close frame; the worker forgets the socket just after
        wait_for(lambda: sorted(v[1] for v in where(server).values()) == ["bob", "bob"],
                 message="only bob's two sockets left in the workers")
        for ws, _t, user in tabs:
            if user == "bob":
                assert ws.nothing_pending() and ws.client.connected
    finally:
        for ws, _t, _u in tabs:
            ws.close()


COUNT_SOCKETS = """() => {
  const Real = window.WebSocket;
  window.socketsMade = 0;
  window.WebSocket = function (...args) { window.socketsMade += 1; return new Real(...args); };
  Object.assign(window.WebSocket, Real);
  window.WebSocket.prototype = Real.prototype;
}"""


def test_pgws_js_does_not_come_back_after_the_logouts_4403(server, page: Page) -> None:
    page.add_init_script(f"({COUNT_SOCKETS})()")
    page.goto(server.url("/"))
    page.request.post(server.url("/login"), form={"user": "zoe"})
    page.goto(server.url("/"))
    page.wait_for_function("document.getElementById('state').textContent === 'open'")
    assert page.evaluate("window.socketsMade") == 1
    wait_for(lambda: any(v[1] == "zoe" for v in where(server).values()), 5.0)

    page.request.post(server.url("/logout"))
    page.wait_for_function(
        "document.getElementById('state').textContent === 'closed for good (4403 logged out)'",
        timeout=5000)
    time.sleep(4.0)  # three times pgws.js's first reconnect delay: it would have come back
    assert page.evaluate("window.socketsMade") == 1
    assert page.locator("#state").text_content() == "closed for good (4403 logged out)"
    assert not any(v[1] == "zoe" for v in where(server).values())
