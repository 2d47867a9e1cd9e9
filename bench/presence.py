"""What presence costs with many members on one channel: the database's time and CPU per join,
per heartbeat interval and per presence query, and the time a real server takes to answer
``{"action": "presence"}``.

    python -m bench.presence --members 5000

Members are written by a presence store in this process (as one more worker would), so no
sockets are needed for them; the server under test answers a client's presence request
from the same table. Database CPU is read from the backend process (a local server only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import psutil
import psycopg2

from pgws_sync.sources.presence import PresenceStore, _tables, setup

from .servers import Gunicorn, database

SCHEMA = "pgws_sync"
SCOPE = "pgws_sync:control"  # the default control channel of a PubSub


def backend_cpu(conn: Any) -> Callable[[], float]:
    """A function reading the CPU seconds of ``conn``'s backend (0 if it is not local)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    try:
        proc = psutil.Process(pid)
        proc.cpu_times()
    except (psutil.Error, OSError):
        return lambda: 0.0
    return lambda: sum(proc.cpu_times()[:2])


def measure(conn: Any, rounds: int, step: Callable[[Any], None]) -> Dict[str, float]:
    """Median wall ms and mean backend CPU ms of ``step(cursor)`` over ``rounds``."""
    cpu = backend_cpu(conn)
    walls: List[float] = []
    start_cpu = cpu()
    with conn.cursor() as cur:
        for _ in range(rounds):
            t = time.perf_counter()
            step(cur)
            walls.append((time.perf_counter() - t) * 1000)
    return {"wall_ms_median": round(statistics.median(walls), 3),
            "db_cpu_ms_mean": round((cpu() - start_cpu) * 1000 / rounds, 3)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=5000)
    p.add_argument("--dsn", default=None)
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args(argv)
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    result: Dict[str, Any] = {"members": args.members}
    with database(args.dsn) as dsn:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        setup(conn, SCHEMA)
        store = PresenceStore(dsn, schema=SCHEMA, scope=SCOPE, timeout=30.0)
        store.start()
        t = time.perf_counter()
        for i in range(args.members):
            store.join(channel, f"member-{i}", {"user": f"user-{i}"})
        done = threading.Event()
        store.query(channel, 1, lambda a: done.set())  # answered after every join is written
        done.wait(300)
        result["bulk_join_s"] = round(time.perf_counter() - t, 3)
        t_ = _tables(SCHEMA)
        worker = store.worker
        n = [0]

        def one_join(cur: Any) -> None:  # what a lone join costs: a transaction of its own
            n[0] += 1
            cur.execute("BEGIN")
            cur.execute(t_["any_leaving"], (SCOPE, [channel]))  # any drained member to replace?
            cur.execute(t_["join"], (SCOPE, worker, [channel], [f"extra-{n[0]}"], ['{}']))
            cur.execute(t_["counts"], (SCOPE, [channel]))
            cur.execute("SELECT pg_notify(%s, %s)", (SCOPE, json.dumps(
                {"op": "presence", "channel": channel, "joins": [], "leaves": [], "count": 0})))
            cur.execute("COMMIT")

        def heartbeat(cur: Any) -> None:  # one interval of one worker: beat, then expiry
            cur.execute("BEGIN")
            cur.execute(t_["beat"], (worker,))
            cur.execute("COMMIT")
            cur.execute("BEGIN")
            cur.execute(t_["expire"], (30.0,))
            cur.execute(t_["orphans"])
            cur.execute("COMMIT")

        def query(cur: Any) -> None:
            cur.execute(t_["count"], (SCOPE, channel))
            cur.fetchone()
            cur.execute(t_["members"], (SCOPE, channel, 1000))
            cur.fetchall()

        result["join"] = measure(conn, args.rounds, one_join)
        result["heartbeat_interval"] = measure(conn, args.rounds, heartbeat)
        result["query_1000_of_n"] = measure(conn, args.rounds, query)
        server = Gunicorn("bench.presence_app:app", dsn, threads=20, worker_connections=40)
        try:
            server.wait_healthy("/healthz", 30.0)
            result["server_presence_ms"] = ask_server(server, channel, args.rounds)
        finally:
            server.stop()
            server.remove_log()
            store.stop(30.0)
            conn.close()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def ask_server(server: Gunicorn, channel: str, rounds: int) -> Dict[str, Any]:
    import simple_websocket

    ws = simple_websocket.Client.connect(server.url("/ws"))
    try:
        walls: List[float] = []
        reply: Dict[str, Any] = {}
        for i in range(rounds):
            t = time.perf_counter()
            ws.send(json.dumps({"action": "presence", "channel": channel, "id": i}))
            while True:
                reply = json.loads(ws.receive(timeout=30))
                if reply.get("reply_to") == i:
                    break
            walls.append((time.perf_counter() - t) * 1000)
        return {"wall_ms_median": round(statistics.median(walls), 2),
                "count": reply.get("count"), "members_listed": len(reply.get("members", [])),
                "reply_bytes": len(json.dumps(reply))}
    finally:
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
