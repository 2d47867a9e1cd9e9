"""Durable channels in someone else's write path: odd arguments, poisoned rows, bursts, locks,
memory. Each test shows what the one bad thing gets, and that everyone else kept receiving."""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator, List, Optional, Tuple
import json as json_module

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgws_sync import (
    ConfigError,
    InvalidPayload,
    Listener,
    LogUnavailable,
    PubSub,
    Push,
    migrate,
    publish_durable,
)
from pgws_sync.errors import MessageTooLarge
from pgws_sync.sources.log import migration_sql

from ..durable_helpers import new_log, publish_many, serve_durable, wait_numbered
from ..helpers import Gunicorn, http_get, raw_upgrade, read_frame, wait_for
from ..pubsub_helpers import APP, Client, post, stats
from ..test_faults import masked_frame

#: (reply_to, id, type, payload) a publisher may pass: each raises or arrives.
ODD_ARGUMENTS = [
    ("req-7", None, "json", '{"a": 1}'),            # reply_to that is not JSON
    ('{"a": 1}', None, "json", '{"a": 2}'),         # reply_to that is an object
    ('"fine"', None, "json", '{"a": 3}'),           # a string: arrives with it
    ("7", None, "json", '{"a": 4}'),                # a number: arrives with it
    (None, "line\nbreak", "json", '{"a": 5}'),      # an id with a newline
    (None, "x" * 5000, "json", '{"a": 6}'),         # an id of 5000 characters
    (None, "quotes \" and \u2028", "text", 'he said "hi"\u2028\u2029 and left'),
    (None, None, "json", '{"n": NaN}'),             # JSON with NaN
    (None, None, "json", "not json"),
    (None, None, "yaml", "a: 1"),
    (None, "", "text", "empty id"),
]


@pytest.fixture(scope="module")
def durable(pg_dsn: str) -> Iterator[Tuple[Any, str]]:
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, workers=2)
    yield server, schema
    server.stop()


