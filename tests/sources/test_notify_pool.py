"""The NOTIFY pool against real PostgreSQL: one transaction per call, busy pools, forks."""

import os
import threading

import pytest

from pgws_sync import Listener
from pgws_sync.errors import NotifyFailed
from pgws_sync.sources.notify_pool import NotifyPool

from ..helpers import Recorder, proxied, wait_for


@pytest.fixture
def recorder(pg_dsn, channel):
    sink = Recorder()
    listener = Listener(pg_dsn, min_reconnect=0.2, max_reconnect=1.0)
    listener.add_sink(sink, [channel])
    assert listener.wait_connected(10)
    yield sink
    listener.stop()


def test_payloads_go_in_order_and_all_or_none(pg_dsn, channel, recorder):
    pool = NotifyPool(pg_dsn, size=1)
    try:
        pool.notify(channel, ["one", "two", "three"])
        with pytest.raises(NotifyFailed) as info:
            pool.notify(channel, ["fits", "x" * 8000])  # PostgreSQL refuses the second
        assert info.value.reason.startswith("NOTIFY failed: payload string too long")
        pool.notify(channel, ["after"])  # same connection: "fits" would have come first
        wait_for(lambda: "after" in recorder.payloads(), message="the last notification")
        assert recorder.payloads() == ["one", "two", "three", "after"]
    finally:
        pool.close()
    with pytest.raises(NotifyFailed, match="closed"):
        pool.notify(channel, ["too late"])


def test_a_busy_pool_says_so_and_a_stalled_connection_fails_alone(pg_dsn, channel):
    proxy, dsn = proxied(pg_dsn)
    pool = NotifyPool(dsn, size=1, wait_timeout=0.5, size_name="pool_size")
    errors = []

    def send(text):
        try:
            pool.notify(channel, [text])
        except NotifyFailed as exc:
            errors.append(exc.reason)

    try:
        pool.notify(channel, ["opens the connection"])
        proxy.freeze()  # the database hears nothing more on it
        threads = [threading.Thread(target=send, args=(f"t{n}",), name=f"test-pool-{n}")
                   for n in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: errors, message="the thread that found no free connection")
        assert errors == ["the database is busy: all 1 connections are in use (pool_size)"]
        proxy.close()  # the stalled one fails, and cannot reconnect through the proxy
        for t in threads:
            t.join(30)
        assert len(errors) == 2 and errors[1].startswith(("NOTIFY failed", "cannot connect to the database"))
    finally:
        proxy.close()
        pool.close()


def test_a_forked_child_uses_its_own_connection_and_leaves_the_parents_alone(
        pg_dsn, channel, recorder):
    pool = NotifyPool(pg_dsn, size=1)
    try:
        pool.notify(channel, ["parent before"])
        pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = 1
            try:
                pool.notify(channel, ["child"])
                pool.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pool.notify(channel, ["parent after"])
        wait_for(lambda: len(recorder.payloads()) == 3, message="three notifications")
        with recorder.lock:
            senders = {n.payload: n.pid for n in recorder.notes}
        assert senders["parent before"] == senders["parent after"] != senders["child"]
    finally:
        pool.close()
