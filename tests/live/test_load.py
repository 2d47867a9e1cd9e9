"""Loading a live page: rows and a position in one snapshot, exact across the seam between the
snapshot and offsets numbered after commit; under concurrent writers, with real clients."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Set

import psycopg2
import pytest

from pgws_sync import ConfigError, load_live, watch_table
from pgws_sync.live.load import visible

from ..durable_helpers import new_log, number_all, wait_numbered
from ..helpers import Gunicorn, Ws, wait_for
from .test_watch import new_table


@pytest.fixture
def db(pg_dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


def offsets(db: Any, log: str, channel: str) -> List[Dict[str, Any]]:
    """The channel's numbered messages, each with its offset."""
    with db.cursor() as cur:
        cur.execute(f'SELECT o."offset", m.payload FROM {log}.offsets o JOIN {log}.messages m '
                    f'ON m.seq = o.seq WHERE o.channel = %s ORDER BY o."offset"', (channel,))
        return [dict(json.loads(p), offset=o) for o, p in cur.fetchall()]


def test_rows_and_position(pg_dsn: str, db: Any) -> None:
    log = new_log(pg_dsn)
    table = new_table(db, "id int PRIMARY KEY, at timestamptz, price numeric, tags text[]")
    watch_table(pg_dsn, table, log_schema=log, channel="t")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, '2026-01-02 03:04:05+00', 1.50, '{{a,b}}')")
    number_all(pg_dsn, log)
    conn = psycopg2.connect(pg_dsn)
    loaded = load_live(conn, f"SELECT id, at, price, tags FROM {table} ORDER BY id", "t",
                       log_schema=log)
    conn.close()
    change = offsets(db, log, "t")[0]
    assert loaded.rows == [change["row"]]  # the same JSON as the trigger's, to_jsonb's
    assert loaded.position["offset"] == 1 and loaded.position["key"] == ["id"]
    assert loaded.position["channel"] == "t" and len(loaded.position["epoch"]) == 36
    assert loaded.to_json() == {"rows": loaded.rows, "position": loaded.position}
    conn = psycopg2.connect(pg_dsn)
    nothing = load_live(conn, f"SELECT * FROM {table} WHERE id = %s", "never", (5,),
                        log_schema=log)
    assert nothing.rows == [] and nothing.position["offset"] == 0
    with pytest.raises(ConfigError, match="cannot tell the primary key"):
        load_live(conn, f"SELECT price FROM {table}", "t", log_schema=log)
    aliased = load_live(conn, f"SELECT id AS item, price FROM {table}", "t", log_schema=log)
    assert aliased.position["key"] == ["item"]
    given = load_live(conn, f"SELECT price FROM {table}", "t", key=["price"], log_schema=log)
    assert given.position["key"] == ["price"]
    conn.close()


def test_the_seam_between_the_snapshot_and_offsets_numbered_after_commit(
        pg_dsn: str, db: Any) -> None:
    """A change committed before the snapshot but numbered after it is recognised as already
    in the rows; one running at the snapshot (committed after) is not, and has a larger
    offset than the position."""
    log = new_log(pg_dsn)
    table = new_table(db, "id int PRIMARY KEY, v int")
    watch_table(pg_dsn, table, log_schema=log, channel="t")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    number_all(pg_dsn, log)
    with db.cursor() as cur:  # committed, not numbered: no sequencer runs
        cur.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
    running = psycopg2.connect(pg_dsn)
    with running.cursor() as cur:  # running when the page loads
        cur.execute(f"UPDATE {table} SET v = 1 WHERE id = 2")
    conn = psycopg2.connect(pg_dsn)
    loaded = load_live(conn, f"SELECT * FROM {table} ORDER BY id", "t", log_schema=log)
    conn.close()
    running.commit()
    running.close()
    number_all(pg_dsn, log)
    assert loaded.rows == [{"id": 1, "v": 1}, {"id": 2, "v": 0}]
    assert loaded.position["offset"] == 2
    after = [m for m in offsets(db, log, "t") if m["offset"] > loaded.position["offset"]]
    assert [(m["key"], m["row"]) for m in after] == [({"id": 1}, {"id": 1, "v": 1}),
                                                       ({"id": 2}, {"id": 2, "v": 1})]
    snapshot = loaded.position["snapshot"]
    assert [visible(m["xid"], snapshot) for m in after] == [True, False]
    assert all(visible(m["xid"], snapshot) for m in offsets(db, log, "t")
               if m["offset"] <= loaded.position["offset"])


# ---------------------------------------------------------------- under concurrent writers

WRITERS = 4
CLIENTS = 20
# the issue asks for 30 s; 12 s at about 240 changes/s is ~2,900 changes (PGWS_LIVE_SECONDS=30)
SECONDS = float(os.environ.get("PGWS_LIVE_SECONDS", "12"))