def sql_publish(dsn: str, schema: str, channel: str, payload: Any, type_: Any = "json",
                message_id: Any = None, reply_to: Any = None) -> Optional[str]:
    """Call the SQL function in its own transaction: None if it committed, else the error."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT {schema}.publish(%s, %s, %s, %s, %s)",
                        (channel, payload, type_, message_id, reply_to))
        return None
    except (psycopg2.Error, ValueError) as exc:  # ValueError: psycopg2 refuses a NUL itself
        return str(exc).splitlines()[0]
    finally:
        conn.close()


def messages(client: Client, n: int, timeout: float = 20.0) -> List[dict]:
    got: List[dict] = []
    while len(got) < n:
        frame = client.ws.recv_json(timeout)
        if "offset" in frame and "event" not in frame:
            got.append(frame)
    return got


def test_every_odd_argument_raises_or_arrives_and_nobody_stops_receiving(durable, pg_dsn,
                                                                         channel):
    server, schema = durable
    other = channel + "-other"
    live, bystander = Client(server), Client(server)
    live.request(action="subscribe", channel=channel, id="s")
    bystander.request(action="subscribe", channel=other, id="s")
    arrived = []
    for reply_to, message_id, type_, payload in ODD_ARGUMENTS:
        error = sql_publish(pg_dsn, schema, channel, payload, type_, message_id, reply_to)
        if error is None:
            arrived.append((reply_to, message_id, type_, payload))
        else:
            assert "pgws_sync.publish" in error or "json" in error, error  # a clear refusal
        sql_publish(pg_dsn, schema, other, json.dumps({"after": payload[:20]}))
    print(f"\n{len(arrived)} of {len(ODD_ARGUMENTS)} odd publishes accepted; the rest raised")
    assert [a[0] for a in arrived] == ['"fine"', "7", None]  # exactly the valid ones
    got = messages(live, len(arrived))
    for frame, (reply_to, message_id, type_, payload) in zip(got, arrived):
        assert frame.get("type", "json") == type_
        assert frame["payload"] == (json.loads(payload) if type_ == "json" else payload)
        assert frame.get("reply_to") == (None if reply_to is None else json.loads(reply_to))
    assert len(messages(bystander, len(ODD_ARGUMENTS))) == len(ODD_ARGUMENTS)
    resumed = Client(server)  # a client resuming from before all of them
    assert resumed.request(action="subscribe", channel=channel, id="r",
                           since=0)["event"] == "subscribed"
    assert [f["offset"] for f in messages(resumed, len(arrived))] == [f["offset"] for f in got]


def test_a_row_written_around_the_function_goes_out_without_its_bad_field(durable, pg_dsn,
                                                                          channel):
    """A role that inserts into the intake directly (no checks): the row still reaches
    live and resuming subscribers, minus the field that cannot be framed."""
    server, schema = durable
    live = Client(server)
    live.request(action="subscribe", channel=channel, id="s")
    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        for n in range(7):
            cur.execute(f"INSERT INTO {schema}.messages (channel, id, type, payload, reply_to) "
                        f"VALUES (%s, %s, 'json', %s, %s)",
                        (channel, f"m{n}", json.dumps({"n": n}), "req-7" if n == 3 else None))
        for bad in ("c" * 9000, ""):  # names no NOTIFY takes, no subscriber can hold
            cur.execute(f"INSERT INTO {schema}.messages (channel, id, type, payload) "
                        f"VALUES (%s, 'x', 'json', '1')", (bad,))
        cur.execute(f"INSERT INTO {schema}.messages (channel, id, type, payload) "
                    f"VALUES (%s, 'm7', 'yaml', '{{\"n\": 7}}')", (channel,))  # a bad type
    conn.close()
    got = messages(live, 8)  # numbering went on past the bad names
    assert [f["payload"]["n"] for f in got[:7]] == list(range(7))
    assert "reply_to" not in got[3]
    assert got[7]["payload"] == '{"n": 7}'  # the unknown type goes out as text
    resumed = Client(server)
    assert resumed.request(action="subscribe", channel=channel, id="r",
                           since=0)["event"] == "subscribed"
    assert [f["offset"] for f in messages(resumed, 8)] == [f["offset"] for f in got]
    fresh = Client(server)  # a new subscribe is answered at once
    assert fresh.request(action="subscribe", channel=channel + "-new",
                         id="n")["event"] == "subscribed"


def test_a_burst_of_60_subscribes_gets_at_most_max_subscriptions(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"max_subscriptions": 10})
    try:
        client = Client(server)
        for n in range(60):  # all at once, no waiting for replies
            client.send(action="subscribe", channel=f"burst-{n}", id=n)
        replies = [client.ws.recv_json() for _ in range(60)]
        accepted = [r for r in replies if r.get("event") == "subscribed"]
        refused = [r for r in replies if r.get("event") == "error"]
        assert len(accepted) == 10 and len(refused) == 50, replies
        assert all("too many subscriptions" in r["error"] for r in refused)
    finally:
        server.stop()


def ready(server: Any) -> int:
    return http_get(server.url("/readyz"))[0]


def test_locked_log_tables_make_readiness_fail_then_recover_with_nothing_lost(pg_dsn, channel):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"health_detail": True}, workers=1)
    try:
        client = Client(server)
        client.request(action="subscribe", channel=channel, id="s")
        wait_for(lambda: ready(server) == 200, message="ready")
        locker = psycopg2.connect(pg_dsn)
        cur = locker.cursor()
        cur.execute(f"LOCK TABLE {schema}.messages, {schema}.offsets, {schema}.streams "
                    f"IN ACCESS EXCLUSIVE MODE")  # what an ALTER TABLE holds
        done: List[Optional[str]] = []
        publisher = threading.Thread(  # waits for the lock, then commits
            target=lambda: done.append(sql_publish(pg_dsn, schema, channel, '{"n": 1}')),
            name="publisher", daemon=True)
        publisher.start()
        wait_for(lambda: ready(server) == 503, timeout=15, message="/readyz 503")
        status, body = http_get(server.url("/healthz"))
        health = json.loads(body)
        assert status == 503 and health["reason"] == "log stalled" and health["log"] == "stalled"
        locker.commit()
        locker.close()
        publisher.join(30)
        assert done == [None]
        assert messages(client, 1)[0]["payload"] == {"n": 1}
        wait_for(lambda: ready(server) == 200, timeout=30, message="/readyz 200 again")
    finally:
        server.stop()


def test_a_durable_worker_connects_its_log_from_boot_without_a_request(pg_dsn):
    """Under the gunicorn hook the log reader and the sequencer start with the worker: they
    show in pg_stat_activity before anything asks the server (so /healthz is right at once)."""
    schema = new_log(pg_dsn)
    env = {"PGWS_DB_URI": pg_dsn,
           "PGWS_OPTIONS": json_module.dumps({"durable": True, "log_schema": schema})}
    server = Gunicorn(APP, env=env, workers=2)  # no wait_up: it would send requests
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True

    def sessions() -> List[str]:
        with admin.cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_activity WHERE "
                        "application_name IN ('pgws_sync streams') OR "
                        "application_name LIKE 'pgws_sync sequencer %'")
            return sorted(name.split(" ")[1] for name, in cur.fetchall())

    try:
        wait_for(lambda: sessions() == ["sequencer", "sequencer", "streams", "streams"],
                 timeout=30, message="both workers' log reader and sequencer connected")
        # the first request may come before gunicorn accepts: wait until it answers at all
        server.wait_up()  # then healthy once its listener is up too, with no socket opened
        wait_for(lambda: http_get(server.url("/healthz")) == (200, '{"status": "ok"}'),
                 timeout=30, message="/healthz to answer 200")
    finally:
        admin.close()
        server.stop()


def test_six_sockets_that_resume_48_mib_and_never_read_cost_the_worker_little(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"write_timeout": 120}, workers=1)
    try:
        body = "x" * (1 << 20)
        conn = psycopg2.connect(pg_dsn)
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count({schema}.publish('big', %s, 'text')) "
                        f"FROM generate_series(1, 48)", (body[:-2],))
        conn.close()
        wait_numbered(pg_dsn, schema)
        before = stats(server)["rss_kb"]
        socks = []
        for _ in range(6):
            sock, head = raw_upgrade(server.port, rcvbuf=4096)
            assert b" 101 " in head
            read_frame(sock)  # welcome
            sock.sendall(masked_frame(1, json.dumps({"action": "subscribe", "channel": "big",
                                                     "since": 0, "id": 1}).encode()))
            socks.append(sock)
        peak = [before]

        def all_stuck() -> bool:
            now = stats(server)
            peak[0] = max(peak[0], now["rss_kb"])
            return len(now["connections"]) == 6 and all(
                c["queue_depth"] > 0 for c in now["connections"])

        wait_for(all_stuck, timeout=60, message="six sockets with full queues")
        for _ in range(20):  # keep sampling while paging would go on, if it were unbounded
            all_stuck()
        grown = (peak[0] - before) / 1024
        print(f"\nsix non-reading sockets resuming 48 x 1 MiB: the worker grew {grown:.1f} MiB")
        assert grown < 100
        for sock in socks:
            sock.close()
    finally:
        server.stop()


def test_publish_durable_honours_the_logs_own_max_payload(pg_dsn, channel):
    schema = new_log(pg_dsn, max_payload=4_000_000)
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn:
            publish_durable(conn, channel, "x" * 2_000_000, type="text", schema=schema)
        with pytest.raises(MessageTooLarge, match="4000001 bytes .* at most 4000000"):
            with conn:
                publish_durable(conn, channel, "x" * 4_000_001, type="text", schema=schema)
    finally:
        conn.close()


@pytest.mark.parametrize("schema, problem", [
    ("s" * 60, "at most 59"),
    ("", "empty"),
])
def test_schema_names_are_checked_before_anything_is_created(pg_dsn, schema, problem):
    with pytest.raises(InvalidPayload, match=problem):
        migrate(pg_dsn, schema=schema)
    with pytest.raises(InvalidPayload, match=problem):
        migration_sql(schema)


def test_printed_sql_runs_as_printed_for_a_name_with_a_quote(pg_dsn):
    schema = "it's_log"
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for stmt in migration_sql(schema):
                cur.execute(stmt)
            cur.execute('SELECT "it\'s_log".publish(%s, %s)', ("q", '{"ok": true}'))
            cur.execute("SELECT wake_channel FROM \"it's_log\".meta")
            assert cur.fetchone()[0] == "it's_log_log"
            cur.execute("DROP SCHEMA \"it's_log\" CASCADE")
    finally:
        conn.close()


# JSON values a publisher could pass (finite numbers: PostgreSQL's jsonb refuses NaN)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
payloads = json_values.map(json.dumps) | st.text(max_size=200)
ids = st.none() | st.text(max_size=210)
reply_tos = st.none() | st.text(max_size=20) | json_values.map(json.dumps)


def subscribed_client(durable: Tuple[Any, str], channel: str) -> Iterator[Client]:
    """A client of the module's server subscribed to ``channel``, closed at the end."""
    client = Client(durable[0])
    client.request(action="subscribe", channel=channel, id="s")
    yield client
    client.ws.close()


