"""Durable reads from a streaming replica: the primary's CPU per message, and commit-to-socket latency.

    python -m bench.replica                    # 3 hosts x 2 workers, with and without
    python -m bench.replica --hosts 1,2,3 --rounds 3 --messages 2000 --rate 200

Starts its own primary (wal_level=replica) and a hot standby made with pg_basebackup
(``tests/pgserver.py``), then for each host count runs that many gunicorn instances
("hosts") of ``--workers`` workers each, serving ``bench.channels_app`` (durable), with
every worker holding subscribers. A publisher commits ``--messages`` messages at ``--rate``
per second; one client thread reads every socket and times each message from the publish's
commit to its arrival. Rounds alternate without and with ``log_read_dsn`` (the standby
streams in both: what the replica costs the primary in WAL sending is in both figures, and
shown apart). Reported per message: the primary's whole CPU (every process of the server,
``primary_cpu``), and in milliseconds that of the log readers' backends (``pgws_sync
streams``), the sequencer, the listeners, the publisher and the WAL sender; rows of the
log's ``messages`` table read on the primary; latency p50 and p99; medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil
import psycopg2

from pgws_sync import publish_durable

from . import servers
from .commit_cost import server_cpu
from .durable import SCHEMA, rows_read, table
from .servers import Gunicorn, worker_pids
from .spread import open_socket, sockets_per_worker
from .wsframes import split_frames

_N = re.compile(rb'"n":\s*(\d+)')


#: The server's processes by what they do for the benchmark (pg_stat_activity's words).
ROLES = ("CASE WHEN backend_type = 'walsender' THEN 'walsender' "
         "WHEN application_name = 'pgws_sync streams' THEN 'readers' "
         "WHEN application_name LIKE 'pgws_sync sequencer%' THEN 'sequencer' "
         "WHEN application_name = 'pgws_sync listener' THEN 'listeners' "
         "WHEN application_name = 'bench publisher' THEN 'publisher' END")
PARTS = ("readers", "sequencer", "listeners", "publisher", "walsender")


def cpu_by_role(dsn: str) -> Dict[str, float]:
    """CPU seconds used so far by the server's processes, summed by :data:`ROLES`."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"SELECT pid, {ROLES} FROM pg_stat_activity")
        pids = cur.fetchall()
    conn.close()
    used = dict.fromkeys(PARTS, 0.0)
    for pid, role in pids:
        if role is not None:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                used[role] += times.user + times.system
    return used


