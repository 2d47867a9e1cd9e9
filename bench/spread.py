"""How gunicorn's workers share sockets: N WebSocket clients, W workers, sockets per worker.

    python -m bench.spread --workers 4 --clients 1000            # as shipped, and without reuse_port
    python -m bench.spread --workers 4 --clients 1000 --only shipped
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import psutil

from .servers import Gunicorn, StartError, embedded_postgres, worker_pids

#: A config module identical to the shipped hook but for ``reuse_port``.
WITHOUT_REUSE_PORT = "from pgws_sync.gunicorn import *  # noqa: F401,F403\nreuse_port = False\n"


def open_socket(port: int) -> socket.socket:
    """One upgraded WebSocket connection to ``/ws`` on 127.0.0.1 (blocking, 10 s timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise StartError("the server closed a connection during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise StartError(f"upgrade refused: {head[:100]!r}")
    return sock


def open_sockets(port: int, count: int) -> List[socket.socket]:
    """``count`` upgraded WebSocket connections to ``/ws`` (kept open, never read)."""
    return [open_socket(port) for _ in range(count)]


def sockets_per_worker(server: Gunicorn) -> Dict[int, int]:
    counts = {}
    for pid in worker_pids(server.pid):
        conns = psutil.Process(pid).net_connections(kind="tcp")
        counts[pid] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED
                          and c.laddr and c.laddr.port == server.port)
    return counts


def measure(dsn: str, workers: int, clients: int, config: str) -> List[int]:
    server = Gunicorn("examples.minimal:app", dsn, threads=clients * 115 // 100 + 100,
                      worker_connections=2 * clients + 200, workers=workers, config=config)
    try:
        server.wait_healthy("/healthz", 60)
        deadline = time.monotonic() + 60
        while len(worker_pids(server.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        socks = open_sockets(server.port, clients)
        try:
            deadline = time.monotonic() + 30
            while True:
                counts = sockets_per_worker(server)
                if sum(counts.values()) >= clients or time.monotonic() > deadline:
                    return sorted(counts.values(), reverse=True)
                time.sleep(0.1)
        finally:
            for s in socks:
                s.close()
    finally:
        server.stop()
        server.remove_log()


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["shipped", "without"], default=None)
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN") or os.environ.get("PGWS_TEST_DSN"))
    args = parser.parse_args(argv)
    pg = None
    dsn = args.dsn
    if not dsn:
        pg = embedded_postgres()
        dsn = pg.dsn  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        without = Path(tmp) / "without_reuse_port.py"
        without.write_text(WITHOUT_REUSE_PORT)
        setups = {"shipped (reuse_port)": "python:pgws_sync.gunicorn",
                  "without reuse_port": str(without)}
        if args.only == "shipped":
            setups.pop("without reuse_port")
        elif args.only == "without":
            setups.pop("shipped (reuse_port)")
        print(f"{args.clients} sockets over {args.workers} workers, sockets per worker "
              f"(most first), {args.rounds} rounds")
        try:
            for name, config in setups.items():
                for _ in range(args.rounds):
                    counts = measure(dsn, args.workers, args.clients, config)
                    print(f"{name:22} {counts}  most/fair {max(counts) * args.workers / args.clients:.2f}",
                          flush=True)
        finally:
            if pg is not None:
                pg.destroy()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
