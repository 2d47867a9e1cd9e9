"""``pgws-sync serve`` as a drop-in for postgres-websockets: its environment, URLs and start-up."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from pgws_sync.errors import ConfigError, DatabaseUnreachable
from pgws_sync.sources.postgres import wait_for_database

from ..clirun import COMMAND, no_database_env, run_cli
from ..helpers import ROOT, Gunicorn, Ws, http_get, pg_notify, wait_for
from ..jwt_helpers import SECRET, DbListener, make_token, upgrade_refused
from ..pgserver import PgServer, free_port


class JwtServe(Gunicorn):
    """``python -m pgws_sync serve`` configured only by PGWS_* variables, as postgres-websockets."""

    # Only the command differs from Gunicorn's, so its __init__ is replaced, not called.
    def __init__(self, env: Dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgws-jwt-serve-{self.port}.log"
        full = no_database_env(PGWS_HOST="127.0.0.1", PGWS_PORT=str(self.port), **env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*COMMAND, "serve", "--threads", "16", *args], cwd=ROOT,
                                     env=full, stdout=self._log, stderr=subprocess.STDOUT)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


# ------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("static")
    (folder / "index.html").write_text("<h1>index page</h1>")
    (folder / "sub").mkdir()
    (folder / "sub" / "index.html").write_text("sub index")
    (folder / "app.js").write_text("console.log('hi');")
    return folder


@pytest.fixture(scope="module")
def listen() -> str:
    return f"jwt-cli-{os.getpid()}"


@pytest.fixture(scope="module")
def served(pg_dsn: str, root: Path, listen: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtServe]:
    secret_file = tmp_path_factory.mktemp("secret") / "jwt"
    secret_file.write_text(SECRET + "\n")
    server = JwtServe({"PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": f"@{secret_file}",
                       "PGWS_LISTEN_CHANNEL": listen, "PGWS_ROOT_PATH": str(root),
                       "PGWS_META_CHANNEL": "meta", "PGWS_POOL_SIZE": "3",
                       "PGWS_CHECK_LISTENER_INTERVAL": "1000"})
    try:
        yield server.wait_up()
    finally:
        server.stop()


def test_serves_sockets_from_the_environment_with_an_at_file_secret(
        served: JwtServe, listen: str, sender: Any, channel: str) -> None:
    tok = make_token({"mode": "rw", "channels": [channel]})
    reader = Ws(served.ws_url(f"/{tok}"))
    writer = Ws(served.ws_url(f"/{channel}/{tok}"))
    try:
        pg_notify(sender, listen, json.dumps({"channel": channel, "from": "db"}))
        assert reader.recv_json()["from"] == "db"
        assert writer.recv_json()["from"] == "db"
        writer.client.send("from the browser")
        message = json.loads(reader.recv())
        assert (message["event"], message["channel"], message["payload"]) == (
            "WebsocketMessage", channel, "from the browser")
    finally:
        reader.close()
        writer.close()


def test_static_files_from_the_root_path(served: JwtServe) -> None:
    assert http_get(served.url("/")) == (200, "<h1>index page</h1>")
    assert http_get(served.url("/app.js")) == (200, "console.log('hi');")
    assert http_get(served.url("/sub/")) == (200, "sub index")
    assert http_get(served.url("/sub")) == (200, "sub index")
    assert http_get(served.url("/missing.html"))[0] == 404
    assert http_get(served.url("/../../etc/passwd"))[0] == 404
    assert http_get(served.url("/%2e%2e/%2e%2e/etc/passwd"))[0] == 404
    status, body = http_get(served.url("/healthz"))
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_refusal_over_the_cli(served: JwtServe) -> None:
    assert upgrade_refused(served, "/c/" + make_token({"mode": "r", "exp": 1})) == (
        400, "Token expired")


def test_jwt_secret_flag_overrides_the_environment(pg_dsn: str, channel: str) -> None:
    other = "another-secret-that-is-long-enough"
    server = JwtServe({"PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET},
                      "--jwt-secret", other).wait_up()
    try:
        status, body = upgrade_refused(server, f"/{channel}/" + make_token({"mode": "r"}))
        assert (status, body) == (400, "Error: invalid signature")
        ws = Ws(server.ws_url(f"/{channel}/" + make_token({"mode": "r"}, secret=other)))
        ws.close()
    finally:
        server.stop()


def test_base64_secret_and_default_listen_channel(pg_dsn: str, sender: Any, channel: str) -> None:
    raw = os.urandom(40)
    encoded = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    server = JwtServe({"PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": encoded,
                       "PGWS_JWT_SECRET_BASE64": "true"}).wait_up()
    try:
        ws = Ws(server.ws_url(f"/{channel}/" + make_token({"mode": "r"}, secret=raw)))
        try:
            pg_notify(sender, "postgres-websockets-listener", json.dumps({"channel": channel}))
            assert ws.recv_json() == {"channel": channel}
        finally:
            ws.close()
    finally:
        server.stop()


def test_sigterm_closes_sockets_with_1001_and_sends_connection_close(pg_dsn: str,
                                                                     channel: str) -> None:
    listen = f"jwt-term-{os.getpid()}"
    server = JwtServe({"PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET,
                       "PGWS_LISTEN_CHANNEL": listen, "PGWS_META_CHANNEL": "meta"}).wait_up()
    db = DbListener(pg_dsn, listen)
    ws = Ws(server.ws_url(f"/{channel}/" + make_token({"mode": "r"})))
    try:
        assert json.loads(db.next(skip_meta=False))["event"] == "ConnectionOpen"
        server.proc.send_signal(signal.SIGTERM)
        assert ws.expect_close()[0] == 1001
        closed = json.loads(db.next(skip_meta=False))
        assert (closed["event"], closed["payload"]) == ("ConnectionClose", channel)
        assert server.proc.wait(20) == 0
    finally:
        ws.close()
        db.close()
        server.stop()


# ------------------------------------------------------------ start-up retries


def test_retries_then_exits_1_when_the_database_stays_down() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = run_cli("serve", env=no_database_env(PGWS_DB_URI=dsn, PGWS_JWT_SECRET=SECRET,
                                                  PGWS_RETRIES="2", PGWS_PORT=str(free_port())))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "cannot reach the database (attempt 1 of 2)" in lines[0] and "retrying in 1s" in lines[0]
    assert lines[-1].startswith("pgws-sync: cannot reach the database after 2 attempts "
                                "(PGWS_RETRIES=2): ")
    assert "Connection refused" in lines[-1] or "connect" in lines[-1]
    assert len(lines) == 2


def test_retry_forever_until_the_database_comes_up(pg_server: PgServer, channel: str) -> None:
    pg_server.stop()
    server = JwtServe({"PGWS_DB_URI": pg_server.dsn, "PGWS_JWT_SECRET": SECRET,
                       "PGWS_RETRIES": "0"})
    try:
        wait_for(lambda: "cannot reach the database (attempt 2)" in server.log(), 20,
                 "two failed attempts")
        assert server.proc.poll() is None
        assert "of 0" not in server.log()
        pg_server.start()
        server.wait_up(timeout=40)
        Ws(server.ws_url(f"/{channel}/" + make_token({"mode": "r"}))).close()
    finally:
        server.stop()


# ------------------------------------------------------------ configuration


def secret_env(**extra: str) -> Dict[str, str]:
    return no_database_env(PGWS_JWT_SECRET=SECRET, PGWS_PORT=str(free_port()), **extra)


@pytest.mark.parametrize("env,variable", [
    ({"PGWS_JWT_SECRET": SECRET}, "PGWS_DB_URI"),
    ({"PGWS_DB_URI": "@/nonexistent/dsn", "PGWS_JWT_SECRET": SECRET}, "PGWS_DB_URI"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": "@/nonexistent/secret"},
     "PGWS_JWT_SECRET names the file '/nonexistent/secret', which cannot be read"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": ""}, "PGWS_JWT_SECRET"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": "not base64!",
      "PGWS_JWT_SECRET_BASE64": "true"}, "PGWS_JWT_SECRET is not valid base64url"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET,
      "PGWS_JWT_SECRET_BASE64": "maybe"}, "PGWS_JWT_SECRET_BASE64 must be true or false"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": '{"not": "a jwk"}'},
     "PGWS_JWT_SECRET: the JWT secret is a JSON object but neither a JWK"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET, "PGWS_PORT": "http"},
     "PGWS_PORT must be a whole number"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET, "PGWS_POOL_SIZE": "0"},
     "PGWS_POOL_SIZE must be 1 or more"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET, "PGWS_RETRIES": "-1"},
     "PGWS_RETRIES must be 0 or more"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET,
      "PGWS_ROOT_PATH": "/nonexistent/root"}, "PGWS_ROOT_PATH names '/nonexistent/root'"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET,
      "PGWS_LISTEN_CHANNEL": "x" * 64}, "PGWS_LISTEN_CHANNEL"),
    ({"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET,
      "PGWS_CHECK_LISTENER_INTERVAL": "often"}, "PGWS_CHECK_LISTENER_INTERVAL"),
])
def test_configuration_errors_exit_2_with_one_line_naming_the_variable(
        env: Dict[str, str], variable: str) -> None:
    result = run_cli("serve", env=no_database_env(**{"PGWS_PORT": str(free_port()), **env}))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("pgws-sync: ") and variable in line, line


def test_channel_flag_is_refused_with_a_jwt_secret() -> None:
    result = run_cli("serve", "--channel", "x",
                     env=secret_env(PGWS_DB_URI="postgresql://127.0.0.1/x"))
    assert result.returncode == 2
    assert "--channel" in one_line(result.stderr)


def test_wait_for_database_counts_attempts(pg_dsn: str) -> None:
    assert wait_for_database(pg_dsn, 3) == 1
    calls = []
    with pytest.raises(DatabaseUnreachable, match="after 3 attempts"):
        wait_for_database(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", 3,
                          first_delay=0.01, max_delay=0.02,
                          on_retry=lambda n, reason, delay: calls.append((n, delay)))
    assert calls == [(1, 0.01), (2, 0.02)]
