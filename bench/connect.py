"""Connect time against its floor: the gateway beside gunicorn answering a bare 101.

    python -m bench.connect --clients 1000 --workers 1 2 --rounds 5

Each round starts ``pgws-sync serve`` (the ready-made gateway) and gunicorn serving
``bench.bare_upgrade:app`` with the same settings (the library's gunicorn hook, the
same workers, threads and worker connections), one after the other in alternating
order, opens ``--clients`` sockets to each from the benchmark's client processes and
times it. The gateway's time over the floor's is the library's share of connecting.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from . import servers
from .clients import raise_fd_limit
from .fanout import CLIENTS_PER_PROC, ClientProc, run_main, split

#: The servers compared, in the order of even rounds (odd rounds reverse it).
SERVERS = ("gateway", "bare")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.connect",
        description="Time opening N sockets to the gateway (pgws-sync serve) and to gunicorn "
                    "answering a bare 101 under the same settings, interleaved, in rounds.")
    p.add_argument("--clients", type=int, default=1000, help="sockets per run (default 1000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="gunicorn workers, one set of runs each (default: 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each server (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per worker (default clients * 1.15 + 100, as bench.fanout)")
    p.add_argument("--procs", type=int, default=None,
                   help=f"client processes (default one per {CLIENTS_PER_PROC} clients, "
                        f"at most the number of CPUs)")
    p.add_argument("--batch", type=int, default=100,
                   help="handshakes in flight at a time per client process (default 100)")
    p.add_argument("--dsn", default=None,
                   help="database (default: BENCH_DSN, PGWS_TEST_DSN, else an embedded server)")
    p.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds to wait for a server to answer /healthz (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or min(args.workers) < 1:
        p.error("--clients, --rounds and --workers must be at least 1")
    if args.procs is None:
        args.procs = max(1, min(os.cpu_count() or 1, math.ceil(args.clients / CLIENTS_PER_PROC)))
    args.procs = max(1, min(args.procs, args.clients))
    if args.threads is None:
        args.threads = args.clients * 115 // 100 + 100
    return args


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of the process tree."""
    total = 0
    for proc in servers.tree(pid):
        try:
            tasks = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{proc.pid}/task/{task}/status") as f:
                    for line in f:
                        if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                            total += int(line.split()[-1])
            except (OSError, ValueError):
                continue
    return total


def start(kind: str, dsn: str, workers: int, threads: int) -> servers.Gunicorn:
    """One server under test, not yet healthy."""
    if kind == "gateway":
        return servers.GatewayServe(dsn, threads=threads, workers=workers)
    from pgws_sync.cli import serve_worker_connections

    return servers.Gunicorn("bench.bare_upgrade:app", dsn, threads=threads, workers=workers,
                            worker_connections=serve_worker_connections(threads))


def one_run(kind: str, dsn: str, workers: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Start ``kind``, open the sockets, measure, stop it."""
    server = start(kind, dsn, workers, args.threads)
    procs: List[ClientProc] = []
    tmp = tempfile.mkdtemp(prefix="pgws-bench-connect-")
    client_args = argparse.Namespace(messages=0, batch=args.batch, connect_timeout=30.0,
                                     connect_phase=300.0, deflate=False)
    try:
        server.wait_healthy("/healthz", args.start_timeout)
        if not servers.wait_workers_idle(server.pid, workers):
            print(f"bench: {kind}'s workers were still busy after 30 s; timing anyway",
                  file=sys.stderr)
        cpu0, switches0 = servers.cpu_s(server.pid) or 0.0, context_switches(server.pid)
        for i, count in enumerate(split(args.clients, args.procs)):
            procs.append(ClientProc(server.url("/ws"), count, client_args,
                                    os.path.join(tmp, f"lat-{i}.bin")))
        connected = [p.expect("connected", 360.0) for p in procs]
        cpu1, switches1 = servers.cpu_s(server.pid) or 0.0, context_switches(server.pid)
    finally:
        for p in procs:
            p.stop()
            with contextlib.suppress(OSError):
                os.unlink(p.latfile)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
        server.stop()
    opened = sum(c["opened"] for c in connected)
    failed = sum(c["failed"] for c in connected)
    if failed:
        print(f"bench: {failed} of {args.clients} sockets to {kind} failed; its log is "
              f"{server.log_path}", file=sys.stderr)
    else:
        server.remove_log()
    return {
        "server": kind, "workers": workers, "opened": opened, "failed": failed,
        "connect_s": round(max(c["t1"] for c in connected) - min(c["t0"] for c in connected), 3),
        "cpu_ms_per_socket": round(1000 * (cpu1 - cpu0) / max(1, opened), 3),
        "switches_per_socket": round((switches1 - switches0) / max(1, opened), 1),
    }


def summary(runs: List[Dict[str, Any]], workers: int) -> Dict[str, Any]:
    """Medians per server and the gateway's time over the floor's, for ``workers``."""
    mine = [r for r in runs if r["workers"] == workers]
    by: Dict[str, List[Dict[str, Any]]] = {k: [r for r in mine if r["server"] == k] for k in SERVERS}
    out: Dict[str, Any] = {"workers": workers}
    for kind, rs in by.items():
        out[kind] = {field: statistics.median(r[field] for r in rs)
                     for field in ("connect_s", "cpu_ms_per_socket", "switches_per_socket")}
        out[kind]["connect_s_all"] = [r["connect_s"] for r in rs]
    pairs = [g["connect_s"] / b["connect_s"] for g, b in zip(by["gateway"], by["bare"])
             if b["connect_s"] > 0]
    out["ratio_of_medians"] = round(out["gateway"]["connect_s"] / out["bare"]["connect_s"], 3)
    out["ratio_per_round"] = [round(x, 3) for x in pairs]
    out["ratio_median"] = round(statistics.median(pairs), 3) if pairs else None
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    raise_fd_limit()
    os.environ.setdefault("PGWS_DRAIN_SECONDS", "0")  # stop each server at once
    runs: List[Dict[str, Any]] = []
    with servers.database(args.dsn) as dsn:
        for rnd in range(args.rounds):
            for workers in args.workers:
                order = SERVERS if rnd % 2 == 0 else SERVERS[::-1]
                for kind in order:
                    runs.append(one_run(kind, dsn, workers, args))
    return {"clients": args.clients, "rounds": args.rounds, "threads": args.threads,
            "procs": args.procs, "runs": runs,
            "summary": [summary(runs, w) for w in args.workers]}


def table(result: Dict[str, Any]) -> str:
    lines = [f"{result['clients']} sockets, {result['rounds']} rounds, "
             f"{result['threads']} threads per worker; medians",
             f"{'workers':>7}  {'server':<8} {'connect s':>9} {'CPU ms/socket':>13} "
             f"{'switches/socket':>15}  all runs (s)"]
    for s in result["summary"]:
        for kind in SERVERS:
            k = s[kind]
            lines.append(f"{s['workers']:>7}  {kind:<8} {k['connect_s']:>9.3f} "
                         f"{k['cpu_ms_per_socket']:>13.3f} {k['switches_per_socket']:>15.1f}  "
                         + " ".join(f"{x:.3f}" for x in k["connect_s_all"]))
        lines.append(f"{s['workers']:>7}  gateway / bare: {s['ratio_of_medians']:.2f} "
                     f"(per round {', '.join(f'{x:.2f}' for x in s['ratio_per_round'])})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
