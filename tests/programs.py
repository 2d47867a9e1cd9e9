"""The system programs some tests run (chromium, node, tsc, redis-server, psql, pgbouncer, prometheus,
nginx, haproxy):
found on PATH, and a test whose program is missing is skipped with a reason naming it.

``tools/install-test-programs`` (run by ``make test`` and CI) installs them as root with
apt-get; it looks for them the same way.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import pytest

#: The Debian package that provides each program.
PACKAGES = {"chromium": "chromium", "node": "nodejs", "tsc": "node-typescript", "redis-server": "redis-server", "psql": "postgresql-client",
            "pgbouncer": "pgbouncer", "prometheus": "prometheus", "nginx": "nginx",
            "haproxy": "haproxy"}
#: Searched after PATH: Debian puts daemons such as pgbouncer there, off a user's PATH.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find(name: str, variable: Optional[str] = None) -> Optional[str]:
    """The program's path: ``$variable`` when set, else ``name`` on PATH or in sbin; or None."""
    configured = os.environ.get(variable) if variable else None
    if configured:
        return configured
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
    return shutil.which(name, path=search)


def require(name: str, variable: Optional[str] = None) -> str:
    """The program's path (see ``find``); skips the calling test when it is not installed."""
    path = find(name, variable)
    if path is None:
        pytest.skip(missing(name, variable))
    return path


def missing(name: str, variable: Optional[str] = None) -> str:
    """The skip reason: which program is missing and how to get it."""
    alternative = f", or set {variable} to one" if variable else ""
    return (f"{name} is not installed: `make test` as root installs it (Debian: apt-get install "
            f"{PACKAGES[name]}){alternative}")
