"""Publisher backpressure: before PostgreSQL's notification queue fills (and every NOTIFYing
commit fails), publishing is refused with a clear error, a WARNING and a metric."""

from __future__ import annotations

import psycopg2
import pytest

from pgws_sync import PublishFailed
from pgws_sync.pubsub.publisher import Publisher

from ..helpers import wait_for
from ..pgserver import PgServer


@pytest.fixture
def small_queue():
    """A server whose notification queue holds 64 pages (512 KB) instead of 8 GB."""
    server = PgServer()
    server.options = "-c max_notify_queue_pages=64"
    server.start()
    yield server
    server.destroy()


def test_publishing_is_refused_while_a_stuck_listener_fills_the_queue(small_queue, caplog):
    stuck = psycopg2.connect(small_queue.dsn)  # LISTENs, then sits in a transaction it never ends
    with stuck.cursor() as cur:
        cur.execute('LISTEN "pgws_sync"')
    stuck.commit()  # LISTEN takes effect at commit
    with stuck.cursor() as cur:
        cur.execute("SELECT 1")  # a new transaction, left open: nothing queued is read
    publisher = Publisher(small_queue.dsn, max_queue_usage=0.3, timeout=5)
    try:
        payload = "x" * 7000
        sent = 0
        with pytest.raises(PublishFailed) as info:
            while sent < 1000:  # 7 KB each: the 512 KB queue reaches 30% within ~25
                publisher.publish("c", payload, type="text")
                sent += 1
        assert info.value.cause == "queue_full" and 10 < sent < 1000
        assert "notification queue is" in str(info.value) and "stuck in a long transaction" \
            in str(info.value)
        assert "refusing to publish" in caplog.text
        with pytest.raises(PublishFailed):  # refused again, nothing sent meanwhile
            publisher.publish("c", "small", type="text")
        stuck.commit()  # the stuck session ends its transaction: the queue drains
        with stuck.cursor() as cur:
            cur.execute("SELECT 1")  # reads (and so frees) what was queued for it
        wait_for(lambda: _publishes(publisher), timeout=20, message="publishing again")
    finally:
        publisher.close()
        stuck.close()


def _publishes(publisher: Publisher) -> bool:
    try:
        publisher.publish("c", "small", type="text")
        return True
    except PublishFailed as exc:
        assert exc.cause == "queue_full"
        return False
