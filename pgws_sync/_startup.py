"""Checks before a server starts: the database address, the address to listen on, the database up."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Tuple

import psycopg2
import psycopg2.extensions

from ._dsn import libpq_dsn
from .errors import CommandFailed, ConfigError, DatabaseUnreachable, first_line
from .sources.postgres import wait_for_database

logger = logging.getLogger(__name__)

#: What a valid DSN looks like, for error messages.
DSN_EXAMPLES = "'postgresql://user@localhost:5432/app' or 'host=localhost dbname=app user=me'"


def check_dsn(dsn: str) -> None:
    """Raise :class:`ConfigError` saying what is wrong with ``dsn`` and what a valid one is."""
    scheme, sep, _ = libpq_dsn(dsn).partition("://")
    if sep and scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"the database address starts with {scheme + '://'!r}, but pgws_sync "
                          f"needs PostgreSQL: for example {DSN_EXAMPLES} (SQLAlchemy's "
                          f"'postgresql+psycopg2://...' and 'postgresql+psycopg://...' work too)")
    dsn = libpq_dsn(dsn)
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        reason = first_line(exc)
        reason = reason[len("invalid dsn: "):] if reason.startswith("invalid dsn: ") else reason
        raise ConfigError(f"cannot read the database DSN ({reason}); for example "
                          f"{DSN_EXAMPLES}") from None


def parse_bind(bind: str) -> Tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as (host, port); :class:`ConfigError` with one line if not."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host.strip("[]") or not port_text:
        raise ConfigError(f"--bind must be HOST:PORT, for example 127.0.0.1:8080 or "
                          f"0.0.0.0:8080, not {bind!r}")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"the port in --bind {bind!r} must be a number from 1 to 65535")
    return host.strip("[]"), int(port_text)


def check_bind(bind: str) -> None:
    """Refuse, with one line each, an address that cannot be bound: bad form, unknown host,
    a port in use or not allowed."""
    host, port = parse_bind(bind)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot use --bind {bind!r}: unknown host {host!r} "
                          f"({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # as gunicorn binds: connections of an earlier server in TIME_WAIT do not count, a
        # socket listening there does (SO_REUSEPORT, which would share it, is not set here)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandFailed(f"{bind} is already in use: stop what listens there or "
                                    f"choose another --bind") from None
            raise CommandFailed(f"cannot listen on {bind}: {exc.strerror}") from None


def wait_until_reachable(dsn: str, retries: int, setting: str = "--retries") -> None:
    """Wait until the database answers: ``retries`` attempts (0: forever), a WARNING with the
    count for each retry; :class:`CommandFailed` when it never did."""

    def retrying(attempt: int, reason: str, delay: float) -> None:
        logger.warning("cannot reach the database (attempt %d%s): %s; retrying in %gs", attempt,
                       f" of {retries}" if retries else "", reason, delay)

    try:
        wait_for_database(dsn, retries, on_retry=retrying, setting=setting)
    except DatabaseUnreachable as exc:
        raise CommandFailed(str(exc)) from None
    except KeyboardInterrupt:
        raise CommandFailed("interrupted while waiting for the database") from None
