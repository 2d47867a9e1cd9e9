"""Test helpers: waiting on conditions, gunicorn processes, WebSocket clients, a TCP proxy."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import pytest
import simple_websocket

from pgws_sync.testing import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def http_get(url: str, headers: Optional[Dict[str, str]] = None, timeout: float = 5.0) -> Tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; it must occur exactly once (else the docs changed)."""
    if text.count(old) != 1:
        raise AssertionError(f"{old!r} occurs {text.count(old)} times in the example")
    return text.replace(old, new)


def scrape(server: Gunicorn) -> Dict[str, float]:
    """The server's /metrics as {sample with labels: value}."""
    status, body = http_get(server.url("/metrics"))
    assert status == 200, body
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def value(server: Gunicorn, prefix: str) -> float:
    """The sum of the server's metric samples whose name (with labels) starts with ``prefix``."""
    return sum(v for k, v in scrape(server).items() if k.startswith(prefix))


class Gunicorn:
    """A real gunicorn serving ``app`` on a free port, configured by environment variables."""

    def __init__(self, app: str = "tests.apps.app:app", *, env: Optional[Dict[str, str]] = None,
                 workers: int = 1, threads: int = 128, args: Sequence[str] = (),
                 port: Optional[int] = None) -> None:
        self.port = port or free_port()  # a port given: a restart where the last one served
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgws-gunicorn-{self.port}.log"
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "tests" / "gunicorn_conf.py"),
               "-b", f"127.0.0.1:{self.port}", "-w", str(workers), "--threads", str(threads),
               *args, app]
        full_env = dict(os.environ)
        full_env["PGWS_DRAIN_SECONDS"] = "0"  # SIGTERM closes at once (1001); a test may drain
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_up(self, healthy: bool = True, timeout: float = 20.0) -> "Gunicorn":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{self.log()}")
            try:
                status, _ = http_get(self.url("/healthz"), timeout=1)
            except OSError:
                return False
            return status == 200 if healthy else status in (200, 503)
        wait_for(ready, timeout, "gunicorn to answer /healthz")
        return self

    def worker_pids(self) -> List[int]:
        return sorted(p.pid for p in psutil.Process(self.proc.pid).children())

    def stats(self) -> Dict[str, Any]:
        status, body = http_get(self.url("/debug/stats"))
        assert status == 200, body
        return json.loads(body)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def serve(pg_dsn, channels=("pgws",), options=None, listener=None, extra_env=None, **kwargs):
    env = {"PGWS_DB_URI": pg_dsn, "PGWS_CHANNELS": json.dumps(list(channels)),
           "PGWS_OPTIONS": json.dumps(options or {}),
           "PGWS_LISTENER_OPTIONS": json.dumps(listener or {}), **(extra_env or {})}
    return Gunicorn(env=env, **kwargs)


def wait_sockets(server, n):
    wait_for(lambda: server.stats()["sockets"] == n, message=f"{n} registered sockets")


class Client(simple_websocket.Client):
    """simple-websocket's client, minus two bugs: frames that arrive in the same read as
    the handshake answer (a server that sends at once) waited for the next read, and its
    Host header left out a port other than the scheme's default (browsers send it)."""

    def handshake(self) -> None:
        if self.port not in (80, 443):  # connected already: the name is used for Host only
            self.host = f"{self.host}:{self.port}"
        super().handshake()
        self.connected = self._handle_events()


