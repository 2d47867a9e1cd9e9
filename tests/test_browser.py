"""client.html in a real headless Chromium, served by ``pgws-sync serve`` from a real database."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg2
from playwright.sync_api import Page

from .clirun import Serve
from .pgserver import PgServer

# Records every text #state shows, so short-lived states cannot be missed.
RECORD_STATES = """() => {
  window.pgwsStates = [document.getElementById('state').textContent];
  new MutationObserver(() => window.pgwsStates.push(document.getElementById('state').textContent))
    .observe(document.getElementById('state'), {childList: true, characterData: true, subtree: true});
}"""


def open_client(page: Page, serve: Serve) -> None:
    """Load the page from ``serve`` and wait until its socket is open and registered."""
    page.goto(serve.url("/"))
    page.wait_for_function("document.getElementById('state').textContent === 'open'")
    serve.wait_sockets(1)


def send(dsn: str, channel: str, body: dict) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (channel, "default," + json.dumps(body)))
    finally:
        conn.close()


def test_page_shows_notifications(pg_dsn: str, channel: str, page: Page, tmp_path: Path) -> None:
    serve = Serve(["--dsn", pg_dsn, "--channel", channel]).wait_up()
    try:
        open_client(page, serve)
        token = f"hello browser {uuid.uuid4()}"
        send(pg_dsn, channel, {"text": token})
        page.wait_for_function("t => document.getElementById('messages').textContent.includes(t)",
                               arg=token)
        newest = json.loads(page.locator("#messages li").first.evaluate(
            "li => li.lastChild.textContent"))
        assert newest["payload"] == {"text": token} and newest["channel"] == channel

        second = f"second {uuid.uuid4()}"
        send(pg_dsn, channel, {"text": second})
        page.wait_for_function("t => document.querySelector('#messages li').textContent.includes(t)",
                               arg=second)
        assert page.locator("#messages li").count() == 2  # newest first, one item per frame

        shot = tmp_path / "client.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 0
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        serve.stop()


def test_page_shows_resync_after_the_database_restarts(pg_server: PgServer, channel: str,
                                                       page: Page) -> None:
    serve = Serve(["--dsn", pg_server.dsn, "--channel", channel]).wait_up()
    try:
        open_client(page, serve)
        pg_server.restart()
        page.wait_for_selector("#messages li.resync")
        text = page.locator("#messages li.resync").first.text_content() or ""
        assert "resync" in text and '"event": "resync"' in text and channel in text
        assert page.locator("#state").text_content() == "open"  # the socket itself stayed up
    finally:
        serve.stop()


def test_page_reconnects_when_the_server_comes_back(pg_dsn: str, channel: str,
                                                     page: Page) -> None:
    serve = Serve(["--dsn", pg_dsn, "--channel", channel]).wait_up()
    try:
        open_client(page, serve)
        page.evaluate(RECORD_STATES)
        serve.stop()  # SIGTERM: the page's socket is closed with 1001
        page.wait_for_function(
            "window.pgwsStates.some(s => /^closed, retrying in \\d+s$/.test(s))")
        serve = Serve(["--dsn", pg_dsn, "--channel", channel], port=serve.port).wait_up()
        page.wait_for_function("document.getElementById('state').textContent === 'open'",
                               timeout=40_000)
        serve.wait_sockets(1)
        token = f"after reconnect {uuid.uuid4()}"
        send(pg_dsn, channel, {"text": token})
        page.wait_for_function("t => document.getElementById('messages').textContent.includes(t)",
                               arg=token)
    finally:
        serve.stop()
