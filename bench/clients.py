"""One client process of the benchmark: many WebSocket clients served by one selector loop.

Started by bench.fanout as ``python -m bench.clients --url ws://... --count N ...``.
It talks JSON lines: it prints ``{"ev": "connected", ...}`` once every socket is
open (or failed), reads ``{"cmd": "drain", "timeout": S}`` after the last
publish and prints ``{"ev": "done", ...}`` when every client has all its
messages (or was closed, or S seconds passed), then ``{"cmd": "close"}`` closes
the sockets and ends the process. End of input ends it too.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from .wsframes import (FIN, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RSV1,
                       Handshake, Inflater, ProtocolError, client_frame, close_frame,
                       close_payload, split_frames, upgrade_request)

CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)
RECV_SIZE = 262144
TICK = 0.05  # seconds between checks of deadlines and commands when nothing happens


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def find_stamp(data: bytes) -> Optional[Tuple[float, Optional[int]]]:
    """(t, seq) of a benchmark frame: ``t`` in the frame or its payload/message/data field."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    for cand in (obj, obj.get("payload"), obj.get("message"), obj.get("data")):
        if isinstance(cand, str):
            try:
                cand = json.loads(cand)
            except ValueError:
                continue
        if isinstance(cand, dict):
            t = cand.get("t")
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                seq = cand.get("seq")
                return float(t), seq if isinstance(seq, int) else None
    return None


class Client:
    """One WebSocket client's state."""

    __slots__ = ("sock", "state", "buf", "out", "accept", "inflater", "count", "last_seq",
                 "frag", "frag_first", "started", "close")

    def __init__(self, sock: socket.socket, accept: bytes, started: float) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.buf = bytearray()
        self.out = b""
        self.accept = accept
        self.inflater: Optional[Inflater] = None
        self.count = 0
        self.last_seq = -1
        self.frag: Optional[List[bytes]] = None
        self.frag_first = 0
        self.started = started
        self.close: Optional[Tuple[int, str]] = None


