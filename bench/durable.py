"""What durable channels cost: publishing, replaying, and the database's work per worker.

    python -m bench.durable publish   # commits/s with 1, 8, 32 publishers: NOTIFY vs the log
    python -m bench.durable replay    # one client resuming from offset 0 over 100000 messages
    python -m bench.durable scale     # database work per message with 1, 2, 4, 8 workers

Latency at 1000 clients is the fan-out benchmark's: ``python -m bench.fanout --clients 1000
--messages 200 --rate 50 --mode durable`` (and ``--mode pubsub``, the same path without the
log). Starts PostgreSQL unless BENCH_DSN or PGWS_TEST_DSN is set; prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import psycopg2

from pgws_sync import publish, publish_durable

from . import servers
from .servers import Gunicorn, rss_kb, worker_pids
from .spread import open_socket
from .wsframes import client_frame, split_frames

SCHEMA = "pgws_bench_durable"


def fresh_log(dsn: str) -> None:
    """The benchmark's log, empty, and the table of the other answer to commit order."""
    servers.fresh_log(dsn, SCHEMA)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        # For comparison only: a sequence plus the transaction id, read back only below the
        # oldest running transaction (PgQ's way).
        cur.execute("DROP TABLE IF EXISTS bench_snapshot_log")
        cur.execute("CREATE TABLE bench_snapshot_log (id bigserial PRIMARY KEY, channel text, "
                    "xid xid8 NOT NULL DEFAULT pg_current_xact_id(), payload text)")
    conn.close()


# ------------------------------------------------------------------ publish


def _notify(conn: Any, channel: str, body: Dict[str, Any]) -> None:
    publish(conn, channel, body)


def _durable(conn: Any, channel: str, body: Dict[str, Any]) -> None:
    publish_durable(conn, channel, body, schema=SCHEMA)


def _snapshot(conn: Any, channel: str, body: Dict[str, Any]) -> None:
    with conn.cursor() as cur:
        cur.execute("INSERT INTO bench_snapshot_log (channel, payload) VALUES (%s, %s); "
                    "SELECT pg_notify('bench_wake', %s)", (channel, json.dumps(body), channel))


PUBLISHERS: Dict[str, Callable[[Any, str, Dict[str, Any]], None]] = {
    "notify": _notify, "durable": _durable, "snapshot": _snapshot}


def commits_per_s(dsn: str, how: str, publishers: int, channels: int, seconds: float) -> float:
    """Transactions of one publish each, committed per second by ``publishers`` threads."""
    stop = threading.Event()
    counts = [0] * publishers
    conns = [psycopg2.connect(dsn) for _ in range(publishers)]
    fn = PUBLISHERS[how]

    def run(i: int) -> None:
        rng = random.Random(i)
        conn = conns[i]
        while not stop.is_set():
            fn(conn, f"c{rng.randrange(channels)}", {"n": counts[i]})
            conn.commit()
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,), name=f"bench-publisher-{i}")
               for i in range(publishers)]
    for t in threads:
        t.start()
    time.sleep(seconds)  # the measuring window
    stop.set()
    for t in threads:
        t.join()
    for conn in conns:
        conn.close()
    return sum(counts) / seconds


