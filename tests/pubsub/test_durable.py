"""Durable channels end to end: offsets, resume, rollback, sizes, bad positions, retention."""

from __future__ import annotations

import json
import uuid
import random
import threading
import time

import psycopg2
import pytest

from pgws_sync import InvalidPayload, migrate, publish_durable
from pgws_sync.errors import MessageTooLarge
from pgws_sync.sources.log import heads, prune, sequence

from ..durable_helpers import (
    Resumer,
    new_log,
    number_all,
    publish_many,
    serve_durable,
    wait_numbered,
)
from ..pubsub_helpers import Client, post


@pytest.fixture
def durable(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, workers=2)
    yield server, schema
    server.stop()


def subscribe(client: Client, channel: str, **extra):
    return client.request(action="subscribe", channel=channel, id="s", **extra)


def test_migrate_is_idempotent_and_says_what_it_did(pg_dsn):
    schema = new_log(pg_dsn)
    conn = psycopg2.connect(pg_dsn)
    try:
        assert migrate(conn, schema=schema) == [
            f"the durable log in schema {schema!r} is up to date (version 2); nothing to do"]
        assert migrate(conn, schema=schema, max_payload=10) == [
            "set max_payload from 1048576 to 10 bytes"]
        with conn, conn.cursor() as cur:  # as an earlier 2.x release made it
            cur.execute(f"ALTER TABLE {schema}.messages ALTER COLUMN id SET NOT NULL, "
                        f"ADD CHECK (type IN ('json', 'text'))")
            cur.execute(f"CREATE INDEX offsets_seq ON {schema}.offsets (seq)")
        assert migrate(conn, schema=schema) == [
            f"relaxed {schema}.messages: no CHECK, id may be NULL (publishing costs less)",
            f"dropped the index {schema}.offsets_seq (numbering costs less)"]
        assert migrate(conn, schema=schema)[0].endswith("nothing to do")
    finally:
        conn.close()


def test_a_message_published_without_an_id_gets_the_same_uuid_on_every_read(
        durable, pg_dsn, channel):
    server, schema = durable
    live = Client(server)
    subscribe(live, channel)
    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT {schema}.publish(%s, '1'), {schema}.publish(%s, '2')",
                    (channel, channel))
    conn.close()
    first = [live.recv_json() for _ in range(2)]
    ids = [f["id"] for f in first]
    assert len(set(ids)) == 2 and all(str(uuid.UUID(i)) == i for i in ids)
    again = Client(server)
    subscribe(again, channel, since=0)
    assert [again.recv_json()["id"] for _ in range(2)] == ids


def test_committed_messages_arrive_once_with_consecutive_offsets_rolled_back_never(
        durable, pg_dsn, channel):
    server, schema = durable
    client = Client(server)
    reply = subscribe(client, channel)
    assert reply["event"] == "subscribed" and reply["offset"] == 0 and reply["reply_to"] == "s"
    epoch = reply["epoch"]
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn:  # rolled back: never delivered, takes no offset
            publish_durable(conn, channel, {"n": "rolled back"}, schema=schema)
            conn.rollback()
        with conn:  # numbered after commit: the call returns the message's seq, not an offset
            first = publish_durable(conn, channel, {"n": 1}, schema=schema)
            assert publish_durable(conn, channel, "two", type="text", schema=schema) > first
        with conn, conn.cursor() as cur:  # from SQL, in the caller's transaction
            cur.execute(f"SELECT {schema}.publish(%s, %s)", (channel, '{"n": 3}'))
    finally:
        conn.close()
    frames = [client.recv_json() for _ in range(3)]
    assert [(f["offset"], f["epoch"]) for f in frames] == [(1, epoch), (2, epoch), (3, epoch)]
    assert frames[0]["payload"] == {"n": 1}
    assert frames[1]["type"] == "text" and frames[1]["payload"] == "two"
    assert frames[2]["payload"] == {"n": 3}
    assert client.ws.nothing_pending()


def test_a_client_resumes_with_since_and_gets_what_it_missed_then_live(durable, pg_dsn, channel):
    server, schema = durable
    reader = Resumer(server)
    reader.connect([channel])
    publish_many(pg_dsn, schema, ((channel, i) for i in range(1, 6)))
    reader.read_all({channel: 5})
    reader.close()
    publish_many(pg_dsn, schema, ((channel, i) for i in range(6, 301)))  # while away
    replies = reader.connect([channel])
    assert replies[0]["event"] == "subscribed" and replies[0]["offset"] == 300
    publish_many(pg_dsn, schema, ((channel, i) for i in range(301, 311)))  # live after the seam
    reader.read_all({channel: 310})
    assert reader.received[channel] == list(range(1, 311))
    reader.close()


