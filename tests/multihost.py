"""The multi-host rig: gunicorn "hosts" behind a real HAProxy on one PostgreSQL, publishers of
durable messages, and a swarm of clients that resume as pgws.js does (tests and bench/).

The balancer runs examples/proxy/haproxy-hosts.cfg, the configuration docs/scaling-out.md
shows: only its addresses and its stats socket's path are replaced, each exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import psycopg2

from bench.drain import reconnect_at
from bench.wsframes import (OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Handshake, ProtocolError,
                            client_frame, close_payload, split_frames, upgrade_request)

from .helpers import ROOT, Gunicorn, free_port, replace_once, wait_for
from .proxy_process import ProxyProcess, check_haproxy
from .pubsub_helpers import serve_pubsub

#: The balancer's configuration, as the docs show it.
EXAMPLE = ROOT / "examples" / "proxy" / "haproxy-hosts.cfg"
#: The hosts the example names, in order, replaced by the rig's gunicorns.
EXAMPLE_HOSTS = ("10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000")


# ------------------------------------------------------------------ the balancer


class Balancer(ProxyProcess):
    """HAProxy (``binary``) in the foreground on ``port``, in front of ``upstreams``."""

    name = "haproxy"

    def __init__(self, binary: str, upstreams: Sequence[int], port: int) -> None:
        super().__init__(binary, port=port)
        self.stats_path = self.dir / "admin.sock"
        text = EXAMPLE.read_text()
        text = replace_once(text, "bind :80", f"bind 127.0.0.1:{port}")
        text = replace_once(text, "/run/haproxy/admin.sock", str(self.stats_path))
        for name, upstream in zip(EXAMPLE_HOSTS, upstreams):
            text = replace_once(text, f" {name}", f" 127.0.0.1:{upstream}")
        for name in EXAMPLE_HOSTS[len(upstreams):]:  # fewer hosts: drop the others' lines
            line = next(line for line in text.splitlines(True) if f" {name}" in line)
            text = text.replace(line, "")
        config = self.dir / "haproxy.cfg"
        config.write_text(text)
        check_haproxy(binary, config)
        self.run([binary, "-db", "-f", str(config)])

    def ready(self) -> bool:
        return self.stats_path.exists()

    def command(self, line: str) -> str:
        """One command on the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks).decode()
                chunks.append(chunk)

    def stats(self) -> List[Dict[str, str]]:
        """``show stat``: one dict per frontend, backend and server, by the CSV's field names."""
        lines = self.command("show stat").strip().splitlines()
        fields = lines[0].lstrip("# ").split(",")
        return [dict(zip(fields, line.split(","))) for line in lines[1:] if line]

    def states(self) -> List[str]:
        """Each server's state as the health checks see it (UP, DOWN, ...), in order."""
        return [row["status"].split()[0] for row in self.stats()
                if row["pxname"] == "app" and row["svname"] not in ("FRONTEND", "BACKEND")]

    def frontend(self) -> Dict[str, str]:
        return next(row for row in self.stats() if row["svname"] == "FRONTEND")


# ------------------------------------------------------------------ the rig


