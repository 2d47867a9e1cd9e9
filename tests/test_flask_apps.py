"""A Flask-SQLAlchemy app as most are written, under real gunicorn and PostgreSQL: open
sockets hold none of its pooled connections, and its routes publish inside ``db.session``'s
transaction on psycopg2 and on psycopg 3, given the SQLAlchemy URL the app has."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List
import re
import subprocess
import sys

import psycopg2
import pytest

from pgws_sync import migrate
from pgws_sync.testing import Client, Server, free_port

from .durable_helpers import new_log
from .helpers import Gunicorn, ROOT, Ws, wait_for

APP = "tests.apps.sqla_app:app"


def sqla_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture(scope="module")
def schema(pg_dsn: str) -> str:
    schema = new_log(pg_dsn)
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS sqla_notes (id serial PRIMARY KEY, "
                    "text text NOT NULL)")
    conn.close()
    return schema


def serve_sqla(pg_dsn: str, schema: str, driver: str, *, app_name: str,
               hold: bool = False) -> Gunicorn:
    env = {"PGWS_DB_URI": sqla_url(pg_dsn, driver), "PGWS_LOG_SCHEMA": schema,
           "PGWS_APP_NAME": app_name, "PGWS_HOLD_REQUEST": "1" if hold else "0"}
    return Gunicorn(APP, env=env, threads=64).wait_up()


def post(server: Gunicorn, body: Dict[str, Any], timeout: float = 10.0) -> Dict[str, Any]:
    request = urllib.request.Request(server.url("/notes"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST /notes -> {exc.code}: {exc.read().decode()[:2000]}") from None


def app_sessions(dsn: str, app_name: str) -> Dict[str, int]:
    """The app's pooled connections by state (pg_stat_activity)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state, count(*) FROM pg_stat_activity "
                        "WHERE application_name = %s GROUP BY state", (app_name,))
            return {state: int(n) for state, n in cur.fetchall()}
    finally:
        conn.close()


def open_subscribed(server: Gunicorn, n: int) -> List[Ws]:
    sockets = []
    for i in range(n):
        ws = Ws(server.ws_url())
        sockets.append(ws)
        assert ws.recv_json()["event"] == "welcome"
        ws.client.send(json.dumps({"action": "subscribe", "channel": "notes", "id": "s"}))
        reply = ws.recv_until(lambda f: f.get("reply_to") == "s")
        assert reply["event"] == "subscribed", reply
    return sockets


def read_notes(ws: Ws) -> Any:
    return ws.recv_until(lambda f: f.get("channel") == "notes" and "offset" in f)["payload"]


@pytest.fixture
def closing() -> Iterator[List[Any]]:
    made: List[Any] = []
    yield made
    for thing in made:
        if isinstance(thing, Ws):
            thing.close()
        else:
            thing.stop()


def test_twenty_sockets_hold_no_pooled_connection_and_posts_still_answer(pg_dsn, schema,
                                                                        closing):
    """A pool of 3 + 2; 20 sockets whose on_connect and can_subscribe query db.session."""
    name = f"sqla_{os.getpid()}_pool"
    server = serve_sqla(pg_dsn, schema, "psycopg2", app_name=name)
    closing.append(server)
    sockets = open_subscribed(server, 20)
    closing.extend(sockets)
    states = app_sessions(pg_dsn, name)
    assert states.get("idle in transaction", 0) <= 1, states
    assert sum(states.values()) <= 5, states
    teardowns = json.loads(urllib.request.urlopen(server.url("/debug/stats")).read())["teardowns"]
    assert teardowns >= 40  # each upgrade's and each can_subscribe's app context ended
    started = time.monotonic()
    note = post(server, {"text": "hello"})
    assert time.monotonic() - started < 2.0  # a pooled connection at once (timeout: 3 s)
    for ws in sockets:
        assert read_notes(ws) == {"id": note["id"], "text": "hello"}


def test_hold_request_keeps_the_upgrade_s_session_for_the_socket_s_life(pg_dsn, schema, closing):
    name = f"sqla_{os.getpid()}_hold"
    server = serve_sqla(pg_dsn, schema, "psycopg2", app_name=name, hold=True)
    closing.append(server)
    closing.extend(open_subscribed(server, 2))
    wait_for(lambda: app_sessions(pg_dsn, name).get("idle in transaction", 0) == 2,
             message="two connections held by two sockets")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_route_publishes_inside_db_session_commit_once_rollback_never(pg_dsn, schema, driver,
                                                                        closing):
    server = serve_sqla(pg_dsn, schema, driver, app_name=f"sqla_{os.getpid()}_{driver}")
    closing.append(server)
    [ws] = open_subscribed(server, 1)
    closing.append(ws)
    assert post(server, {"text": "never", "rollback": True}) == {"rolled_back": True}
    first = post(server, {"text": "first"})
    second = post(server, {"text": "second", "json": True})
    assert read_notes(ws) == {"id": first["id"], "text": "first"}  # an object, not a string
    assert read_notes(ws) == {"id": second["id"], "text": "second"}
    with pytest.raises(AssertionError, match="no frame"):
        ws.recv(timeout=0.5)  # the rolled-back one never comes, the others came once


def test_the_live_rows_recipe_runs_as_written(pg_dsn):
    """docs/use-cases/live-rows.md's trigger, as written: each committed change, a message."""
    page = (ROOT / "docs" / "use-cases" / "live-rows.md").read_text()
    recipe = re.search(r"<!-- recipe: live-rows -->\n```sql\n(.*?)```", page, re.S).group(1)
    migrate(pg_dsn)
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:  # one transaction, rolled back: nothing stays behind
            cur.execute(recipe)
            cur.execute("SELECT max(seq) FROM pgws_sync.messages")
            before = cur.fetchone()[0] or 0
            cur.execute("INSERT INTO orders (state) VALUES ('new') RETURNING id")
            order = cur.fetchone()[0]
            cur.execute("UPDATE orders SET state = 'paid' WHERE id = %s", (order,))
            cur.execute("DELETE FROM orders WHERE id = %s", (order,))
            cur.execute("SELECT channel, payload FROM pgws_sync.messages WHERE seq > %s "
                        "ORDER BY seq", (before,))
            rows = [(channel, json.loads(payload)) for channel, payload in cur.fetchall()]
    finally:
        conn.rollback()
        conn.close()
    assert rows == [("orders", {"op": "insert", "row": {"id": order, "state": "new"}}),
                    ("orders", {"op": "update", "row": {"id": order, "state": "paid"}}),
                    ("orders", {"op": "delete", "row": {"id": order, "state": "paid"}})]


def test_flask_run_serves_the_example_s_sockets(pg_dsn, tmp_path):
    """`flask --app examples.notes run`: the development server serves sockets too."""
    migrate(pg_dsn)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGWS_DB_URI"] = sqla_url(pg_dsn, "psycopg")
    log = open(tmp_path / "flask.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "examples.notes", "run",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        server = Server.__new__(Server)  # the address of the one flask run started
        server.port = port

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "flask.log").read_text())
            try:
                return urllib.request.urlopen(server.url("/healthz"), timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, 30, "flask run to answer /healthz")
        http = server.http()
        status, body = http.post("/login/dev")
        channel = json.loads(body)["channel"]
        with Client(server, cookies=http) as tab:
            tab.subscribe(channel)
            status, body = http.post("/notes", {"text": "from flask run"})
            assert status == 201, body
            assert tab.next_message(channel)["text"] == "from flask run"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
