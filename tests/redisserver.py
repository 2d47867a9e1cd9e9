"""A throw-away redis-server for tests: 127.0.0.1:<port>, no persistence, killable, restartable."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Optional

import redis

from . import programs
from .helpers import wait_for
from .pgserver import free_port


class RedisServer:
    """One redis-server process on a fixed free port of 127.0.0.1, run in the foreground.

    ``stop()`` kills it with SIGKILL (a crash: no goodbye to clients) or, with
    ``graceful=True``, SIGTERM; ``start()`` again serves on the same port.
    ``unix_socket=True`` also serves on a unix socket (``unix_url``).
    """

    def __init__(self, port: Optional[int] = None, *, unix_socket: bool = False) -> None:
        self.binary = programs.require("redis-server")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgws-redis-"))
        self.log_path = self.dir / "redis.log"
        self.socket_path = self.dir / "redis.sock" if unix_socket else None
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self._log: Optional[IO[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.socket_path is not None, "made without unix_socket=True"
        return f"unix://{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 20.0) -> "RedisServer":
        """Start the server and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        if self.socket_path is not None:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1,
                             socket_timeout=1)

        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"redis-server exited with {code}:\n{self.log()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(answers, timeout, message=f"redis-server on port {self.port} to answer PING")
        finally:
            client.close()
        return self

    def stop(self, graceful: bool = False, timeout: float = 20.0) -> None:
        """Kill the server (SIGKILL, a crash) or, if ``graceful``, shut it down with SIGTERM."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> "redis.Redis":
        """A plain redis-py client of this server (close it when done)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=5,
                           socket_timeout=5)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