def test_publish_from_the_endpoint_and_from_clients(durable, pg_dsn, channel):
    server, _schema = durable
    client = Client(server, headers={"X-User": "ann"})
    subscribe(client, channel)
    post(server, "/debug/publish", {"channel": channel, "message": {"from": "server"}})
    frame = client.recv_json()
    assert frame["payload"] == {"from": "server"} and frame["offset"] == 1
    client.send(action="publish", channel=channel, payload={"from":  "client"}, id="p")
    frames = [client.recv_json(), client.recv_json()]
    reply = next(f for f in frames if f.get("event") == "published")
    message = next(f for f in frames if "offset" in f)
    assert reply["reply_to"] == "p" and message["offset"] == 2
    assert message["payload"] == {"from": "client"} and message["id"] == reply["id"]


@pytest.mark.parametrize("size", [7999, 8000, 8001, 1_048_576])
def test_payloads_of_any_size_up_to_the_maximum_arrive_byte_exact(durable, pg_dsn, channel,
                                                                  size):
    server, schema = durable
    client = Client(server)
    subscribe(client, channel)
    text = "é" * ((size - 2) // 2) + "x" * ((size - 2) % 2)  # a JSON string of exactly size bytes
    payload = json.dumps(text, ensure_ascii=False)
    assert len(payload.encode()) == size
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT {schema}.publish(%s, %s)", (channel, payload))
    finally:
        conn.close()
    raw = client.recv(timeout=20)
    assert f'"payload": {payload}, "id": ' in raw
    assert json.loads(raw)["offset"] == 1


def test_over_the_maximum_is_refused_before_the_transaction_commits(durable, pg_dsn, channel):
    server, schema = durable
    client = Client(server, headers={"X-User": "ann"})
    subscribe(client, channel)
    too_big = "x" * 1_048_577
    conn = psycopg2.connect(pg_dsn)
    try:
        with pytest.raises(MessageTooLarge, match="1048577 bytes .* at most 1048576"):
            publish_durable(conn, channel, too_big, type="text", schema=schema)
        conn.rollback()
        with pytest.raises(psycopg2.Error, match="is 1048577 bytes; the log takes at most"):
            with conn, conn.cursor() as cur:
                cur.execute(f"SELECT {schema}.publish(%s, %s, 'text')", (channel, too_big))
        with pytest.raises(InvalidPayload, match="binary"):
            publish_durable(conn, channel, b"bytes", type="binary", schema=schema)
    finally:
        conn.close()
    publish_many(pg_dsn, schema, [(channel, "after")])
    frame = client.recv_json()
    assert frame["offset"] == 1 and frame["payload"] == "after"


def test_a_client_publishing_over_the_maximum_gets_an_error_frame(pg_dsn, channel):
    schema = new_log(pg_dsn, max_payload=100)
    server = serve_durable(pg_dsn, schema)
    try:
        client = Client(server, headers={"X-User": "ann"})
        subscribe(client, channel)
        client.send(action="publish", channel=channel, payload="x" * 99, id="big")
        reply = client.recv_json()  # 101 bytes of JSON text
        assert reply["event"] == "error" and reply["reply_to"] == "big"
        assert "101 bytes" in reply["error"] and "at most 100" in reply["error"], reply
        client.send(action="publish", channel=channel, payload="x" * 98, id="fits")
        frames = [client.recv_json(), client.recv_json()]
        assert {f.get("event") for f in frames} == {"published", None}
        assert next(f for f in frames if "offset" in f)["payload"] == "x" * 98
    finally:
        server.stop()


@pytest.mark.parametrize("extra, error", [
    ({"since": -1}, "invalid 'since': -1 is not an offset"),
    ({"since": 1.5}, "invalid 'since': 1.5 is not an offset"),
    ({"since": "3"}, "invalid 'since': \"3\" is not an offset"),
    ({"since": True}, "invalid 'since': true is not an offset"),
    ({"since": None}, "invalid 'since': null is not an offset"),
    ({"since": 99}, "invalid 'since': 99 is beyond the channel's newest offset (2)"),
    ({"since": 0, "epoch": 7}, "invalid 'epoch': 7 is not an epoch"),
    ({"since": 0, "epoch": ""}, "invalid 'epoch': \"\" is not an epoch"),
    ({"epoch": "e"}, "invalid 'epoch': it goes with 'since'"),
])
def test_every_invalid_position_gets_its_error_and_the_socket_stays_usable(
        durable, pg_dsn, channel, extra, error):
    server, schema = durable
    publish_many(pg_dsn, schema, [(channel, 1), (channel, 2)])
    client = Client(server)
    reply = subscribe(client, channel, **extra)
    assert reply["event"] == "error" and reply["error"].startswith(error), reply
    assert reply["reply_to"] == "s"
    reply = subscribe(client, channel, since=1)
    assert reply["event"] == "subscribed" and reply["offset"] == 2
    assert client.recv_json()["payload"] == 2


def test_another_epoch_gets_resync_required_then_live(durable, pg_dsn, channel):
    server, schema = durable
    publish_many(pg_dsn, schema, [(channel, 1), (channel, 2)])
    client = Client(server)
    reply = subscribe(client, channel, since=1, epoch="an-epoch-of-another-log")
    assert reply["event"] == "resync_required" and reply["offset"] == 2
    assert reply["reason"].startswith("epoch")
    publish_many(pg_dsn, schema, [(channel, 3)])
    assert client.recv_json()["payload"] == 3


def test_a_position_older_than_retention_gets_resync_required(pg_dsn, channel):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"retention_messages": 3, "prune_interval": None})
    try:
        publish_many(pg_dsn, schema, ((channel, i) for i in range(1, 11)))
        client = Client(server)
        assert subscribe(client, channel, since=2)["event"] == "subscribed"
        assert [client.recv_json()["payload"] for _ in range(8)] == list(range(3, 11))
        assert post(server, "/debug/prune", {})["deleted"] == 7  # endpoint.prune(): one pass
        late = Client(server)
        reply = subscribe(late, channel, since=2)
        assert reply["event"] == "resync_required" and reply["offset"] == 10
        assert reply["reason"].startswith("retention: offsets up to 7")
        resumed = Client(server)
        assert subscribe(resumed, channel, since=7)["event"] == "subscribed"
        assert [resumed.recv_json()["payload"] for _ in range(3)] == [8, 9, 10]
    finally:
        server.stop()