def bench_publish(dsn: str, seconds: float, rounds: int) -> List[Dict[str, Any]]:
    fresh_log(dsn)
    rows = []
    for channels in (1, 32):
        for publishers in (1, 8, 32):
            figures: Dict[str, List[float]] = {how: [] for how in PUBLISHERS}
            for _ in range(rounds):  # A B C A B C: the machine's noise hits each alike
                for how in PUBLISHERS:
                    figures[how].append(commits_per_s(dsn, how, publishers, channels, seconds))
            row = {"channels": channels, "publishers": publishers}
            for how, values in figures.items():
                row[how] = round(sorted(values)[len(values) // 2])
            row["durable/notify"] = round(row["durable"] / row["notify"], 2)
            row["snapshot/notify"] = round(row["snapshot"] / row["notify"], 2)
            rows.append(row)
    return rows


# ------------------------------------------------------------------ replay


def read_messages(sock: socket.socket, want: int, on_progress: Callable[[], None]) -> int:
    buf = bytearray()
    got = 0
    last = 0
    sock.settimeout(30)
    while got < want:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError(f"the server closed the socket after {got} messages")
        buf += chunk
        for _first, payload in split_frames(buf):
            if b'"offset"' in payload and not payload.startswith(b'{"event"'):
                got += 1
        if got - last >= 5000:
            last = got
            on_progress()
    return got


def bench_replay(dsn: str, messages: int) -> Dict[str, Any]:
    fresh_log(dsn)
    os.environ.update(BENCH_MODE="durable", BENCH_LOG_SCHEMA=SCHEMA)
    server = Gunicorn("bench.channels_app:app", dsn, threads=50, worker_connections=100)
    try:
        server.wait_healthy("/healthz", 60)
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            started = time.monotonic()
            cur.execute(f"SELECT count({SCHEMA}.publish('replay', json_build_object('n', i, "
                        f"'text', 'a message of about a hundred bytes, as a chat line or a "
                        f"row change would be')::text)) FROM generate_series(1, %s) AS i",
                        (messages,))
            publish_s = time.monotonic() - started
        conn.close()
        worker = worker_pids(server.pid)[0]
        before = rss_kb(worker) or 0
        peak = [before]
        sock = open_socket(server.port)
        sock.sendall(client_frame(1, json.dumps({"action": "subscribe", "channel": "replay",
                                                 "since": 0}).encode()))
        started = time.monotonic()
        read_messages(sock, messages, lambda: peak.__setitem__(0, max(peak[0],
                                                                       rss_kb(worker) or 0)))
        took = time.monotonic() - started
        sock.close()
        return {"messages": messages, "publish_in_one_transaction_s": round(publish_s, 2),
                "replay_s": round(took, 2), "replay_per_s": round(messages / took),
                "worker_rss_kb_before": before, "worker_rss_kb_peak": peak[0],
                "growth_kb": peak[0] - before}
    finally:
        server.stop()
        server.remove_log()


# ------------------------------------------------------------------ scale


def backend_cpu_s(dsn: str) -> Tuple[float, int]:
    """CPU seconds of the log readers' PostgreSQL backends (this machine's server), and how many."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = "
                    "'pgws_sync streams'")
        pids = [pid for pid, in cur.fetchall()]
    conn.close()
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total, len(pids)


def rows_read(dsn: str, schema: str = SCHEMA) -> int:
    """Rows read from the log's messages table so far (index fetches and sequential reads)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
        cur.execute("SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) FROM "
                    "pg_stat_user_tables WHERE schemaname = %s AND relname = 'messages'",
                    (schema,))
        row = cur.fetchone()
    conn.close()
    return int(row[0]) if row else 0


def bench_scale(dsn: str, workers_list: Sequence[int], channels_list: Sequence[int],
                messages: int, rate: float) -> List[Dict[str, Any]]:
    rows = []
    for channels in channels_list:
        for workers in workers_list:
            fresh_log(dsn)
            os.environ.update(BENCH_MODE="durable", BENCH_LOG_SCHEMA=SCHEMA,
                              BENCH_CHANNELS=str(channels))
            server = Gunicorn("bench.channels_app:app", dsn, threads=100,
                              worker_connections=200, workers=workers)
            socks: List[socket.socket] = []
            try:
                server.wait_healthy("/healthz", 60)
                socks = [open_socket(server.port) for _ in range(max(16, 8 * workers))]
                cpu0, readers = backend_cpu_s(dsn)
                read0 = rows_read(dsn)
                conn = psycopg2.connect(dsn)
                conn.autocommit = True
                t0 = time.monotonic()
                for i in range(messages):
                    publish_durable(conn, f"bench{i % channels}" if channels > 1 else "bench",
                                    {"n": i}, schema=SCHEMA)
                    wait = t0 + (i + 1) / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)  # pacing the publisher
                conn.close()
                time.sleep(1.0)  # let the readers finish the last wake-ups
                cpu1, _ = backend_cpu_s(dsn)
                read1 = rows_read(dsn)
                rows.append({"workers": workers, "channels": channels,
                             "log_readers": readers,
                             "rows_read_per_message": round((read1 - read0) / messages, 2),
                             "reader_backend_cpu_ms_per_message":
                                 round(1000 * (cpu1 - cpu0) / messages, 3)})
            finally:
                for s in socks:
                    s.close()
                server.stop()
                server.remove_log()
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["publish", "replay", "scale"])
    p.add_argument("--seconds", type=float, default=3.0, help="publish: window per figure")
    p.add_argument("--rounds", type=int, default=3, help="publish: rounds (median reported)")
    p.add_argument("--messages", type=int, default=None,
                   help="replay: messages (default 100000); scale: messages (default 2000)")
    p.add_argument("--rate", type=float, default=200.0, help="scale: messages per second")
    p.add_argument("--workers", default="1,2,4,8", help="scale: worker counts")
    p.add_argument("--channels", default="1,100", help="scale: channel counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    with servers.database() as dsn:
        if args.what == "publish":
            rows = bench_publish(dsn, args.seconds, args.rounds)
        elif args.what == "replay":
            rows = [bench_replay(dsn, args.messages or 100_000)]
        else:
            rows = bench_scale(dsn, [int(w) for w in args.workers.split(",")],
                               [int(c) for c in args.channels.split(",")],
                               args.messages or 2000, args.rate)
    print(json.dumps(rows) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