class Writer(threading.Thread):
    """Inserts, updates (v + 1) and deletes rows, one to three changes per transaction."""

    ids = iter(range(1_000_000, 10_000_000))
    lock = threading.Lock()

    def __init__(self, dsn: str, table: str, stop: threading.Event, rate: float) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn, self.table, self.stop, self.rate = dsn, table, stop, rate
        self.changes = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        conn = psycopg2.connect(self.dsn)
        rng = random.Random()
        try:
            while not self.stop.is_set():
                with conn, conn.cursor() as cur:
                    for _ in range(rng.randint(1, 3)):
                        roll = rng.random()
                        if roll < 0.3:
                            with Writer.lock:
                                new = next(Writer.ids)
                            cur.execute(f"INSERT INTO {self.table} VALUES (%s, 0, %s)",
                                        (new, rng.randint(1, 3)))
                        elif roll < 0.9:
                            cur.execute(f"UPDATE {self.table} SET v = v + 1 WHERE id = (SELECT "
                                        f"id FROM {self.table} ORDER BY random() LIMIT 1)")
                        else:
                            cur.execute(f"DELETE FROM {self.table} WHERE id = (SELECT id FROM "
                                        f"{self.table} ORDER BY random() LIMIT 1)")
                        self.changes += cur.rowcount
                time.sleep(rng.expovariate(self.rate))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            conn.close()


class LiveClient(threading.Thread):
    """A page: loads at a random moment, subscribes from the position, applies changes not
    already in its snapshot, reconnects once with since; checks that no row ever goes back to an
    older version (v) and that no deleted row comes back."""

    def __init__(self, server: Gunicorn, table: str, start_in: float, reconnect_in: float) -> None:
        super().__init__(name="live-client", daemon=True)
        self.server, self.table = server, table
        self.start_in, self.reconnect_in = start_in, reconnect_in
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.shown: Dict[int, int] = {}  # key -> newest v shown
        self.deleted: Set[int] = set()
        self.offset = 0
        self.epoch = ""
        self.skipped = 0
        self.applied = 0
        self.stop = threading.Event()
        self.problems: List[str] = []
        self.error: Optional[BaseException] = None

    def show(self, key: int, row: Optional[Dict[str, Any]], op: str = "load") -> None:
        """Every update raises v and ids are never reused: a change applied again, or out of
        order, shows as an update that does not raise v, an insert of a shown row, or a row
        back after its delete."""
        if row is None:
            self.rows.pop(key, None)
            self.deleted.add(key)
            return
        if key in self.deleted:
            self.problems.append(f"row {key} came back after its delete")
        if op == "insert" and key in self.shown:
            self.problems.append(f"row {key} inserted again (v {row['v']})")
        if op == "update" and row["v"] <= self.shown.get(key, -1):
            self.problems.append(f"row {key} went from v {self.shown[key]} to {row['v']}")
        self.shown[key] = max(row["v"], self.shown.get(key, -1))
        self.rows[key] = row

    def subscribe(self) -> Ws:
        ws = Ws(self.server.ws_url())
        ws.client.send(json.dumps({"action": "subscribe", "channel": "items", "id": "s",
                                   "since": self.offset, "epoch": self.epoch}))
        while True:
            frame = ws.recv_json()
            if frame.get("reply_to") == "s":
                assert frame["event"] == "subscribed", frame
                return ws

    def run(self) -> None:
        try:
            time.sleep(self.start_in)
            with urllib.request.urlopen(self.server.url(f"/load?table={self.table}&channel=items"),
                                        timeout=10) as resp:
                loaded = json.loads(resp.read())
            position = loaded["position"]
            self.offset, self.epoch = position["offset"], position["epoch"]
            snapshot = position["snapshot"]
            for row in loaded["rows"]:
                self.show(row["id"], row)
            ws = self.subscribe()
            reconnect_at = time.monotonic() + self.reconnect_in
            while not self.stop.is_set():
                if reconnect_at and time.monotonic() > reconnect_at:
                    ws.close()
                    ws = self.subscribe()
                    reconnect_at = 0.0
                text = ws.client.receive(timeout=0.2)
                if text is None:
                    continue
                frame = json.loads(text)
                if "offset" not in frame or "event" in frame:
                    continue
                if frame["offset"] != self.offset + 1:
                    self.problems.append(f"offset {frame['offset']} after {self.offset}")
                self.offset = frame["offset"]
                change = frame["payload"]
                if visible(change["xid"], snapshot):
                    self.skipped += 1
                    continue
                self.applied += 1
                self.show(change["key"]["id"], change["row"], change["op"])
            ws.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_every_page_equals_the_table_under_concurrent_writers(pg_dsn: str, db: Any) -> None:
    log = new_log(pg_dsn)
    table = new_table(db, "id int PRIMARY KEY, v int NOT NULL, customer int")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} SELECT n, 0, n % 3 + 1 FROM generate_series(1, 200) n")
    watch_table(pg_dsn, table, log_schema=log, channel="items")
    server = Gunicorn("tests.apps.live_app:app", workers=2, threads=32,
                      env={"PGWS_DB_URI": pg_dsn, "PGWS_LOG_SCHEMA": log}).wait_up()
    stop = threading.Event()
    writers = [Writer(pg_dsn, table, stop, rate=200 / WRITERS / 1.6) for _ in range(WRITERS)]
    rng = random.Random(30)
    clients = [LiveClient(server, table, rng.uniform(0, SECONDS * 0.7),
                          rng.uniform(0.5, SECONDS * 0.3)) for _ in range(CLIENTS)]
    try:
        started = time.monotonic()
        for thread in writers + clients:
            thread.start()
        time.sleep(SECONDS)
        stop.set()
        for writer in writers:
            writer.join(10)
        elapsed = time.monotonic() - started
        assert all(w.error is None for w in writers), [w.error for w in writers]
        changes = sum(w.changes for w in writers)
        wait_numbered(pg_dsn, log)
        with db.cursor() as cur:
            cur.execute(f"SELECT head FROM {log}.streams WHERE channel = 'items'")
            head = cur.fetchone()[0]
            cur.execute(f"SELECT id, v, customer FROM {table}")
            table_rows = {i: {"id": i, "v": v, "customer": c} for i, v, c in cur.fetchall()}
        wait_for(lambda: all(c.offset == head or c.error for c in clients), 30,
                 "every client to reach the channel's head")
        for client in clients:
            client.stop.set()
            client.join(10)
        print(f"{changes} changes in {elapsed:.1f} s ({changes / elapsed:.0f}/s); "
              f"skipped at the seam: {[c.skipped for c in clients]}")
        for client in clients:
            assert client.error is None, client.error
            assert client.problems == []
            assert client.rows == table_rows
        assert changes / elapsed > 100
    finally:
        stop.set()
        server.stop()