class Reader(threading.Thread):
    """Reads every socket; records, per message number, when each socket got it."""

    def __init__(self, socks: List[socket.socket], want: int) -> None:
        super().__init__(name="bench-replica-reader", daemon=True)
        self.socks = socks
        self.want = want * len(socks)
        self.arrivals: Dict[int, List[float]] = {}
        self.got = 0
        self.done = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        bufs = {}
        for s in self.socks:
            s.setblocking(False)
            bufs[s] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        while not self.stop.is_set() and self.got < self.want:
            for key, _ in sel.select(0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(sock)
                    continue
                now = time.time()
                buf = bufs[sock]
                buf += chunk
                for _first, payload in split_frames(buf):
                    if b'"offset"' in payload and not payload.startswith(b'{"event"'):
                        found = _N.search(payload)
                        if found:
                            self.arrivals.setdefault(int(found.group(1)), []).append(now)
                            self.got += 1
        self.done.set()


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(dsn: str, replica: Optional[str], hosts: int, workers: int, messages: int,
            rate: float) -> Dict[str, Any]:
    servers.fresh_log(dsn, SCHEMA)
    os.environ.update(BENCH_MODE="durable", BENCH_LOG_SCHEMA=SCHEMA,
                      BENCH_LOG_READ_DSN=replica or "")
    gunicorns = [Gunicorn("bench.channels_app:app", dsn, threads=50, worker_connections=100,
                          workers=workers) for _ in range(hosts)]
    socks: List[socket.socket] = []
    try:
        for g in gunicorns:
            g.wait_healthy("/healthz", 60)
            deadline = time.monotonic() + 60
            while len(worker_pids(g.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)  # waiting for gunicorn to fork
            mine = [open_socket(g.port) for _ in range(4 * workers)]
            while min(sockets_per_worker(g).values()) == 0 and len(mine) < 64:
                mine.append(open_socket(g.port))  # until every worker has subscribers
            socks += mine
        time.sleep(1.0)  # the subscriptions are made on the workers' streams threads
        reader = Reader(socks, messages)
        reader.start()
        total = server_cpu(dsn)
        cpu0, parts0 = total(), cpu_by_role(dsn)
        rows0 = rows_read(dsn)
        committed: Dict[int, float] = {}
        conn = psycopg2.connect(dsn, application_name="bench publisher")
        conn.autocommit = True
        t0 = time.monotonic()
        for i in range(messages):
            publish_durable(conn, "bench", {"n": i}, schema=SCHEMA)
            committed[i] = time.time()
            wait = t0 + (i + 1) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the publisher
        reader.done.wait(60)
        reader.stop.set()
        cpu1, parts1 = total(), cpu_by_role(dsn)
        rows1 = rows_read(dsn)
        conn.close()
        lat = sorted(1000 * (t - committed[n]) for n, ts in reader.arrivals.items() for t in ts)
        return {"hosts": hosts, "workers": hosts * workers,
                "reads": "replica" if replica else "primary",
                "delivered": reader.got, "expected": messages * len(socks),
                "primary_cpu_ms_per_msg": 1000 * (cpu1 - cpu0) / messages,
                **{f"{part}_ms": 1000 * (parts1[part] - parts0[part]) / messages
                   for part in PARTS},
                "rows_read_per_msg": (rows1 - rows0) / messages,
                "p50_ms": percentile(lat, 0.5) if lat else float("nan"),
                "p99_ms": percentile(lat, 0.99) if lat else float("nan")}
    finally:
        for s in socks:
            s.close()
        for g in gunicorns:
            g.stop()
            g.remove_log()


def median(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", default="3", help="host counts (gunicorn instances)")
    p.add_argument("--workers", type=int, default=2, help="workers per host")
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--rate", type=float, default=200.0, help="messages per second")
    p.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    p.add_argument("--json", action="store_true", help="print every round as JSON too")
    args = p.parse_args(argv)
    from tests.pgserver import PgServer

    primary = PgServer()
    primary.options = "-c wal_level=replica -c max_wal_senders=4"
    primary.start()
    standby: Optional[Any] = None
    try:
        standby = primary.replica()
        rows: List[Dict[str, Any]] = []
        runs: List[Dict[str, Any]] = []
        for hosts in [int(h) for h in args.hosts.split(",")]:
            figures: Dict[str, List[Dict[str, Any]]] = {"primary": [], "replica": []}
            for _ in range(args.rounds):  # A B A B: the machine's noise hits both alike
                for reads in ("primary", "replica"):
                    run = one_run(primary.dsn, standby.dsn if reads == "replica" else None,
                                  hosts, args.workers, args.messages, args.rate)
                    figures[reads].append(run)
                    runs.append(run)
            for reads, got in figures.items():
                row = dict(got[0])
                for key in ("delivered", "expected"):
                    row[key] = min(r[key] for r in got)
                for key in ("primary_cpu_ms_per_msg", *(f"{part}_ms" for part in PARTS),
                            "rows_read_per_msg", "p50_ms", "p99_ms"):
                    row[key] = round(median([r[key] for r in got]), 3)
                rows.append(row)
            a, b = rows[-2], rows[-1]
            print(f"{hosts} host(s): primary CPU per message with the replica / without: "
                  f"{b['primary_cpu_ms_per_msg'] / a['primary_cpu_ms_per_msg']:.2f} (readers' "
                  f"backends: {b['readers_ms'] / a['readers_ms']:.2f}); "
                  f"p99 with / without: {b['p99_ms'] / a['p99_ms']:.2f}", flush=True)
        print(table(rows))
        if args.json:
            print(json.dumps(runs))
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