def waiting_for_lock(dsn) -> bool:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_a_publisher_never_waits_for_another_transaction_of_the_same_channel(
        durable, pg_dsn, channel, first_ends):
    server, schema = durable
    client = Client(server)
    subscribe(client, channel)
    first, second = psycopg2.connect(pg_dsn), psycopg2.connect(pg_dsn)
    try:
        publish_durable(first, channel, "first", type="text", schema=schema)  # stays open
        with second:  # commits at once: nothing to wait for
            publish_durable(second, channel, "second", type="text", schema=schema)
        frame = client.recv_json()  # while the first transaction is still open
        assert (frame["payload"], frame["offset"]) == ("second", 1)
        assert not waiting_for_lock(pg_dsn)
        getattr(first, first_ends)()
        if first_ends == "commit":
            frame = client.recv_json()
            assert (frame["payload"], frame["offset"]) == ("first", 2)  # consecutive
        publish_many(pg_dsn, schema, [(channel, "after")])
        frame = client.recv_json()
        assert (frame["payload"], frame["offset"]) == ("after", 3 if first_ends == "commit" else 2)
    finally:
        first.close()
        second.close()


def test_offsets_keep_growing_after_everything_was_pruned(pg_dsn, channel):
    schema = new_log(pg_dsn)
    publish_many(pg_dsn, schema, ((channel, n) for n in range(3)), numbered=False)
    assert number_all(pg_dsn, schema) == 3
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        assert prune(conn, schema, max_age=0, keep=1) == 3
        with conn.cursor() as cur:  # the channel's row went too: the log's floor keeps its head
            assert heads(cur, schema, [channel, "never-published"]) == {
                channel: (3, 4), "never-published": (3, 4)}
        publish_durable(conn, channel, "after", type="text", schema=schema)
        assert number_all(pg_dsn, schema) == 1
        with conn.cursor() as cur:
            assert heads(cur, schema, [channel]) == {channel: (4, 4)}
    finally:
        conn.close()


