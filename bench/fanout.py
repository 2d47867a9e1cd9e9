"""The fan-out benchmark: N WebSocket clients, M notifications, and what it cost the server.

    python -m bench.fanout --clients 1000 --messages 200 --rate 50
    python -m bench.fanout --clients 10000 --rate 1 --duration 60

Starts PostgreSQL (unless BENCH_DSN or PGWS_TEST_DSN is set) and gunicorn
with one worker serving examples.minimal:app (unless --url is given), opens
the clients from separate processes, publishes with pg_notify from one
connection, and prints a table (or one JSON line with --json).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import psycopg2

from . import servers
from .clients import raise_fd_limit
from .servers import ROOT, StartError

#: Client sockets per client process that the default --procs aims at.
CLIENTS_PER_PROC = 500

#: What --mode publishes with; pubsub and durable are served by bench.channels_app.
MODES = ("pgws", "pubsub", "durable")
#: The durable log's schema in --mode durable (created fresh for each run).
BENCH_LOG_SCHEMA = "pgws_bench_log"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description="Fan-out benchmark for pgws_sync: N clients, M notifications, "
                    "deliveries/s, latency, loss, server memory and CPU.")
    p.add_argument("--clients", type=int, default=100, help="WebSocket clients (default 100)")
    p.add_argument("--messages", type=int, default=100,
                   help="notifications to publish (default 100; see --duration)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="notifications per second; 0 = as fast as possible (default)")
    p.add_argument("--duration", type=float, default=None,
                   help="publish for this many seconds at --rate (sets --messages)")
    p.add_argument("--pad", type=int, default=0, help="extra payload bytes per notification")
    p.add_argument("--deflate", action="store_true",
                   help="offer permessage-deflate like a browser does")
    p.add_argument("--procs", type=int, default=None,
                   help=f"client processes (default: one per {CLIENTS_PER_PROC} clients, "
                        f"at most the number of CPUs)")
    p.add_argument("--batch", type=int, default=100,
                   help="handshakes in flight at a time per client process (default 100)")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds to wait for deliveries after the last publish (default 10)")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds a client may wait for its handshake answer (default 30)")
    p.add_argument("--connect-phase", type=float, default=300.0,
                   help="seconds for opening all clients; those not open by then count as "
                        "failed (default 300)")
    p.add_argument("--channel", default="pgws", help="NOTIFY channel (default pgws)")
    p.add_argument("--mode", choices=MODES, default="pgws",
                   help="pgws: pg_notify in pgws's format to examples.minimal (default); "
                        "pubsub: pgws_sync.publish() to a PubSub channel; durable: "
                        "pgws_sync.publish_durable() to a durable channel (both served by "
                        "bench.channels_app, every socket subscribed to channel 'bench')")
    p.add_argument("--audience", default="default", help="audience in the payload (default default)")
    p.add_argument("--dsn", default=None,
                   help="database (default: BENCH_DSN, PGWS_TEST_DSN, else an embedded server)")
    server = p.add_argument_group("server under test")
    server.add_argument("--url", default=None,
                        help="benchmark a running server at this ws:// URL instead of starting one")
    server.add_argument("--server-pid", type=int, default=None,
                        help="with --url: the server's pid, for memory, CPU and threads "
                             "(its whole process tree)")
    server.add_argument("--app", default="examples.minimal:app",
                        help="WSGI app gunicorn serves (default examples.minimal:app)")
    server.add_argument("--path", default="/ws", help="WebSocket path (default /ws)")
    server.add_argument("--health-path", default="/healthz",
                        help="waited on for 200 before connecting (default /healthz)")
    server.add_argument("--threads", type=int, default=None, help="gunicorn --threads "
                        "(default clients + 100)")
    server.add_argument("--worker-connections", type=int, default=None,
                        help="gunicorn --worker-connections (default 2 * clients + 200)")
    server.add_argument("--gunicorn-args", default="",
                        help="more gunicorn arguments, one shell-quoted string")
    server.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds to wait for the server to become healthy (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    if args.duration is not None:
        if args.rate <= 0:
            p.error("--duration needs --rate")
        args.messages = max(1, round(args.duration * args.rate))
    if args.clients < 1 or args.messages < 1:
        p.error("--clients and --messages must be at least 1")
    if args.procs is None:
        args.procs = max(1, min(os.cpu_count() or 1, math.ceil(args.clients / CLIENTS_PER_PROC)))
    args.procs = max(1, min(args.procs, args.clients))
    return args


# ------------------------------------------------------------------ client processes

class ClientProc:
    """One ``python -m bench.clients`` process and the JSON lines it prints."""

    def __init__(self, url: str, count: int, args: argparse.Namespace, latfile: str) -> None:
        cmd = [sys.executable, "-m", "bench.clients", "--url", url, "--count", str(count),
               "--messages", str(args.messages), "--batch", str(args.batch),
               "--connect-timeout", str(args.connect_timeout),
               "--connect-phase", str(args.connect_phase), "--latfile", latfile]
        if args.deflate:
            cmd.append("--deflate")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.latfile = latfile
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.reader = threading.Thread(target=self._read, name=f"bench-client-{self.proc.pid}",
                                       daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"ev": "error", "error": f"bad line: {line.strip()!r}"})
        self.events.put({"ev": "exit"})

    def expect(self, event: str, timeout: float) -> Dict[str, Any]:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise StartError(f"client process {self.proc.pid} sent no {event!r} "
                             f"within {timeout:g}s") from None
        if got.get("ev") != event:
            if got.get("ev") == "exit":
                raise StartError(f"client process {self.proc.pid} exited with "
                                 f"{self.proc.wait()} before {event!r}")
            raise StartError(f"client process {self.proc.pid}: {got.get('error', got)}")
        return got

    def send(self, command: Dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def cpu_s(self) -> float:
        return servers.cpu_s(self.proc.pid) or 0.0

    def stop(self, timeout: float = 30.0) -> None:
        self.send({"cmd": "close"})
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def latencies(self) -> "array.array[float]":
        lat = array.array("d")
        try:
            with open(self.latfile, "rb") as f:
                lat.frombytes(f.read())
        except OSError:
            pass
        return lat


def split(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------ publishing

def publish(dsn: str, args: argparse.Namespace) -> float:
    """Issue the notifications from one connection; return when the last call returned."""
    from pgws_sync import publish as publish_pubsub
    from pgws_sync import publish_durable

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    pad = "x" * args.pad
    try:
        with conn.cursor() as cur:
            t0 = time.time()
            for i in range(args.messages):
                body: Dict[str, Any] = {"seq": i, "t": time.time()}
                if args.pad:
                    body["pad"] = pad
                if args.mode == "durable":
                    publish_durable(conn, "bench", body, schema=BENCH_LOG_SCHEMA)
                elif args.mode == "pubsub":
                    publish_pubsub(conn, "bench", body)
                else:
                    cur.execute("SELECT pg_notify(%s, %s)",
                                (args.channel, f"{args.audience},{json.dumps(body)}"))
                if args.rate > 0:
                    wait = t0 + (i + 1) / args.rate - time.time()
                    if wait > 0:
                        time.sleep(wait)  # pacing the publisher, not waiting on a condition
    finally:
        conn.close()
    return t0


def percentile(ordered: Sequence[float], q: float) -> Optional[float]:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


# ------------------------------------------------------------------ the run

def run(args: argparse.Namespace) -> Dict[str, Any]:
    fd_limit = raise_fd_limit()  # inherited by gunicorn and the client processes
    with contextlib.ExitStack() as stack:
        dsn = stack.enter_context(servers.database(args.dsn))
        gunicorn = None
        if args.url:
            url, server_pid = args.url, args.server_pid
            server = {"url": url, "pid": server_pid}
        else:
            if args.mode != "pgws":
                os.environ["BENCH_MODE"] = args.mode
                os.environ["BENCH_LOG_SCHEMA"] = BENCH_LOG_SCHEMA
                if args.app == "examples.minimal:app":
                    args.app = "bench.channels_app:app"
            if args.mode == "durable":
                servers.fresh_log(dsn, BENCH_LOG_SCHEMA)
            # a tenth more threads than sockets (max_sockets="auto" keeps a tenth for requests)
            threads = args.threads or args.clients * 115 // 100 + 100
            wconns = args.worker_connections or 2 * args.clients + 200
            gunicorn = servers.Gunicorn(args.app, dsn, threads=threads, worker_connections=wconns,
                                        extra=shlex.split(args.gunicorn_args))
            stack.callback(gunicorn.stop)
            gunicorn.wait_healthy(args.health_path, args.start_timeout)
            url, server_pid = gunicorn.url(args.path), gunicorn.pid
            server = {"app": args.app, "gunicorn_args": " ".join(gunicorn.args), "pid": server_pid}
        result = measure(args, dsn, url, server_pid)
        result["server"] = server
        result["fd_limit"] = fd_limit
        if gunicorn is not None:
            gunicorn.stop()
            if result["failed"] or result["closes"] or result["lost"]:
                result["server_log"] = gunicorn.log_path  # kept: something went wrong
            else:
                gunicorn.remove_log()
        return result


def measure(args: argparse.Namespace, dsn: str, url: str, server_pid: Optional[int]) -> Dict[str, Any]:
    rss_before = servers.rss_kb(server_pid)
    tmp = tempfile.mkdtemp(prefix="pgws-bench-")
    procs: List[ClientProc] = []
    try:
        for i, count in enumerate(split(args.clients, args.procs)):
            procs.append(ClientProc(url, count, args, os.path.join(tmp, f"lat-{i}.bin")))
        deadline = time.monotonic() + args.connect_phase + 30
        connected = [p.expect("connected", max(1.0, deadline - time.monotonic())) for p in procs]
        opened = sum(c["opened"] for c in connected)
        errors: Dict[str, int] = {}
        for c in connected:
            for why, n in c["errors"].items():
                errors[why] = errors.get(why, 0) + n
        connect_s = max(c["t1"] for c in connected) - min(c["t0"] for c in connected)
        rss_connected = servers.settled_rss_kb(server_pid)
        server_threads = servers.threads(server_pid)

        cpu0, client_cpu0 = servers.cpu_s(server_pid), sum(p.cpu_s() for p in procs)
        t_pub0 = publish(dsn, args)
        publish_s = time.time() - t_pub0
        for p in procs:
            p.send({"cmd": "drain", "timeout": args.drain})
        done = [p.expect("done", args.drain + 60) for p in procs]
        t_done = time.time()
        cpu1, client_cpu1 = servers.cpu_s(server_pid), sum(p.cpu_s() for p in procs)
        rss_end = servers.rss_kb(server_pid)
        for p in procs:
            p.stop()
        latencies = sorted(lat for p in procs for lat in p.latencies())
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.stop()
            with contextlib.suppress(OSError):
                os.unlink(p.latfile)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)

    delivered = sum(d["delivered"] for d in done)
    expected = opened * args.messages
    last_rx = max((d["last_rx"] for d in done if d["last_rx"]), default=0.0)
    total_s = (last_rx - t_pub0) if last_rx else (t_done - t_pub0)
    phase_s = t_done - t_pub0
    closes: Dict[str, int] = {}
    for d in done:
        for why, n in d["closes"].items():
            closes[why] = closes.get(why, 0) + n
    mins = [d["min_per_client"] for d in done if d["min_per_client"] is not None]
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "url": url, "clients": args.clients, "procs": args.procs, "opened": opened,
        "failed": sum(c["failed"] for c in connected), "connect_errors": errors,
        "deflate_offered": args.deflate, "deflate_accepted": sum(c["deflated"] for c in connected),
        "messages": args.messages, "rate": args.rate, "pad": args.pad,
        "expected": expected, "delivered": delivered, "lost": expected - delivered,
        "min_per_client": min(mins) if mins else None,
        "out_of_order": sum(d["out_of_order"] for d in done),
        "other_frames": sum(d["other_frames"] for d in done),
        "closes": closes, "closed_during": sum(closes.values()),
        "connect_s": round(connect_s, 3), "publish_s": round(publish_s, 3),
        "total_s": round(total_s, 3),
        "deliveries_per_s": round(delivered / total_s) if total_s > 0 else None,
        "lat_ms": {"p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9),
                   "p99": percentile(latencies, 0.99), "max": percentile(latencies, 1.0)},
        "rss_kb": {"before": rss_before, "connected": rss_connected, "end": rss_end},
        "rss_per_conn_kb": (round((rss_connected - rss_before) / opened, 1)
                            if opened and rss_before is not None and rss_connected is not None
                            else None),
        "server_threads": server_threads,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        "server_cpu_pct": None if server_cpu is None else round(100 * server_cpu / phase_s, 1),
        "client_cpu_pct": round(100 * (client_cpu1 - client_cpu0) / phase_s, 1),
        "phase_s": round(phase_s, 3),
    }


# ------------------------------------------------------------------ output

def table(r: Dict[str, Any]) -> str:
    def num(x: Any, fmt: str = "{}") -> str:
        return "-" if x is None else fmt.format(x)

    lat, rss, srv = r["lat_ms"], r["rss_kb"], r["server"]
    rate = f"{r['rate']:g}/s" if r["rate"] else "max rate"
    deflate = "no"
    if r["deflate_offered"]:
        deflate = f"offered, accepted by {r['deflate_accepted']}"
    where = (f"{srv['app']} (gunicorn {srv['gunicorn_args']})" if "app" in srv
             else f"{srv['url']} (pid {num(srv['pid'])})")
    conn_rate = r["opened"] / r["connect_s"] if r["connect_s"] else 0
    rows = [
        ("server", where),
        ("clients", f"{r['clients']} in {r['procs']} process(es), permessage-deflate {deflate}"),
        ("notifications", f"{r['messages']} at {rate}, pad {r['pad']} B"),
        ("connect", f"{r['opened']} opened, {r['failed']} failed in {r['connect_s']:.2f} s "
                    f"({conn_rate:.0f}/s)"),
        ("publish", f"{r['publish_s']:.3f} s ({r['messages'] / max(r['publish_s'], 1e-9):.1f}/s)"),
        ("delivered", f"{r['delivered']} of {r['expected']}"),
        ("lost", f"{r['lost']} (min per client {num(r['min_per_client'])}, "
                 f"out of order {r['out_of_order']})"),
        ("deliveries/s", f"{num(r['deliveries_per_s'])} (last delivery {r['total_s']:.2f} s "
                         f"after the first publish)"),
        ("latency ms", f"p50 {num(lat['p50'])}  p90 {num(lat['p90'])}  p99 {num(lat['p99'])}  "
                       f"max {num(lat['max'])}"),
        ("server RSS KB", f"before {num(rss['before'])}, connected {num(rss['connected'])}, "
                          f"end {num(rss['end'])}"),
        ("RSS/conn KB", num(r["rss_per_conn_kb"])),
        ("server CPU", f"{num(r['server_cpu_s'])} s in {r['phase_s']:.2f} s "
                       f"({num(r['server_cpu_pct'])}%)"),
        ("server threads", num(r["server_threads"])),
        ("client CPU", f"{r['client_cpu_pct']}%"),
        ("closes", ", ".join(f"{n} x {why}" for why, n in r["closes"].items()) or "none"),
    ]
    if r["connect_errors"]:
        rows.append(("connect errors",
                     ", ".join(f"{n} x {why}" for why, n in r["connect_errors"].items())))
    if r.get("server_log"):
        rows.append(("server log", r["server_log"]))
    if r["other_frames"]:
        rows.append(("other frames", str(r["other_frames"])))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':{width}}  value", f"{'-' * width}  {'-' * 5}"]
    lines += [f"{name:{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(args: Any, run: Callable[[Any], Dict[str, Any]],
             table: Callable[[Dict[str, Any]], str]) -> int:
    """Run a benchmark from the command line: stop cleanly (clients, gunicorn, PostgreSQL)
    on Ctrl-C or SIGTERM, even when started in the background with SIGINT ignored; print
    its result as JSON (``args.json``) or as a table; exit 2 if something it needs could
    not start."""
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        result = run(args)
    except (StartError, psycopg2.OperationalError) as exc:
        print(f"bench: could not start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result) if args.json else table(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
