"""Session fixtures: a real PostgreSQL server (or PGWS_TEST_DSN), connections, channel names,
WebSocket clients and a headless Chromium."""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import psycopg2
import pytest
from playwright.sync_api import Browser, Page

from .browser import chromium, fresh_page
from .helpers import Ws
from .pgserver import PgServer
from .redisserver import RedisServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of the session's database: PGWS_TEST_DSN, else a server started here."""
    dsn = os.environ.get("PGWS_TEST_DSN")
    if dsn:
        yield dsn
        return
    server = PgServer().start()
    try:
        yield server.dsn
    finally:
        server.destroy()


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    """A private server this test may stop, restart or break."""
    server = PgServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis: PGWS_TEST_REDIS_URL, else a redis-server started here."""
    url = os.environ.get("PGWS_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.destroy()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server this test may kill and restart."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def sender(pg_dsn: str) -> Iterator["psycopg2.extensions.connection"]:
    """An autocommit connection for sending notifications (never the listener's)."""
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses (mixed case on purpose)."""
    return f"Chan-{os.getpid()}-{next(_counter)}"


@pytest.fixture
def clients() -> Iterator[Any]:
    """Connect WebSocket clients that are closed when the test ends."""
    made = []

    def connect(url: str, **kwargs: Any) -> Ws:
        ws = Ws(url, **kwargs)
        made.append(ws)
        return ws

    yield connect
    for ws in made:
        ws.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium per test module (the test is skipped without one)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page of the module's Chromium."""
    with fresh_page(browser) as new_page:
        yield new_page
