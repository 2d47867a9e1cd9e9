"""Durable channels read from a real streaming replica: nothing delivered past what it replayed,
a paused replay delays delivery and loses nothing, a lost replica hands reads to the primary."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Iterator, List, Tuple

import psycopg2
import pytest

from pgws_sync import ConfigError, Listener, PubSub
from pgws_sync.sources.log import lsn, wake_channel_for

from ..durable_helpers import Resumer, new_log, one, publish_many, serve_durable
from ..helpers import Gunicorn, Ws, value, wait_for
from ..pgserver import PgServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Tuple[PgServer, PgServer]]:
    """A primary that streams its WAL and a hot standby made from it with pg_basebackup."""
    primary = PgServer()
    primary.options = ("-c wal_level=replica -c max_wal_senders=4 "
                       "-c shared_preload_libraries=pg_stat_statements")
    primary.start()
    one(primary.dsn, "CREATE EXTENSION pg_stat_statements; SELECT 1")
    try:
        standby = primary.replica()
        try:
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()


def replayed(primary: PgServer, standby: PgServer) -> None:
    """Wait until the standby has replayed everything the primary has flushed."""
    target = lsn(one(primary.dsn, "SELECT pg_current_wal_flush_lsn()"))
    wait_for(lambda: lsn(one(standby.dsn, "SELECT pg_last_wal_replay_lsn()")) >= target,
             message="the standby to replay the primary's WAL")


@contextlib.contextmanager
def served(servers: Tuple[PgServer, PgServer], clients: int = 1, workers: int = 1,
           **options: Any) -> Iterator[Tuple[Gunicorn, str, List[Resumer]]]:
    """A durable app reading a new log from the standby, and clients of it (not connected)."""
    primary, standby = servers
    schema = new_log(primary.dsn)
    replayed(primary, standby)
    g = serve_durable(primary.dsn, schema, {"log_read_dsn": standby.dsn,
                                            "metrics_path": "/metrics", **options},
                      workers=workers)
    resumers = [Resumer(g) for _ in range(clients)]
    try:
        yield g, schema, resumers
    finally:
        for c in resumers:
            c.close()
        g.stop()


def reads(server: Gunicorn, source: str) -> float:
    return value(server, f'pgws_sync_log_reads_total{{endpoint="App",source="{source}"}}')


def test_messages_are_read_from_the_replica_in_order_by_two_workers(servers):
    primary, _ = servers
    with served(servers, clients=4, workers=2) as (g, schema, clients):
        for c in clients:
            c.connect(["a", "b"])
        for batch in range(4):
            publish_many(primary.dsn, schema, [(("a", "b")[n % 2], {"batch": batch, "n": n})
                                               for n in range(50)])
        for c in clients:
            c.read_all({"a": 100, "b": 100})
            assert [m["n"] for m in c.received["a"]] == list(range(0, 50, 2)) * 4
        late = Resumer(g)  # a resume pages from the replica too
        late.positions = {"a": (37, clients[0].positions["a"][1])}
        late.connect(["a"])
        late.read_all({"a": 63})
        assert late.positions["a"][0] == 100
        assert reads(g, "replica") > 0 and reads(g, "primary") == 0
        assert value(g, "pgws_sync_log_replica_fallbacks_total") == 0
        assert value(g, 'pgws_sync_log_replica_in_use{endpoint="App"}') >= 1


def flush_questions(primary: PgServer) -> int:
    """How many times the primary was asked how far its WAL is flushed, so far."""
    return int(one(primary.dsn, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                                "WHERE query = 'SELECT pg_current_wal_flush_lsn()'"))


def test_wake_ups_are_read_from_the_replica_without_a_query_to_the_primary(servers):
    # a wake-up names the head it announces: the reader waits for the replica to reach it,
    # instead of asking the primary how far its WAL is flushed for every wake-up
    primary, _ = servers
    with served(servers) as (g, schema, [c]):
        c.connect(["w"])
        publish_many(primary.dsn, schema, [("w", 0)])
        c.read_all({"w": 1})
        before = flush_questions(primary)
        for n in range(1, 21):  # twenty transactions: twenty numberings and wake-ups
            publish_many(primary.dsn, schema, [("w", n)])
        c.read_all({"w": 21})
        assert c.received["w"] == list(range(21))
        # one question per wake-up before; now only where the replica took longer than
        # HEADS_WAIT to replay the numbering (none on a quiet machine)
        assert flush_questions(primary) - before <= 5
        assert reads(g, "primary") == 0 and reads(g, "replica") > 0
        assert "named offset" not in g.log()  # the sequencer's wake-ups are not taken for forged


def test_a_forged_wake_up_naming_a_head_the_log_never_reaches_stalls_nobody(servers):
    # anyone connected may NOTIFY on the wake-up channel: a head that never comes costs
    # the reader a short wait and one question to the primary, not log_read_max_wait
    primary, _ = servers
    with served(servers, log_read_max_wait=60) as (g, schema, [c]):
        c.connect(["fw"])
        publish_many(primary.dsn, schema, [("fw", 0)])
        c.read_all({"fw": 1})
        conn = psycopg2.connect(primary.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            for forged in ("fw\t999999999\t0/0", "fw\t18446744073709551615\tFFFFFFFF/FFFFFFFF",
                           "fw\t5\tnot-a-position", "fw\t-3\t0/0", "fw\t\t", "\t\t"):
                cur.execute("SELECT pg_notify(%s, %s)", (wake_channel_for(schema), forged))
        conn.close()
        publish_many(primary.dsn, schema, [("fw", n) for n in range(1, 4)])
        c.read_all({"fw": 4}, timeout=20)  # well within the 60 s the replica may take
        assert c.received["fw"] == [0, 1, 2, 3]
        assert value(g, "pgws_sync_log_replica_fallbacks_total") == 0
        assert reads(g, "primary") == 0
        warned = [line for line in g.log().splitlines() if "named offset" in line]
        assert len(warned) == 1 and "WARNING" in warned[0], warned  # once a minute at most
        assert re.search(f"a wake-up on '{wake_channel_for(schema)}' named offset 999999999 "
                         f"of channel 'fw', past the [1-4] the log holds", warned[0]), warned


def test_a_paused_replay_delays_delivery_and_loses_nothing(servers):
    primary, standby = servers
    with served(servers, log_read_max_wait=60) as (g, schema, [c]), resumed(standby):
        c.connect(["p"])
        publish_many(primary.dsn, schema, [("p", n) for n in range(5)])
        c.read_all({"p": 5})
        one(standby.dsn, "SELECT pg_wal_replay_pause()")
        publish_many(primary.dsn, schema, [("p", n) for n in range(5, 25)])
        # the reader was woken and waits for the replica: nothing more may have arrived
        wait_for(lambda: value(g, 'pgws_sync_log_replica_lag_bytes{endpoint="App"}') > 0,
                 message="the reader to see the replica behind")
        c.read_all({"p": 5})
        assert len(c.received["p"]) == 5
        # a client that read offset 25 elsewhere resumes here: not "beyond the newest offset"
        ahead = Ws(g.ws_url())
        assert ahead.recv_json()["event"] == "welcome"
        ahead.client.send(json.dumps({"action": "subscribe", "channel": "p", "since": 25,
                                      "epoch": c.positions["p"][1], "id": 1}))
        one(standby.dsn, "SELECT pg_wal_replay_resume()")
        c.read_all({"p": 25}, timeout=15)  # no further wake-up: the waiting read delivers
        assert c.received["p"] == list(range(25))
        reply = ahead.recv_json(15)
        assert reply["event"] == "subscribed" and reply["offset"] == 25, reply
        ahead.close()
        assert reads(g, "primary") == 0
        assert value(g, "pgws_sync_log_replica_fallbacks_total") == 0


@contextlib.contextmanager
def resumed(standby: PgServer) -> Iterator[None]:
    """Whatever happens inside: the standby is replaying again afterwards."""
    try:
        yield
    finally:
        one(standby.dsn, "SELECT pg_wal_replay_resume()")


def test_a_replica_that_lags_too_long_or_is_lost_hands_reads_to_the_primary(servers):
    primary, standby = servers
    sent = 0

    def publish(n: int) -> None:
        nonlocal sent
        publish_many(primary.dsn, schema, [("f", sent + i) for i in range(n)])
        sent += n

    def back_on_the_replica() -> bool:
        publish(1)
        c.read_all({"f": sent})
        return value(g, 'pgws_sync_log_replica_in_use{endpoint="App"}') == 1

    with served(servers, log_read_max_wait=1.0) as (g, schema, [c]), running(primary, standby):
        c.connect(["f"])
        publish(3)
        c.read_all({"f": 3})
        one(standby.dsn, "SELECT pg_wal_replay_pause()")  # lags past log_read_max_wait
        publish(5)
        c.read_all({"f": 8})
        assert value(g, 'pgws_sync_log_replica_fallbacks_total{endpoint="App",'
                        'reason="lag"}') >= 1
        c.close()  # resumes from an offset the paused replica has not replayed
        assert c.connect(["f"])[0]["event"] == "subscribed"
        one(standby.dsn, "SELECT pg_wal_replay_resume()")
        wait_for(back_on_the_replica, 30, "reads to go back to the replica")

        standby.stop()  # lost: every read goes to the primary, nothing waits
        publish(10)
        c.read_all({"f": sent})
        assert value(g, 'pgws_sync_log_replica_fallbacks_total{endpoint="App",'
                        'reason="lost"}') >= 1
        warnings = [line for line in g.log().splitlines()
                    if "WARNING" in line and "go to the primary" in line]
        assert "bytes of WAL behind after waiting 1 s" in warnings[0]
        assert "the replica cannot be reached" in warnings[-1] or \
            "reading from the replica failed" in warnings[-1]
        from_replica = reads(g, "replica")
        standby.start()
        primary.wait_streaming()
        wait_for(back_on_the_replica, 30, "reads to go back to the replica")
        publish(5)
        c.read_all({"f": sent})
        assert reads(g, "replica") > from_replica
        assert c.received["f"] == list(range(sent))  # in order, nothing doubled


@contextlib.contextmanager
def running(primary: PgServer, standby: PgServer) -> Iterator[None]:
    """Whatever happens inside: the standby is up, streaming and replaying afterwards."""
    try:
        yield
    finally:
        try:
            one(standby.dsn, "SELECT 1")
        except psycopg2.OperationalError:
            standby.start()
            primary.wait_streaming()
        one(standby.dsn, "SELECT pg_wal_replay_resume()")


def test_a_bad_read_dsn_or_wait_is_refused_in_one_line(pg_dsn):
    with pytest.raises(ConfigError, match="log_read_dsn is not a connection string"):
        PubSub(Listener(pg_dsn), durable=True, public=True, log_read_dsn="host=x port")
    with pytest.raises(ConfigError, match="log_read_max_wait must be above 0"):
        PubSub(Listener(pg_dsn), durable=True, public=True, log_read_dsn=pg_dsn,
               log_read_max_wait=0)