def test_a_customers_page_follows_its_rows_only(pg_dsn: str, db: Any) -> None:
    log = new_log(pg_dsn)
    table = new_table(db, "id int PRIMARY KEY, v int NOT NULL, customer int")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 0, 7), (2, 0, 8)")
    watch_table(pg_dsn, table, log_schema=log, channel_expr="'orders:' || customer")
    server = Gunicorn("tests.apps.live_app:app", workers=2, threads=16,
                      env={"PGWS_DB_URI": pg_dsn, "PGWS_LOG_SCHEMA": log}).wait_up()
    try:
        with urllib.request.urlopen(server.url(f"/load?table={table}&channel=orders:7"
                                               f"&customer=7"), timeout=10) as resp:
            loaded = json.loads(resp.read())
        assert loaded["rows"] == [{"id": 1, "v": 0, "customer": 7}]
        ws = Ws(server.ws_url())
        ws.client.send(json.dumps({"action": "subscribe", "channel": "orders:7", "id": "s",
                                   "since": loaded["position"]["offset"],
                                   "epoch": loaded["position"]["epoch"]}))
        assert ws.recv_until(lambda f: f.get("reply_to") == "s")["event"] == "subscribed"
        with db.cursor() as cur:
            cur.execute(f"UPDATE {table} SET v = 1 WHERE id = 2")  # customer 8's: not here
            cur.execute(f"UPDATE {table} SET customer = 7 WHERE id = 2")  # moves in
            cur.execute(f"UPDATE {table} SET customer = 8 WHERE id = 1")  # moves out
            cur.execute(f"UPDATE {table} SET v = 2 WHERE id = 1")  # customer 8's now
            cur.execute(f"INSERT INTO {table} VALUES (3, 0, 7)")
        got = [ws.recv_json()["payload"] for _ in range(3)]
        assert [(m["op"], m["key"], m["row"]) for m in got] == [
            ("insert", {"id": 2}, {"id": 2, "v": 1, "customer": 7}),
            ("delete", {"id": 1}, None),
            ("insert", {"id": 3}, {"id": 3, "v": 0, "customer": 7})]
        with db.cursor() as cur:  # a marker: nothing else of customer 7's came before it
            cur.execute(f"INSERT INTO {table} VALUES (4, 0, 7)")
        assert ws.recv_json()["payload"]["key"] == {"id": 4}
        ws.close()
    finally:
        server.stop()


def test_psycopg3_and_sqlalchemy_connections(pg_dsn: str, db: Any) -> None:
    import psycopg
    import sqlalchemy
    from sqlalchemy.orm import Session

    log = new_log(pg_dsn)
    table = new_table(db, "id int PRIMARY KEY, v int")
    watch_table(pg_dsn, table, log_schema=log, channel="t")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 5)")
    number_all(pg_dsn, log)
    with psycopg.connect(pg_dsn) as conn:
        got = load_live(conn, f"SELECT * FROM {table} WHERE v > %s", "t", (1,), key=["id"],
                        log_schema=log)
        assert got.rows == [{"id": 1, "v": 5}] and got.position["offset"] == 1
        with pytest.raises(ConfigError, match="needs key="):
            load_live(conn, f"SELECT * FROM {table}", "t", log_schema=log)
    engine = sqlalchemy.create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg2://"))
    with Session(engine) as session:
        got = load_live(session, f"SELECT * FROM {table}", "t", key=["id"], log_schema=log)
        assert got.rows == [{"id": 1, "v": 5}] and got.position["key"] == ["id"]
    engine.dispose()
