"""What watching a table costs its writers (pgbench against a real PostgreSQL).

The same write with and without the live-table trigger (``pgws_sync.watch_table``): a
one-row UPDATE per transaction at 1 and 8 clients (commits per second, and the database's
CPU per commit, the sequencer's numbering included), then one statement touching 100,000
rows (INSERT, UPDATE, DELETE) and how long the sequencer takes to number what it published;
then the time from commit to delivery at 200 changes/s (gunicorn serving the test suite's
live-table app, one WebSocket client).

    python -m bench.live_tables [--dsn DSN] [--seconds 5] [--rounds 3]

Without --dsn (or BENCH_DSN) it starts a throw-away PostgreSQL with fsync on. It prints
figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import psycopg2

from bench.commit_cost import SCHEMA, durable_database, run_pgbench, sequencing, server_cpu

ROWS = 1000
BIG = 100_000
UPDATE_ONE = ("\\set k random(1, 1000)\n"
              "UPDATE items SET price = price + 1, updated_at = now() WHERE id = :k;\n")


def prepare(dsn: str) -> None:
    from pgws_sync import migrate

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cur.execute("DROP TABLE IF EXISTS items, big")
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, customer int, name text, "
                    "price numeric(10, 2), updated_at timestamptz)")
        cur.execute("INSERT INTO items SELECT g, g % 50, 'item ' || g, 1, now() "
                    f"FROM generate_series(1, {ROWS}) g")
        cur.execute("CREATE TABLE big (id int PRIMARY KEY, customer int, name text, "
                    "price numeric(10, 2))")
    migrate(conn, schema=SCHEMA)
    conn.close()


def watched(dsn: str, table: str, on: bool) -> None:
    from pgws_sync import unwatch_table, watch_table

    if on:
        watch_table(dsn, table, log_schema=SCHEMA, channel_expr="'orders:' || customer")
    else:
        unwatch_table(dsn, table)


def wait_numbered(dsn: str, timeout: float = 300.0) -> float:
    """Seconds until the sequencer has numbered everything committed."""
    started = time.monotonic()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            while time.monotonic() - started < timeout:
                cur.execute(f"SELECT count(*) FROM {SCHEMA}.messages WHERE seq > "
                            f"(SELECT numbered_upto FROM {SCHEMA}.meta)")
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
    finally:
        conn.close()
    return time.monotonic() - started


def one_row_writes(dsn: str, seconds: float, rounds: int, workdir: Path) -> None:
    cpu = server_cpu(dsn)
    print("one-row UPDATE per transaction (pgbench), median of interleaved rounds:")
    print("| clients | without trigger: commits/s | with: commits/s | ratio | "
          "CPU µs/commit without | with |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients in (1, 8):
        tps: Dict[bool, List[float]] = {False: [], True: []}
        per: Dict[bool, List[float]] = {False: [], True: []}
        for _ in range(rounds):
            for on in (False, True):
                watched(dsn, "items", on)
                before = cpu()
                rate = run_pgbench(dsn, UPDATE_ONE, clients, seconds, workdir)
                wait_numbered(dsn)
                used = cpu() - before
                tps[on].append(rate)
                per[on].append(used / (rate * seconds) * 1e6)
        off, on_ = statistics.median(tps[False]), statistics.median(tps[True])
        print(f"| {clients} | {off:,.0f} | {on_:,.0f} | {on_ / off:.2f} | "
              f"{statistics.median(per[False]):.0f} | {statistics.median(per[True]):.0f} |")


def big_statements(dsn: str) -> None:
    print(f"\none statement of {BIG:,} rows (seconds; numbered: until the sequencer has "
          f"numbered its {BIG:,} messages):")
    print("| statement | without trigger | with | per row with (µs) | numbered |")
    print("|---|---:|---:|---:|---:|")
    statements = {
        "INSERT": f"INSERT INTO big SELECT g, g % 50, 'item ' || g, 1 "
                  f"FROM generate_series(1, {BIG}) g",
        "UPDATE": "UPDATE big SET price = price + 1",
        "DELETE": "DELETE FROM big",
    }
    timings: Dict[bool, Dict[str, float]] = {False: {}, True: {}}
    numbering: Dict[str, float] = {}
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        for on in (False, True):
            watched(dsn, "big", on)
            for name, statement in statements.items():
                with conn.cursor() as cur:
                    started = time.monotonic()
                    cur.execute(statement)
                    timings[on][name] = time.monotonic() - started
                if on:
                    numbering[name] = wait_numbered(dsn)
    finally:
        conn.close()
    for name in statements:
        off, on_ = timings[False][name], timings[True][name]
        print(f"| {name} | {off:.2f} | {on_:.2f} | {(on_ - off) / BIG * 1e6:.1f} | "
              f"{numbering[name]:.1f} |")


def latency(dsn: str, rate: float, seconds: float) -> None:
    """Commit to delivery at ``rate`` changes/s: gunicorn (two workers) serving a durable
    endpoint, one WebSocket client following the watched table's channel."""
    import json
    import threading

    from tests.helpers import Gunicorn, Ws

    from pgws_sync import watch_table

    watch_table(dsn, "items", log_schema=SCHEMA, channel="items")
    server = Gunicorn("tests.apps.live_app:app", workers=2, threads=16,
                      env={"PGWS_DB_URI": dsn, "PGWS_LOG_SCHEMA": SCHEMA}).wait_up()
    committed: Dict[int, float] = {}
    received: Dict[int, float] = {}
    stop = threading.Event()
    try:
        ws = Ws(server.ws_url())
        ws.client.send(json.dumps({"action": "subscribe", "channel": "items", "id": "s"}))
        ws.recv_until(lambda f: f.get("reply_to") == "s")

        def read() -> None:
            while not stop.is_set():
                text = ws.client.receive(timeout=0.5)
                if text is not None:
                    frame = json.loads(text)
                    if "offset" in frame:
                        received[frame["payload"]["xid"]] = time.monotonic()

        reader = threading.Thread(target=read, name="reader", daemon=True)
        reader.start()
        conn = psycopg2.connect(dsn)
        n = 0
        started = time.monotonic()
        with conn.cursor() as cur:
            while time.monotonic() - started < seconds:
                n += 1
                cur.execute("UPDATE items SET price = price + 1 WHERE id = %s", (n % ROWS + 1,))
                cur.execute("SELECT pg_current_xact_id()::text::bigint")
                xid = cur.fetchone()[0]
                conn.commit()
                committed[xid] = time.monotonic()
                time.sleep(max(0.0, started + n / rate - time.monotonic()))
        conn.close()
        deadline = time.monotonic() + 10
        while len(received) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        reader.join(2)
        ws.close()
    finally:
        server.stop()
    delays = sorted((received[x] - t) * 1000 for x, t in committed.items() if x in received)
    if not delays:
        print("\nno change was delivered")
        return
    def pct(p: float) -> float:
        return delays[min(len(delays) - 1, int(p * len(delays)))]
    print(f"\ncommit to delivery at {len(committed) / seconds:.0f} changes/s for {seconds:g} s "
          f"(one client, gunicorn with two workers; ms):")
    print("| delivered | p50 | p95 | p99 | max |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(delays)} of {len(committed)} | {pct(0.5):.1f} | {pct(0.95):.1f} | "
          f"{pct(0.99):.1f} | {delays[-1]:.1f} |")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live_tables", description=__doc__)
    parser.add_argument("--dsn")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="changes/s in the latency run")
    args = parser.parse_args(argv)
    with durable_database(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        prepare(dsn)
        with sequencing(dsn):
            one_row_writes(dsn, args.seconds, args.rounds, Path(tmp))
            big_statements(dsn)
        latency(dsn, args.rate, max(args.seconds * 2, 5.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