class Rig:
    """``hosts`` gunicorns (``workers`` each, their own masters) serving the pub/sub test app on
    a durable log in ``schema``, behind a :class:`Balancer`."""

    def __init__(self, dsn: str, schema: str, haproxy: str, *, hosts: int = 3, workers: int = 2,
                 threads: int = 128, options: Optional[Dict[str, Any]] = None,
                 drain: float = 1.0) -> None:
        self.dsn, self.schema = dsn, schema
        self.workers, self.threads = workers, threads
        self.options = {"durable": True, "log_schema": schema, **(options or {})}
        self.extra_env = {"PGWS_DRAIN_SECONDS": str(drain)}
        self.hosts: List[Gunicorn] = []
        self.balancer: Optional[Balancer] = None
        try:
            for _ in range(hosts):
                self.hosts.append(self._start())
            for host in self.hosts:
                host.wait_up()
            self.balancer = Balancer(haproxy, [h.port for h in self.hosts], free_port())
            self.wait_states(["UP"] * hosts)
        except BaseException:
            self.stop()
            raise

    @property
    def port(self) -> int:
        assert self.balancer is not None
        return self.balancer.port

    def _start(self, port: Optional[int] = None) -> Gunicorn:
        return serve_pubsub(self.dsn, self.options, extra_env=self.extra_env, wait=False,
                            workers=self.workers, threads=self.threads, port=port,
                            args=["--worker-connections", str(2 * self.threads)])

    def wait_states(self, states: List[str], timeout: float = 30.0) -> None:
        """Wait until the balancer's health checks see the servers so (``UP``, ``DOWN``)."""
        assert self.balancer is not None
        balancer = self.balancer
        wait_for(lambda: balancer.states() == states, timeout,
                 message=f"haproxy to see the hosts {states}")

    def host_of(self, pid: int) -> Optional[int]:
        """The index of the host whose worker (or master) ``pid`` is, or None."""
        for i, host in enumerate(self.hosts):
            if host.proc.poll() is None and (pid == host.proc.pid or pid in host.worker_pids()):
                return i
        return None

    def kill(self, i: int) -> List[int]:
        """SIGKILL host ``i``, master and workers at once; returns the workers' pids."""
        host = self.hosts[i]
        master = psutil.Process(host.proc.pid)
        workers = master.children()
        for proc in (master, *workers):
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(workers, timeout=10)
        host.stop()
        return [w.pid for w in workers]

    def start(self, i: int) -> None:
        """Start host ``i`` again on its port; wait until it answers /healthz."""
        self.hosts[i] = self._start(self.hosts[i].port).wait_up()

    def restart(self, i: int) -> None:
        """A deploy of host ``i``: SIGTERM (a drain), wait until it is gone, start it again,
        and wait until the balancer's checks see it up."""
        self.hosts[i].stop(signal.SIGTERM)
        self.start(i)
        self.wait_states(["UP"] * len(self.hosts))

    def stop(self) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for host in self.hosts:
            host.stop()

    def backends(self) -> List[Tuple[int, int, str]]:
        """This rig's sessions on the database, from pg_stat_activity: (host index, the pid of
        the worker or master holding it, application_name), by matching client ports."""
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT client_port, application_name FROM pg_stat_activity "
                            "WHERE client_port IS NOT NULL AND pid <> pg_backend_pid()")
                sessions = dict(cur.fetchall())
        finally:
            conn.close()
        owners = {c.laddr.port: c.pid for c in psutil.net_connections("tcp")
                  if c.pid and c.laddr and c.laddr.port in sessions and c.raddr}
        found = []
        for port, name in sessions.items():
            pid = owners.get(port)
            host = self.host_of(pid) if pid else None
            if host is not None and pid is not None:
                found.append((host, pid, name))
        return found


# ------------------------------------------------------------------ publishers


class Publishers:
    """A thread publishing durable messages ``{"n": i}`` round-robin over ``channels`` at
    ``rate`` per second, each in its own transaction, until stopped."""

    def __init__(self, dsn: str, schema: str, channels: Sequence[str], rate: float) -> None:
        self.dsn, self.schema, self.channels, self.rate = dsn, schema, list(channels), rate
        self.published: Dict[str, int] = {c: 0 for c in self.channels}
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multihost-publishers",
                                         daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from pgws_sync import publish_durable

        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        try:
            started, i = time.monotonic(), 0
            while not self._stop.is_set():
                channel = self.channels[i % len(self.channels)]
                publish_durable(conn, channel, {"n": self.published[channel] + 1},
                                schema=self.schema)
                self.published[channel] += 1
                i += 1
                self._stop.wait(max(0.0, started + i / self.rate - time.monotonic()))
        except BaseException as exc:  # the test reports it
            self.error = exc
        finally:
            conn.close()

    def total(self) -> int:
        return sum(self.published.values())

    def stop(self) -> Dict[str, int]:
        """Stop publishing; what was published, per channel."""
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise RuntimeError(f"publishing failed: {self.error}") from self.error
        return dict(self.published)


# ------------------------------------------------------------------ clients


