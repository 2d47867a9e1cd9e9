"""Running the pgws-sync command in tests: `serve` processes and environments without a database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from .helpers import ROOT, Gunicorn, http_get, wait_for
from .pgserver import free_port

COMMAND = [sys.executable, "-m", "pgws_sync"]


def no_database_env(**extra: str) -> Dict[str, str]:
    """This process's environment without any PG* variable (libpq's, PGWS_*), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PGWS_DRAIN_SECONDS"] = "0"  # a server closes its sockets at once (1001) unless asked
    env.update(extra)
    return env


def run_cli(*args: str, env: Optional[Dict[str, str]] = None,
            timeout: float = 20.0) -> "subprocess.CompletedProcess[str]":
    """Run ``python -m pgws_sync ARGS`` to completion; output captured as text."""
    return subprocess.run([*COMMAND, *args], cwd=ROOT, env=env or no_database_env(),
                          capture_output=True, text=True, timeout=timeout)


class Serve(Gunicorn):
    """``python -m pgws_sync serve`` on a free port (or ``port``), logging to a file; with
    ``--health-detail`` unless ``health_detail`` is False (:meth:`sockets` reads it)."""

    # Only the command differs from Gunicorn's, so its __init__ is replaced, not called.
    def __init__(self, args: Sequence[str] = (), *, env: Optional[Dict[str, str]] = None,
                 port: Optional[int] = None, health_detail: bool = True) -> None:
        self.port = port or free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgws-serve-{self.port}.log"
        cmd = [*COMMAND, "serve", "--bind", f"127.0.0.1:{self.port}", "--threads", "16",
               *(["--health-detail"] if health_detail else []), *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or no_database_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_up(self, healthy: bool = True, timeout: float = 20.0) -> "Serve":
        super().wait_up(healthy, timeout)
        return self

    def sockets(self) -> int:
        """How many WebSockets the worker has registered (from /healthz's detail)."""
        return int(json.loads(http_get(self.url("/healthz"))[1])["sockets"])

    def wait_sockets(self, count: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.sockets() == count, timeout, f"{count} registered sockets")