@pytest.fixture(scope="module")
def fuzz_client(durable) -> Iterator[Client]:
    yield from subscribed_client(durable, "fuzz")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=payloads, type_=st.sampled_from(["json", "text", None, "binary"]),
       message_id=ids, reply_to=reply_tos)
def test_fuzz_every_committed_sql_publish_reaches_a_live_subscriber(
        durable, pg_dsn, fuzz_client, payload, type_, message_id, reply_to):
    _server, schema = durable
    error = sql_publish(pg_dsn, schema, "fuzz", payload, type_, message_id, reply_to)
    sentinel = sql_publish(pg_dsn, schema, "fuzz", '"sentinel"')
    assert sentinel is None
    got = []
    while True:
        frame = fuzz_client.ws.recv_json(20)
        if "offset" not in frame:
            continue
        if frame["payload"] == "sentinel" and "type" not in frame:
            break
        got.append(frame)
    if error is not None:
        assert got == [], (error, got)
        return
    assert len(got) == 1, got
    frame = got[0]
    assert frame.get("type", "json") == type_
    assert frame["payload"] == (json.loads(payload) if type_ == "json" else payload)
    if message_id is not None:
        assert frame["id"] == message_id
    if reply_to is not None:
        assert frame["reply_to"] == json.loads(reply_to)


