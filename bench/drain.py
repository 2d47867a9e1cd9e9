"""Deploys and reconnect storms: N sockets, SIGTERM, when each socket is closed and when pgws.js
would come back.

    python -m bench.drain --clients 1000 --drain 0 3

For each drain window it starts gunicorn (one worker, the library's hook, ``examples.minimal``),
opens N WebSockets, sends SIGTERM, and records when each socket's close frame arrives and with
which code and reason. It then applies pgws.js's reconnect policy to each close (1012 "reconnect
after N s": N to 2N seconds; anything else: its first backoff, 1.2 s +-20%) and prints the peak
number of reconnect attempts in any 100 ms and in any second: the storm a server that comes
back would face. The closes are measured; the reconnect times follow from them and the policy.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import selectors
import signal
import sys
import time
from typing import List, Optional, Tuple

from .servers import Gunicorn, embedded_postgres
from .spread import open_sockets

HINT = re.compile(r"reconnect after (\d+(?:\.\d+)?)\s*s")


def close_of(data: bytes) -> Optional[Tuple[int, str]]:
    """The (code, reason) of the first close frame in ``data`` (unmasked server frames)."""
    i = 0
    while i + 2 <= len(data):
        opcode, size = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if size == 126:
            size, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif size == 127:
            size, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        if opcode == 0x8:
            body = data[i:i + size]
            return (int.from_bytes(body[:2], "big") if len(body) >= 2 else 1005,
                    body[2:].decode("utf-8", "replace"))
        i += size
    return None


def reconnect_at(closed: float, code: int, reason: str) -> float:
    """When pgws.js would try again after this close (its policy, with its jitter)."""
    hint = HINT.search(reason) if code == 1012 else None
    if hint:
        return closed + float(hint.group(1)) * (1 + random.random())
    return closed + 1.2 * random.uniform(0.8, 1.2)


def peak(times: List[float], window: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end in range(len(times)):
        while times[end] - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


def run(dsn: str, clients: int, drain: float) -> None:
    server = Gunicorn("examples.minimal:app", dsn, threads=clients * 115 // 100 + 100,
                      worker_connections=2 * clients + 200, extra=[])
    try:
        server.wait_healthy("/healthz", 60)
        socks = open_sockets(server.port, clients)  # each registered before its 101
        sel = selectors.DefaultSelector()
        buffers = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            buffers[s] = b""
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        closes: List[Tuple[float, int, str]] = []
        deadline = started + drain + 15
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                buffers[s] += data
                found = close_of(buffers[s])
                if found is not None or not data:
                    code, reason = found or (1006, "")
                    closes.append((time.monotonic() - started, code, reason))
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
        attempts = [reconnect_at(t, code, reason) for t, code, reason in closes]
        codes = sorted({c for _, c, _ in closes})
        print(f"drain {drain:g}s: {len(closes)}/{clients} closed (codes {codes}), closes from "
              f"{min(t for t, _, _ in closes):.2f}s to {max(t for t, _, _ in closes):.2f}s after "
              f"SIGTERM; reconnect attempts: peak {peak(attempts, 0.1)} in 100 ms, "
              f"{peak(attempts, 1.0)} in 1 s, all within {max(attempts):.1f}s", flush=True)
    finally:
        server.stop()
        server.remove_log()


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--drain", type=float, nargs="+", default=[0.0, 3.0])
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN") or os.environ.get("PGWS_TEST_DSN"))
    args = parser.parse_args(argv)
    pg = None if args.dsn else embedded_postgres()
    dsn = args.dsn or pg.dsn  # type: ignore[attr-defined]
    try:
        for drain in args.drain:
            os.environ["PGWS_DRAIN_SECONDS"] = f"{drain:g}"
            run(dsn, args.clients, drain)
    finally:
        if pg is not None:
            pg.destroy()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
