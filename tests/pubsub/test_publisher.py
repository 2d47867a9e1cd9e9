"""The Publisher pool against real PostgreSQL servers: sharing, broken connections, failures."""

import json
import threading

import psycopg2
import pytest

from pgws_sync import Listener, PublishFailed
from pgws_sync.pubsub.publisher import Publisher
from pgws_sync.pubsub.publication import parse_publication

from ..helpers import Recorder, wait_for


def listen(dsn):
    recorder = Recorder()
    listener = Listener(dsn, min_reconnect=0.2, max_reconnect=1.0)
    listener.add_sink(recorder, ["pgws_sync"])
    assert listener.wait_connected(10)
    return listener, recorder


def test_many_threads_share_a_small_pool(pg_dsn):
    listener, recorder = listen(pg_dsn)
    publisher = Publisher(pg_dsn, pool_size=2)
    try:
        errors = []

        def work(n):
            try:
                for i in range(10):
                    publisher.publish("g", {"t": n, "i": i})
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,), name=f"test-pub-{n}") for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        wait_for(lambda: len(recorder.payloads()) == 80, message="80 publications")
        seen = sorted((p["t"], p["i"]) for p in
                      (json.loads(parse_publication(x).body) for x in recorder.payloads()))
        assert seen == [(n, i) for n in range(8) for i in range(10)]
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'pgws_sync publisher'")
            assert cur.fetchone()[0] <= 2
    finally:
        publisher.close()
        listener.stop()


def test_a_restarted_database_is_reconnected_and_a_stopped_one_fails_clearly(pg_server):
    publisher = Publisher(pg_server.dsn, pool_size=1, timeout=3.0)
    try:
        publisher.publish("g", 1)
        pg_server.stop()
        with pytest.raises(PublishFailed) as info:
            publisher.publish("g", 2)
        assert str(info.value).startswith("could not publish: ")
        pg_server.start()
        listener, recorder = listen(pg_server.dsn)
        try:
            publisher.publish("g", 3)  # the broken pooled connection is replaced
            wait_for(lambda: recorder.payloads(), message="the publication after the restart")
            assert parse_publication(recorder.payloads()[0]).body == "3"
        finally:
            listener.stop()
    finally:
        publisher.close()
    with pytest.raises(PublishFailed) as info:
        publisher.publish("g", 4)
    assert "closed" in str(info.value)