def backoff(attempt: int) -> float:
    """pgws.js's delay before connect attempt ``attempt`` (1, 2, ...) after failures:
    Fibonacci from 1.2 s, +-20% jitter, at most 30 s."""
    a, b = 1.2, 1.2
    for _ in range(attempt - 1):
        a, b = b, a + b
    return min(30.0, a) * random.uniform(0.8, 1.2)


class Resuming:
    """One client's state: its socket, where it is in each channel, what went wrong."""

    def __init__(self, index: int, channels: List[str]) -> None:
        self.index = index
        self.channels = channels
        self.sock: Optional[socket.socket] = None
        self.head = b""
        self.buf = bytearray()
        self.accept = b""
        self.open = False
        self.pid: Optional[int] = None
        self.ids: List[str] = []
        self.failures = 0
        self.retry_at: Optional[float] = 0.0
        self.positions: Dict[str, Tuple[int, str]] = {}
        self.first: Dict[str, int] = {}
        self.received = 0
        self.gaps = 0
        self.duplicates = 0
        self.problems: List[str] = []


class Swarm:
    """``clients`` WebSocket clients of ``port``'s ``/ws`` in one selector loop (a thread), each
    subscribed to ``per_client`` of ``channels``; on a close or a failed connect each comes back
    as pgws.js does (1012 "reconnect after N s": after N to 2N s; otherwise its backoff) and
    resumes each channel from its last offset and epoch. Frames are checked for contiguity."""

    def __init__(self, port: int, clients: int, channels: Sequence[str], *,
                 per_client: Optional[int] = None, ramp: float = 200.0) -> None:
        self.port = port
        chans = list(channels)
        k = per_client or len(chans)
        self.clients = [Resuming(i, [chans[(i + j) % len(chans)] for j in range(k)])
                        for i in range(clients)]
        for c in self.clients:  # the first connects spread at ``ramp`` per second
            c.retry_at = time.monotonic() + c.index / ramp
        #: monotonic times of every connect attempt and of every handshake answered 101
        self.attempts: List[float] = []
        self.connects: List[float] = []
        self.closes: Dict[str, int] = {}
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="multihost-swarm", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- what tests read

    def subscribed(self) -> int:
        """Clients open and subscribed to all their channels."""
        return sum(1 for c in self.clients if c.open and len(c.first) == len(c.channels)
                   and c.retry_at is None)

    def caught_up(self, published: Dict[str, int]) -> bool:
        """Every client open and at the last offset of each of its channels."""
        return all(c.open and all(c.positions.get(ch, (-1, ""))[0] == published[ch]
                                  for ch in c.channels) for c in self.clients)

    def problems(self) -> List[str]:
        found = []
        for c in self.clients:
            if c.gaps or c.duplicates:
                found.append(f"client {c.index}: {c.gaps} missed, {c.duplicates} doubled")
            found += [f"client {c.index}: {p}" for p in c.problems]
        return found

    def check(self) -> None:
        """Raise if the loop failed."""
        if self.error is not None:
            raise RuntimeError(f"the client loop failed: {self.error!r}") from self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for c in self.clients:
            if c.sock is not None:
                c.sock.close()
        self._sel.close()

    # ---------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for c in self.clients:
                    if c.sock is None and c.retry_at is not None and c.retry_at <= now:
                        self._connect(c)
                for key, mask in self._sel.select(0.02):
                    c = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._send_upgrade(c)
                    elif mask & selectors.EVENT_READ:
                        self._read(c)
        except BaseException as exc:  # the test reports it
            self.error = exc

    def _connect(self, c: Resuming) -> None:
        c.retry_at = None
        c.head, c.buf, c.open = b"", bytearray(), False
        sock = socket.socket()
        sock.setblocking(False)
        self.attempts.append(time.monotonic())
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(c, f"connect: {os.strerror(err)}")
            return
        c.sock = sock
        self._sel.register(sock, selectors.EVENT_WRITE, c)

    def _send_upgrade(self, c: Resuming) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop(c, f"connect: {os.strerror(err)}", failed=True)
            return
        request, c.accept = upgrade_request(f"127.0.0.1:{self.port}", "/ws")
        c.sock.send(request)
        self._sel.modify(c.sock, selectors.EVENT_READ, c)

    def _read(self, c: Resuming) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(c, f"reset: {exc.strerror}", failed=not c.open)
            return
        if not data:
            self._drop(c, "1006 (no close frame)" if c.open else "closed during the upgrade",
                       failed=not c.open)
            return
        if not c.open:
            c.head += data
            if b"\r\n\r\n" not in c.head:
                return
            head, _, rest = c.head.partition(b"\r\n\r\n")
            try:
                Handshake.parse(head).check(c.accept)
            except ProtocolError as exc:  # the body's start says who refused
                said = rest.decode("utf-8", "replace").strip().splitlines()[:1]
                self._drop(c, f"upgrade: {exc}" + (f" ({said[0][:60]})" if said else ""),
                           failed=True)
                return
            c.open = True
            self.connects.append(time.monotonic())
            data = rest
        c.buf += data
        for first, payload in split_frames(c.buf):
            opcode = first & 0x0F
            if opcode == OP_TEXT:
                self._frame(c, json.loads(payload))
            elif opcode == OP_PING:
                self._send(c, client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code, reason = close_payload(payload)
                self._send(c, client_frame(OP_CLOSE, payload[:2]))
                self._drop(c, f"{code} {reason}".strip(), code=code, reason=reason)
                return

    def _send(self, c: Resuming, frame: bytes) -> None:
        assert c.sock is not None
        try:
            c.sock.send(frame)  # small frames into an idle socket's buffer
        except OSError:
            pass  # the read that follows sees the end

    def _frame(self, c: Resuming, frame: Dict[str, Any]) -> None:
        event = frame.get("event")
        if event == "welcome":
            c.pid = frame["pid"]
            c.ids.append(frame["id"])
            for channel in c.channels:
                action: Dict[str, Any] = {"action": "subscribe", "channel": channel,
                                          "id": channel}
                if channel in c.positions:
                    action["since"], action["epoch"] = c.positions[channel]
                self._send(c, client_frame(OP_TEXT, json.dumps(action).encode()))
        elif event == "subscribed":
            channel = frame["channel"]
            if channel not in c.positions:
                c.positions[channel] = (frame["offset"], frame["epoch"])
                c.first[channel] = frame["offset"]
            if len(c.first) == len(c.channels):
                c.failures = 0
        elif event is not None and event not in ("join", "leave", "presence_count"):
            c.problems.append(f"unexpected {frame}")
        elif event is None and "offset" in frame:
            channel, offset = frame["channel"], frame["offset"]
            last, epoch = c.positions.get(channel, (offset - 1, frame["epoch"]))
            if frame["epoch"] != epoch:
                c.problems.append(f"{channel}: epoch changed")
            if offset == last + 1:
                c.received += 1
                c.positions[channel] = (offset, frame["epoch"])
            elif offset <= last:
                c.duplicates += 1
            else:
                c.gaps += offset - last - 1
                c.positions[channel] = (offset, frame["epoch"])

    def _failed(self, c: Resuming, why: str) -> None:
        c.failures += 1
        self.closes[why] = self.closes.get(why, 0) + 1
        c.retry_at = time.monotonic() + backoff(c.failures)

    def _drop(self, c: Resuming, why: str, *, failed: bool = False, code: int = 1006,
              reason: str = "") -> None:
        assert c.sock is not None
        self._sel.unregister(c.sock)
        c.sock.close()
        c.sock, c.open = None, False
        if failed:
            self._failed(c, why)
            return
        self.closes[why] = self.closes.get(why, 0) + 1
        c.retry_at = reconnect_at(time.monotonic(), code, reason)


def wait_caught_up(swarm: Swarm, published: Dict[str, int], timeout: float = 60.0,
                   progress: Optional[Callable[[], None]] = None) -> None:
    """Wait until every client has every message published (the loop must not fail)."""
    def done() -> bool:
        swarm.check()
        if progress is not None:
            progress()
        return swarm.caught_up(published)
    wait_for(done, timeout, message=f"every client to catch up with {published}")