@pytest.fixture(scope="module")
def woken_client(durable) -> Iterator[Client]:
    yield from subscribed_client(durable, "woken")


#: What anyone who can log in may NOTIFY on a log's wake-up channel: any text, and the
#: sequencer's own form with heads and positions no numbering gave.
wake_payloads = st.text(st.characters(blacklist_characters="\x00"), max_size=300) | st.builds(
    lambda channel, head, wal: f"{channel}\t{head}\t{wal}",
    st.sampled_from(["woken", "other", "", "woken\t1"]),
    st.integers(-5, 2**64) | st.text(max_size=5).filter(lambda t: "\x00" not in t),
    st.from_regex(r"[0-9A-F]{1,9}/[0-9A-F]{1,9}", fullmatch=True)
    | st.text(max_size=10).filter(lambda t: "\x00" not in t))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=wake_payloads)
def test_fuzz_a_forged_wake_up_delivers_nothing_and_stalls_nobody(durable, pg_dsn,
                                                                   woken_client, payload):
    _server, schema = durable
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (f"{schema}_log", payload))
    finally:
        conn.close()
    assert sql_publish(pg_dsn, schema, "woken", '"sentinel"') is None
    frame = woken_client.ws.recv_json(20)  # the next frame is the real message, at once
    assert (frame["channel"], frame["payload"]) == ("woken", "sentinel"), frame