class Ws:
    """A real WebSocket client (simple-websocket) with deadline-bound reads."""

    def __init__(self, url: str, headers: Optional[Dict[str, str]] = None,
                 subprotocols: Optional[List[str]] = None,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.client = Client.connect(url, headers=headers, subprotocols=subprotocols,
                                     ssl_context=ssl_context)

    def recv(self, timeout: float = 10.0) -> Any:
        message = self.client.receive(timeout=timeout)
        if message is None:
            raise AssertionError(f"no frame within {timeout}s")
        return message

    def recv_json(self, timeout: float = 10.0) -> Any:
        return json.loads(self.recv(timeout))

    def recv_until(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """Read JSON frames until one satisfies ``predicate``; return it (the others are skipped)."""
        deadline = time.monotonic() + timeout
        seen: List[Any] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; got {seen!r}")
            frame = self.recv_json(timeout=left)
            if predicate(frame):
                return frame
            seen.append(frame)

    def nothing_pending(self) -> bool:
        return not self.client.input_buffer

    def expect_close(self, timeout: float = 10.0) -> Tuple[int, Optional[str]]:
        """Read until the server closes; return (code, reason). Fails on a data frame."""
        try:
            message = self.client.receive(timeout=timeout)
        except simple_websocket.ConnectionClosed as exc:
            return exc.reason, exc.message
        raise AssertionError(f"expected a close, got {message!r}")

    def close(self) -> None:
        try:
            self.client.close()
        except simple_websocket.ConnectionClosed:
            pass
        self.client.thread.join(5)


def raw_upgrade(port: int, path: str = "/ws", headers: Optional[Dict[str, str]] = None,
                rcvbuf: Optional[int] = None) -> Tuple[socket.socket, bytes]:
    """Open a TCP connection, send an upgrade request, return (socket, response head).

    ``headers`` are added; a ``Host`` among them replaces ``127.0.0.1:<port>``.
    """
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    extra = dict(headers or {})
    host = extra.pop("Host", f"127.0.0.1:{port}")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    sock.settimeout(None)
    return sock, head


def read_frame(sock: socket.socket, timeout: float = 10.0) -> Tuple[int, bytes]:
    """Read one unmasked server frame: (opcode, payload)."""
    sock.settimeout(timeout)
    try:
        def exact(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise ConnectionError("socket closed")
                data += chunk
            return data
        b1, b2 = exact(2)
        size = b2 & 0x7F
        if size == 126:
            size = int.from_bytes(exact(2), "big")
        elif size == 127:
            size = int.from_bytes(exact(8), "big")
        return b1 & 0x0F, exact(size)
    finally:
        sock.settimeout(None)


def socket_closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed or reset the connection (reading whatever is left)."""
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if not sock.recv(65536):
                return True
    except OSError:
        return True


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``freeze()`` silently stalls current connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self._pairs: List[Tuple[socket.socket, socket.socket, threading.Event]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="test-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            frozen = threading.Event()
            self._pairs.append((client, upstream, frozen))
            threading.Thread(target=self._pump, args=(client, upstream, frozen), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, frozen: threading.Event) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.1)
                if frozen.is_set():
                    continue  # hold everything: neither side hears anything again
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            return

    def freeze(self) -> None:
        for _, _, frozen in self._pairs:
            frozen.set()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        for a, b, _ in self._pairs:
            a.close()
            b.close()


def proxied(dsn: str) -> Tuple[TcpProxy, str]:
    """A TcpProxy in front of ``dsn``'s server and the DSN that goes through it.

    Skips the test when ``dsn`` does not name a server on 127.0.0.1.
    """
    port = int(dsn.rsplit(":", 1)[1].split("/")[0]) if "127.0.0.1:" in dsn else None
    if port is None:
        pytest.skip("the proxy needs a TCP database address")
    proxy = TcpProxy(port)
    return proxy, dsn.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")


class Recorder:
    """A sink that remembers what the listener handed it."""

    def __init__(self):
        self.notes = []
        self.batches = 0
        self.resyncs = []
        self.lock = threading.Lock()

    def on_notifications(self, batch):
        with self.lock:
            self.batches += 1
            self.notes.extend(batch)

    def on_resync(self, reason):
        with self.lock:
            self.resyncs.append(reason)

    def payloads(self):
        with self.lock:
            return [n.payload for n in self.notes]


def pg_notify(conn: Any, channel: str, payload: str) -> None:
    """NOTIFY ``payload`` on ``channel`` from ``conn`` (leaves at commit; at once in autocommit)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))
