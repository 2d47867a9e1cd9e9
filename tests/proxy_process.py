"""A proxy program (nginx, HAProxy) run by a test: its configuration in a folder of its own,
on a free port of 127.0.0.1, in the foreground; ``stop()`` ends it and removes the folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from .helpers import free_port, wait_for


class ProxyProcess:
    """The process and its folder; a subclass writes the configuration and calls :meth:`run`."""

    name = "proxy"

    def __init__(self, binary: str, *, port: Optional[int] = None) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix=f"pgws-{self.name}-"))
        self.port = port or free_port()
        self.log_path = self.dir / "proxy.log"

    def run(self, command: List[str]) -> None:
        """Start ``command``; wait until the port accepts connections and :meth:`ready`."""
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._accepts, 20, f"{self.name} to accept connections")

    def ready(self) -> bool:
        """What else must be there before the proxy counts as started."""
        return True

    def _accepts(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{self.log()}")
        if not self.ready():
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def check_haproxy(binary: str, config: Path) -> None:
    """Fail unless ``haproxy -c`` accepts ``config``."""
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
    if check.returncode:
        raise AssertionError(f"haproxy refused {config}: {check.stdout}{check.stderr}")