def test_pruning_by_age_takes_each_channel_s_expired_offsets_and_keeps_the_rest(pg_dsn):
    schema = new_log(pg_dsn)
    publish_many(pg_dsn, schema, (("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)),
                 numbered=False)
    assert number_all(pg_dsn, schema) == 5
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:  # the three oldest (a1, b1, a2) are an hour old
            cur.execute(f"UPDATE {schema}.messages SET published_at = now() - interval '1 hour' "
                        f"WHERE seq IN (SELECT seq FROM {schema}.messages ORDER BY seq LIMIT 3)")
        assert prune(conn, schema, max_age=60, keep=1000) == 3
        with conn.cursor() as cur:
            cur.execute(f'SELECT channel, array_agg("offset" ORDER BY "offset") '
                        f"FROM {schema}.offsets GROUP BY channel ORDER BY channel")
            assert cur.fetchall() == [("a", [3]), ("b", [2])]
            cur.execute(f"SELECT channel, pruned_to, head FROM {schema}.streams ORDER BY channel")
            assert cur.fetchall() == [("a", 2, 3), ("b", 1, 2)]
        assert prune(conn, schema, max_age=60, keep=1000) == 0
    finally:
        conn.close()


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_publishers_at_any_isolation_level_both_succeed_with_consecutive_offsets(
        durable, pg_dsn, channel, level):
    server, schema = durable
    client = Client(server)
    subscribe(client, channel)
    a, b = psycopg2.connect(pg_dsn), psycopg2.connect(pg_dsn)
    try:
        for conn in (a, b):
            conn.set_session(isolation_level=level)
            conn.cursor().execute("SELECT 1")  # both take their snapshots now
        publish_durable(a, channel, "a", type="text", schema=schema)
        publish_durable(b, channel, "b", type="text", schema=schema)
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()
    frames = [client.recv_json(), client.recv_json()]
    assert sorted(f["payload"] for f in frames) == ["a", "b"]
    assert [f["offset"] for f in frames] == [1, 2]


def test_transactions_publishing_to_two_channels_in_opposite_orders_never_deadlock(
        pg_dsn, channel):
    schema = new_log(pg_dsn)
    x, y = channel + "-x", channel + "-y"
    a, b = psycopg2.connect(pg_dsn), psycopg2.connect(pg_dsn)
    try:
        for _ in range(5):
            # lock step: a publishes to x while b publishes to y, then each to the other
            publish_durable(a, x, "a1", type="text", schema=schema)
            publish_durable(b, y, "b1", type="text", schema=schema)
            errors = []

            def second(conn, name, text):
                try:
                    publish_durable(conn, name, text, type="text", schema=schema)
                    conn.commit()
                except psycopg2.Error as exc:  # a deadlock would end up here
                    errors.append(exc)

            threads = [threading.Thread(target=second, args=(a, y, "a2"), name="a", daemon=True),
                       threading.Thread(target=second, args=(b, x, "b2"), name="b", daemon=True)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
                assert not thread.is_alive()
            assert errors == []
    finally:
        a.close()
        b.close()
    assert number_all(pg_dsn, schema) == 20
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f'SELECT channel, array_agg("offset" ORDER BY "offset") FROM '
                        f"{schema}.offsets GROUP BY channel ORDER BY channel")
            assert cur.fetchall() == [(x, list(range(1, 11))), (y, list(range(1, 11)))]
    finally:
        conn.close()


#: What version 1 created (the publish function aside).
VERSION_1 = [
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE {s}.meta (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version integer NOT NULL,
    epoch text NOT NULL DEFAULT gen_random_uuid()::text,
    max_payload integer NOT NULL,
    wake_channel text NOT NULL
)""",
    """CREATE TABLE {s}.streams (
    channel text PRIMARY KEY,
    pruned_to bigint NOT NULL DEFAULT 0
)""",
    """CREATE TABLE {s}.messages (
    channel text NOT NULL,
    "offset" bigint NOT NULL,
    id text NOT NULL,
    type text NOT NULL CHECK (type IN ('json', 'text')),
    payload text NOT NULL,
    reply_to text,
    published_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, "offset")
)""",
]


def test_a_version_1_log_is_upgraded_in_place_and_keeps_its_offsets(durable, pg_dsn, channel):
    _server, _schema = durable
    schema = f"old_{channel}".lower().replace("-", "_")
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:  # a log as version 1 made it, with two messages
            for stmt in VERSION_1:
                cur.execute(stmt.replace("{s}", schema))
            cur.execute(f"INSERT INTO {schema}.meta (version, max_payload, wake_channel) "
                        f"VALUES (1, 1048576, '{schema}_log')")
            cur.execute(f"INSERT INTO {schema}.streams (channel) VALUES (%s)", (channel,))
            cur.execute(f"INSERT INTO {schema}.messages (channel, \"offset\", id, type, payload) "
                        f"VALUES (%s, 1, 'a', 'json', '1'), (%s, 2, 'b', 'json', '2')",
                        (channel, channel))
        assert migrate(conn, schema=schema) == [
            f"upgraded the durable log in schema {schema!r} from version 1 to 2 (offsets "
            f"numbered after commit)"]
    finally:
        conn.close()
    server = serve_durable(pg_dsn, schema)
    try:
        client = Client(server)
        reply = subscribe(client, channel, since=0)
        assert reply["event"] == "subscribed" and reply["offset"] == 2
        assert [client.recv_json()["payload"] for _ in range(2)] == [1, 2]
        publish_many(pg_dsn, schema, [(channel, 3)])
        frame = client.recv_json()
        assert (frame["payload"], frame["offset"]) == (3, 3)
    finally:
        server.stop()


def test_a_recreated_log_sends_resync_required_with_its_new_epoch(pg_dsn, channel):
    # one worker, up once it answers: a worker still booting when the log is dropped
    # refuses to start, and gunicorn then stops every worker (a setup that cannot work)
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, workers=1)
    try:
        recreated_log_test(server, schema, pg_dsn, channel)
    finally:
        server.stop()


def recreated_log_test(server, schema, pg_dsn, channel):
    client = Client(server)
    old_epoch = subscribe(client, channel)["epoch"]
    publish_many(pg_dsn, schema, [(channel, "old")])
    assert client.recv_json()["offset"] == 1
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {schema} CASCADE")
    migrate(conn, schema=schema)
    conn.close()
    try:
        publish_many(pg_dsn, schema, [(channel, "new")])  # offset 1 of the new log wakes it up
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nserver log:\n{server.log()[-4000:]}") from None
    frame = client.recv_json(timeout=30)
    assert frame["event"] == "resync_required" and frame["reason"].startswith("epoch")
    assert frame["epoch"] != old_epoch and frame["offset"] == 1  # refetch, then live from 2
    publish_many(pg_dsn, schema, [(channel, "newer")])
    message = client.recv_json(timeout=30)
    assert (message["payload"], message["offset"], message["epoch"]) == ("newer", 2,
                                                                         frame["epoch"])


def test_every_committed_message_is_numbered_once_whatever_the_commit_order(pg_dsn):
    """Four publishers (1-3 messages, a pause, one in ten rolled back) against a sequencer
    numbering every few milliseconds: transactions commit out of seq order all the time.
    Every committed message gets exactly one offset, offsets 1..N per channel, nothing of a
    rolled-back transaction is numbered, and no gap is left behind."""
    schema = new_log(pg_dsn)
    committed, lock, done = set(), threading.Lock(), threading.Event()

    def publisher(index: int) -> None:
        rng, conn = random.Random(index), psycopg2.connect(pg_dsn)
        try:
            for k in range(150):
                tags = [f"{index}-{k}-{n}" for n in range(rng.randint(1, 3))]
                for tag in tags:
                    publish_durable(conn, rng.choice("ab"), {"tag": tag}, schema=schema)
                time.sleep(rng.random() * 0.01)  # others commit meanwhile
                if rng.random() < 0.1:
                    conn.rollback()
                    continue
                conn.commit()
                with lock:
                    committed.update(tags)
        finally:
            conn.close()

    def sequencer() -> None:
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        try:
            while not done.is_set():
                sequence(conn, schema)
                done.wait(0.003)
        finally:
            conn.close()

    numbering = threading.Thread(target=sequencer, name="sequencer", daemon=True)
    numbering.start()
    threads = [threading.Thread(target=publisher, args=(i,), name=f"publisher-{i}", daemon=True)
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    numbering.join(10)
    number_all(pg_dsn, schema)
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT o.channel, o.\"offset\", m.payload::json->>'tag' FROM "
                        f"{schema}.offsets o JOIN {schema}.messages m ON m.seq = o.seq "
                        f"ORDER BY o.channel, o.\"offset\"")
            rows = cur.fetchall()
            cur.execute(f"SELECT count(*) FROM {schema}.gaps")
            assert cur.fetchone()[0] == 0
    finally:
        conn.close()
    tags = [tag for _, _, tag in rows]
    assert len(tags) == len(set(tags)) and set(tags) == committed
    for name in "ab":
        offsets = [offset for channel, offset, _ in rows if channel == name]
        assert offsets == list(range(1, len(offsets) + 1))