class Swarm:
    """Opens ``count`` clients, at most ``batch`` handshakes at a time, and reads them all."""

    def __init__(self, url: str, *, count: int, messages: int, batch: int, deflate: bool,
                 connect_timeout: float, connect_phase: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise SystemExit(f"only ws:// URLs are supported, got {url!r}")
        self.addr = (parts.hostname, parts.port or 80)
        self.host = parts.netloc
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.count, self.messages, self.batch = count, messages, batch
        self.deflate, self.connect_timeout = deflate, connect_timeout
        self.connect_phase = connect_phase
        self.sel = selectors.DefaultSelector()
        self.clients: List[Client] = []
        self.to_start = count
        self.in_flight = 0
        self.opened = self.failed = self.deflated = 0
        self.errors: Dict[str, int] = {}
        self.closes: Dict[str, int] = {}
        self.latencies = array.array("d")  # milliseconds
        self.out_of_order = self.other_frames = 0
        self.finished = 0  # open clients that have every message or were closed
        self.first_rx = self.last_rx = 0.0
        self.t_connect0 = self.t_connect1 = 0.0
        self.drain_deadline: Optional[float] = None
        self.stdin_buf = b""
        self.stopping = False

    # --------------------------------------------------------- connecting

    def start_one(self, now: float) -> None:
        request, accept = upgrade_request(self.host, self.path, deflate=self.deflate)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = Client(sock, accept, now)
        client.out = request
        self.in_flight += 1
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self.fail(client, f"connect: {os.strerror(err)}")
            return
        self.clients.append(client)
        self.sel.register(sock, selectors.EVENT_WRITE, client)

    def fail(self, client: Client, why: str) -> None:
        self.in_flight -= 1
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1
        client.state = CLOSED
        self.drop(client)

    def opened_one(self, client: Client, now: float) -> None:
        self.in_flight -= 1
        self.opened += 1
        self.t_connect1 = now
        client.state = OPEN
        if client.inflater is not None:
            self.deflated += 1
        if self.messages == 0:
            self.finished += 1

    def drop(self, client: Client) -> None:
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def check_timeouts(self, now: float) -> None:
        if now - self.t_connect0 > self.connect_phase:
            why = f"not open when the connect phase ended ({self.connect_phase:g}s)"
            if self.to_start:
                self.failed += self.to_start
                self.errors[why] = self.errors.get(why, 0) + self.to_start
                self.to_start = 0
            for client in self.clients:
                if client.state in (CONNECTING, HANDSHAKE):
                    self.fail(client, why)
            return
        for client in self.clients:
            if client.state in (CONNECTING, HANDSHAKE) and now - client.started > self.connect_timeout:
                self.fail(client, f"no handshake answer within {self.connect_timeout:g}s")

    # ------------------------------------------------------------- events

    def writable(self, client: Client) -> None:
        if client.state == CONNECTING:
            err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(client, f"connect: {os.strerror(err)}")
                return
            client.state = HANDSHAKE
        self.flush(client)

    def send(self, client: Client, data: bytes) -> None:
        client.out += data
        self.flush(client)

    def flush(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.out) if client.out else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.lost(client, f"send: {exc.strerror or exc}")
            return
        client.out = client.out[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if client.state == CLOSED:
            return
        self.sel.modify(client.sock, events, client)

    def readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            why = f"recv: {exc.strerror or exc}"
        else:
            why = "1006 connection closed without a close frame"
        now = time.time()
        if not data:
            if client.state == OPEN:
                self.lost(client, why)
            else:
                self.fail(client, "closed during the handshake")
            return
        client.buf += data
        if client.state == HANDSHAKE:
            end = client.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                answer = Handshake.parse(bytes(client.buf[:end]))
                answer.check(client.accept)
                client.inflater = answer.deflate()
            except ProtocolError as exc:
                self.fail(client, str(exc))
                return
            del client.buf[:end + 4]
            self.opened_one(client, now)
        try:
            self.frames(client, now)
        except ProtocolError as exc:
            self.lost(client, f"protocol error: {exc}")

    def frames(self, client: Client, now: float) -> None:
        for first, payload in split_frames(client.buf):
            opcode = first & 0x0F
            if opcode in (OP_TEXT, OP_BINARY):
                if first & FIN:
                    self.message(client, payload, first & RSV1, now)
                else:
                    client.frag, client.frag_first = [payload], first
            elif opcode == OP_CONT:
                if client.frag is None:
                    raise ProtocolError("continuation frame without a first frame")
                client.frag.append(payload)
                if first & FIN:
                    data, client.frag = b"".join(client.frag), None
                    self.message(client, data, client.frag_first & RSV1, now)
            elif opcode == OP_PING:
                self.send(client, client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code, reason = close_payload(payload)
                self.send(client, close_frame(code if code != 1005 else 1000))
                self.lost(client, f"{code} {reason}".strip())
                return
            elif opcode != OP_PONG:
                raise ProtocolError(f"unknown opcode {opcode}")

    def message(self, client: Client, data: bytes, compressed: int, now: float) -> None:
        if compressed:
            if client.inflater is None:
                raise ProtocolError("compressed message without permessage-deflate")
            data = client.inflater.inflate(data)
        stamp = find_stamp(data)
        if stamp is None:
            self.other_frames += 1
            return
        t, seq = stamp
        self.latencies.append((now - t) * 1000.0)
        if not self.first_rx:
            self.first_rx = now
        self.last_rx = now
        if seq is not None:
            if seq <= client.last_seq:
                self.out_of_order += 1
            client.last_seq = seq
        client.count += 1
        if client.count == self.messages:
            self.finished += 1

    def lost(self, client: Client, why: str) -> None:
        """An open socket ended: by a close frame, an error, or end of stream."""
        if client.state == CLOSED:
            return
        if client.state != OPEN:
            self.fail(client, why)
            return
        client.state = CLOSED
        client.close = (0, why)
        self.closes[why] = self.closes.get(why, 0) + 1
        if client.count < self.messages:
            self.finished += 1
        self.drop(client)

    # ------------------------------------------------------------ commands

    def command(self, now: float) -> None:
        chunk = os.read(0, 65536)
        if not chunk:
            self.stopping = True
            return
        self.stdin_buf += chunk
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd["cmd"] == "drain":
                self.drain_deadline = now + float(cmd["timeout"])
            elif cmd["cmd"] == "close":
                self.stopping = True

    # ---------------------------------------------------------------- loop

    def run(self, latfile: str) -> None:
        self.sel.register(0, selectors.EVENT_READ, None)
        self.t_connect0 = time.time()
        connected_sent = done_sent = False
        next_timeout_check = time.monotonic() + 1.0
        while not self.stopping:
            now = time.time()
            while self.to_start and self.in_flight < self.batch:
                self.to_start -= 1
                self.start_one(now)
            for key, mask in self.sel.select(TICK):
                client = key.data
                if client is None:
                    self.command(time.time())
                    continue
                if mask & selectors.EVENT_WRITE and client.state != CLOSED:
                    self.writable(client)
                if mask & selectors.EVENT_READ and client.state in (HANDSHAKE, OPEN):
                    self.readable(client)
            if not connected_sent:
                if time.monotonic() > next_timeout_check:
                    next_timeout_check = time.monotonic() + 1.0
                    self.check_timeouts(time.time())
                if not self.to_start and not self.in_flight:
                    connected_sent = True
                    self.clients = [c for c in self.clients if c.state == OPEN]
                    emit({"ev": "connected", "opened": self.opened, "failed": self.failed,
                          "errors": self.errors, "deflated": self.deflated,
                          "t0": self.t_connect0, "t1": self.t_connect1 or time.time()})
            if self.drain_deadline is not None and not done_sent:
                if self.finished >= self.opened or time.time() > self.drain_deadline:
                    done_sent = True
                    self.report(latfile)
        for client in self.clients:
            if client.state == OPEN:
                try:
                    client.sock.send(close_frame(1000))
                except OSError:
                    pass
            client.sock.close()

    def report(self, latfile: str) -> None:
        with open(latfile, "wb") as f:
            self.latencies.tofile(f)
        counts = [c.count for c in self.clients]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        emit({"ev": "done", "delivered": len(self.latencies),
              "min_per_client": min(counts) if counts else None,
              "closes": self.closes, "out_of_order": self.out_of_order,
              "other_frames": self.other_frames, "first_rx": self.first_rx,
              "last_rx": self.last_rx, "cpu_s": ru.ru_utime + ru.ru_stime,
              "max_rss_kb": ru.ru_maxrss})


def emit(event: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--deflate", action="store_true")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--connect-phase", type=float, default=300.0)
    parser.add_argument("--latfile", required=True)
    args = parser.parse_args(argv)
    limit = raise_fd_limit()
    if args.count + 32 > limit:
        emit({"ev": "error", "error": f"{args.count} sockets need more than this process's "
              f"limit of {limit} open files: use more client processes (--procs)"})
        return 2
    swarm = Swarm(args.url, count=args.count, messages=args.messages, batch=args.batch,
                  deflate=args.deflate, connect_timeout=args.connect_timeout,
                  connect_phase=args.connect_phase)
    swarm.run(args.latfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
