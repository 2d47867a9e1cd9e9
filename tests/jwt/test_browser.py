"""The JWT gateway example page in a real headless Chromium, against real PostgreSQL and gunicorn."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import Page

from ..helpers import ROOT, Gunicorn, pg_notify
from ..jwt_helpers import SECRET, DbListener, make_token

LISTEN = "postgres-websockets-listener"  # the example keeps the default listen channel


@pytest.fixture(scope="module")
def example(pg_dsn: str) -> Iterator[Gunicorn]:
    """examples/jwt_gateway.py under gunicorn, its page served from PGWS_ROOT_PATH."""
    server = Gunicorn("examples.jwt_gateway:app", env={
        "PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET,
        "PGWS_ROOT_PATH": str(ROOT / "examples" / "jwt_chat")}).wait_up()
    yield server
    server.stop()


def connect(page: Page, server: Gunicorn, token: str, channel: str = "") -> None:
    page.goto(server.url("/"))
    page.fill("#token", token)
    page.fill("#channel", channel)
    page.click("#open")
    page.wait_for_function("document.getElementById('state').textContent === 'open'")


def shown(page: Page, text: str) -> None:
    page.wait_for_function("t => document.getElementById('messages').textContent.includes(t)",
                           arg=text)


def test_page_shows_database_messages_and_sends_its_own(example: Gunicorn, page: Page,
                                                         sender: Any, pg_dsn: str,
                                                         tmp_path: Path) -> None:
    channel = f"chat-{uuid.uuid4().hex[:8]}"
    connect(page, example, make_token({"mode": "rw", "channels": [channel]}), channel)
    from_db = f"from the database {uuid.uuid4()}"
    pg_notify(sender, LISTEN, json.dumps({"channel": channel, "text": from_db}))
    shown(page, from_db)
    assert page.locator("#messages li b").first.text_content() == channel

    db = DbListener(pg_dsn, LISTEN)
    try:
        typed = f"typed in the browser {uuid.uuid4()}"
        page.fill("#text", typed)
        page.click("#send-button")
        shown(page, typed)  # back through the database to every reader, the sender included
        message = json.loads(db.next())
        assert (message["event"], message["channel"], message["payload"]) == (
            "WebsocketMessage", channel, typed)
    finally:
        db.close()
    assert page.locator("#messages li").count() == 2

    shot = tmp_path / "jwt_chat.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_shows_error_frames_for_a_read_only_token(example: Gunicorn, page: Page) -> None:
    connect(page, example, make_token({"mode": "r"}), "news")
    page.fill("#text", "may I?")
    page.click("#send-button")
    page.wait_for_selector("#messages li.error")
    assert "mode r" in (page.locator("#messages li.error").first.text_content() or "")
    assert page.locator("#state").text_content() == "open"


def test_page_shows_3001_when_the_token_expires(example: Gunicorn, page: Page) -> None:
    connect(page, example, make_token({"mode": "r", "exp": int(time.time()) + 3}), "news")
    page.wait_for_function(
        "document.getElementById('state').textContent === 'closed 3001 JWT expired'",
        timeout=20_000)


def test_page_cannot_open_with_a_bad_token(example: Gunicorn, page: Page) -> None:
    page.goto(example.url("/"))
    page.fill("#token", make_token({"mode": "r"}, secret="wrong-secret-wrong-secret-wrong!"))
    page.fill("#channel", "news")
    page.click("#open")
    page.wait_for_function("document.getElementById('state').textContent.startsWith('closed')")
    assert page.locator("#state").text_content() == "closed 1006"


def test_example_documents_how_to_run() -> None:
    text = (ROOT / "examples" / "jwt_gateway.py").read_text()
    assert "gunicorn -c python:pgws_sync.gunicorn examples.jwt_gateway:app" in text
    assert "PGWS_ROOT_PATH=examples/jwt_chat" in text