def test_a_pooled_publisher_whose_connection_died_idle_publishes_once(pg_dsn, channel):
    """The endpoint's pool: its idle connection's backend is terminated; the next publish
    notices before sending, uses a fresh connection, and the message is in the log once."""
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, workers=1)
    try:
        client = Client(server)
        client.request(action="subscribe", channel=channel, id="s")
        post(server, "/debug/publish", {"channel": channel, "message": 1})
        assert messages(client, 1)[0]["payload"] == 1
        admin = psycopg2.connect(pg_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'pgws_sync publisher'")
            assert cur.rowcount >= 1
        wait_for(lambda: _publishers(admin) == 0, message="the pooled backend gone")
        post(server, "/debug/publish", {"channel": channel, "message": 2, "id": "only-once"})
        assert messages(client, 1)[0]["payload"] == 2
        with admin.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {schema}.messages WHERE id = 'only-once'")
            assert cur.fetchone()[0] == 1
        admin.close()
    finally:
        server.stop()


def _publishers(admin: Any) -> int:
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'pgws_sync publisher'")
        return int(cur.fetchone()[0])


def test_a_durable_endpoint_that_never_decides_who_reads_history_refuses_to_build(pg_dsn):
    listener = Listener(pg_dsn)
    with pytest.raises(ConfigError, match="override can_subscribe .* or pass public=True"):
        PubSub(listener, durable=True)
    with pytest.raises(ConfigError, match="override permit_join .* or pass public=True"):
        Push(listener, durable=True)

    class Decides(PubSub):
        def can_subscribe(self, conn: Any, channel: str) -> bool:
            return channel.startswith("news")

    class Joins(Push):
        def permit_join(self, user: Any, room: str, request: Any) -> bool:
            return user is not None

    for endpoint in (Decides(listener, durable=True), Joins(listener, durable=True),
                     PubSub(listener, durable=True, public=True), PubSub(listener)):
        endpoint.close()


def test_replays_are_limited_per_resume_and_per_connection(pg_dsn, channel):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"max_replay": 5, "replay_budget": 6})
    try:
        publish_many(pg_dsn, schema, ((channel, n) for n in range(1, 11)))
        client = Client(server)
        reply = client.request(action="subscribe", channel=channel, id="a", since=2)
        assert reply["event"] == "resync_required" and reply["offset"] == 10, reply
        assert reply["reason"] == "replay limit: 8 messages to replay, at most 5 per resume"
        client.request(action="unsubscribe", channel=channel, id="u")
        reply = client.request(action="subscribe", channel=channel, id="b", since=6)
        assert reply["event"] == "subscribed"
        assert [f["payload"] for f in messages(client, 4)] == [7, 8, 9, 10]
        client.request(action="unsubscribe", channel=channel, id="u")
        reply = client.request(action="subscribe", channel=channel, id="c", since=7)
        assert reply["event"] == "resync_required", reply
        assert reply["reason"] == ("replay budget: this connection has replayed 4 messages, "
                                   "at most 6")
        other = Client(server)  # the budget is per connection
        assert other.request(action="subscribe", channel=channel, id="d",
                             since=7)["event"] == "subscribed"
    finally:
        server.stop()


def test_publishing_needs_execute_only_and_no_role_writes_around_the_function(pg_dsn, channel):
    """publish() runs with the log owner's rights: a role granted only EXECUTE publishes,
    but cannot read or write the tables; a role granted nothing cannot publish; a worker
    role gets what it needs with migrate(grant=...)."""
    import psycopg2.extensions

    schema = new_log(pg_dsn)
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    roles = ("pgws_pub", "pgws_nobody", "pgws_worker")
    with admin.cursor() as cur:
        for role in roles:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
            cur.execute(f"CREATE ROLE {role} LOGIN")
    done = migrate(admin, schema=schema, grant=["pgws_worker"], grant_publish=["pgws_pub"])
    assert f'GRANT EXECUTE ON FUNCTION "{schema}".publish(text, text, text, text, text) TO ' \
           f'"pgws_pub"' in done
    try:
        def as_role(role: str) -> Any:
            conn = psycopg2.connect(psycopg2.extensions.make_dsn(pg_dsn, user=role))
            conn.autocommit = True
            return conn

        pub = as_role("pgws_pub")
        publish_durable(pub, channel, {"by": "pgws_pub"}, schema=schema)
        for statement in (f"SELECT * FROM {schema}.messages",
                          f"INSERT INTO {schema}.messages (channel, id, type, payload) "
                          f"VALUES ('x', 'i', 'json', '1')",
                          f"UPDATE {schema}.meta SET max_payload = 1"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege), pub.cursor() as cur:
                cur.execute(statement)
        pub.close()
        nobody = as_role("pgws_nobody")
        with pytest.raises(LogUnavailable, match="the role pgws_nobody cannot publish"):
            publish_durable(nobody, channel, {"by": "nobody"}, schema=schema)
        nobody.close()
        worker = as_role("pgws_worker")
        with worker.cursor() as cur:
            from pgws_sync.sources.log import check_rights, sequence

            check_rights(cur, schema)  # raises if a right is missing
            assert [n.numbered for n in sequence(worker, schema)] == [1]
        worker.close()
    finally:
        with admin.cursor() as cur:
            for role in roles:
                cur.execute(f"DROP OWNED BY {role}")
                cur.execute(f"DROP ROLE {role}")
        admin.close()
