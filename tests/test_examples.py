"""The examples run under gunicorn exactly as their docstrings say, and deliver."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgws_sync import migrate

from .helpers import Gunicorn, ROOT, Ws, http_get, pg_notify, wait_for
from .pgserver import free_port


def run_example(module, pg_dsn):
    return Gunicorn(f"examples.{module}:app", env={"PGWS_DB_URI": pg_dsn}).wait_up()


def test_minimal_example(pg_dsn, sender):
    g = run_example("minimal", pg_dsn)
    try:
        ws = Ws(g.ws_url())  # registered before its handshake's answer
        assert _public_health(g)
        pg_notify(sender, "pgws", 'default,{"message": "hello, world"}')
        assert ws.recv_json()["payload"] == {"message": "hello, world"}
        ws.close()
    finally:
        g.stop()


def test_audiences_example(pg_dsn, sender):
    g = run_example("audiences", pg_dsn)
    try:
        both = Ws(g.ws_url(), headers={"X-Teams": "noosa, coolum"})
        coolum = Ws(g.ws_url(), headers={"X-Teams": "coolum"})
        assert _public_health(g)
        pg_notify(sender, "updates", 'noosa,{"surf": "2m"}')
        pg_notify(sender, "updates", 'coolum,{"surf": "1m"}')
        assert both.recv_json()["payload"] == {"surf": "2m"}
        assert both.recv_json()["payload"] == {"surf": "1m"}
        assert coolum.recv_json()["payload"] == {"surf": "1m"}
        both.close()
        coolum.close()
    finally:
        g.stop()


def _public_health(g):
    """The example's health answer is the public one: no detail without health_detail."""
    return http_get(g.url("/healthz")) == (200, '{"status": "ok"}')


@pytest.mark.parametrize("module", ["minimal", "audiences", "push", "logout"])
def test_examples_document_how_to_run(module):
    text = (Path(__file__).parent.parent / "examples" / f"{module}.py").read_text()
    assert "gunicorn -c python:pgws_sync.gunicorn" in text and f"examples.{module}:app" in text


def test_push_example(pg_dsn, sender):
    import http.cookiejar
    import urllib.request

    g = run_example("push", pg_dsn)
    try:
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = browser.open(g.url("/")).read().decode()
        assert "/pgws.js" in page and "guest-" in page
        cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
        ws = Ws(g.ws_url(), headers={"Cookie": cookie})
        assert "tabWindowId" in ws.recv_json()
        ws.client.send('{"joinRoom": "lobby"}')
        assert ws.recv_json() == {"event": "joined", "room": "lobby"}
        ws.client.send('{"joinRoom": "team-bob"}')  # a guest is in no team
        assert ws.recv_json()["event"] == "error"
        pg_notify(sender, "BackgroundPush", '{"pushToRoom": "lobby", "payload": {"text": "hi all"}}')
        assert ws.recv_json() == {"text": "hi all"}
        browser.open(g.url("/login/alice")).read()  # the guest's open socket becomes alice's
        # committed before the login answered, so it is handled before this push
        assert _post_notify(g, "alice")
        assert ws.recv_json() == {"text": "hi alice"}
        ws.close()
    finally:
        g.stop()


def _post_notify(g, user):
    import urllib.request

    req = urllib.request.Request(g.url(f"/notify/{user}"), data=b'{"text": "hi alice"}',
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status == 202



def test_push_example_page_in_chromium(pg_dsn, sender, page):
    g = run_example("push", pg_dsn)
    try:
        page.goto(g.url("/"))
        page.wait_for_function("document.getElementById('state').textContent === 'live'")
        page.wait_for_function("document.getElementById('tab').textContent.length >= 22")
        page.wait_for_function("document.getElementById('log').textContent.includes('joined the lobby')")
        pg_notify(sender, "BackgroundPush", '{"pushToRoom": "lobby", "payload": {"text": "hi all"}}')
        page.wait_for_function("document.getElementById('log').textContent.includes('hi all')")
    finally:
        g.stop()


# ------------------------------------------------ each example's "Run:" line, literally


def run_line(module: str) -> str:
    """The shell command an example's docstring gives under "Run:", continuation lines joined."""
    text = (Path(__file__).parent.parent / "examples" / f"{module}.py").read_text()
    match = re.search(r"^Run:\s+(.*?)(?=^\S|^\s+\(|\Z)", text.split('"""')[1], re.S | re.M)
    assert match, f"examples/{module}.py has no Run: line"
    return " ".join(line.strip().rstrip("\\").strip() for line in match.group(1).splitlines()
                    if line.strip())


def run_as_documented(module: str, pg_dsn: str):
    """Start the example with its documented command, word for word, in a shell: only the
    database (the documented localhost one becomes this test's) and, through gunicorn's own
    GUNICORN_CMD_ARGS, the port (8000 may be taken) differ."""
    sqlalchemy_url = pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    command = run_line(module).replace("PGWS_DB_URI=postgresql://localhost/postgres",
                                       f"PGWS_DB_URI='{pg_dsn}'").replace(
        "PGWS_DB_URI=postgresql+psycopg://localhost/postgres", f"PGWS_DB_URI='{sqlalchemy_url}'")
    port = free_port()
    env = dict(os.environ, GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    env.pop("SECRET_KEY", None)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"pgws-example-{port}.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    g = Gunicorn.__new__(Gunicorn)  # the helper's methods, around the documented process
    g.port, g.proc, g._log, g.log_path = port, proc, log, Path(log.name)
    return g.wait_up()


@pytest.mark.parametrize("module", ["minimal", "audiences", "pubsub", "push", "jwt_gateway",
                                    "durable", "notes", "chat", "logout"])
def test_each_example_starts_with_its_documented_command(module, pg_dsn):
    g = run_as_documented(module, pg_dsn)
    try:
        workers = 2 if "-w 2" in run_line(module) else 1
        wait_for(lambda: len(g.worker_pids()) == workers, message=f"{workers} workers")
    finally:
        g.stop()


def test_push_logins_hold_in_every_worker_when_run_as_documented(pg_dsn):
    """The documented push example runs two workers: a login made in one is known to both."""
    import http.cookiejar
    import urllib.request

    g = run_as_documented("push", pg_dsn)
    try:
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        browser.open(g.url("/login/alice")).read()
        for _ in range(20):  # sockets spread over both workers (2**-19 that all land on one)
            conn = Ws(g.ws_url("/ws"), headers={
                "Cookie": "; ".join(f"{c.name}={c.value}" for c in jar)})
            conn.recv_json()  # tabWindowId
            conn.client.send('{"joinRoom": "team-alice"}')  # only alice may
            assert conn.recv_json() == {"event": "joined", "room": "team-alice"}
            conn.close()
            page = browser.open(g.url("/")).read().decode()
            assert re.search(r'const who = "alice"', page), page[:300]
    finally:
        g.stop()


def test_durable_example_resumes_a_tab_that_was_away(pg_dsn):
    """Run as documented (migrate, then two workers): a POSTed state reaches a subscriber with
    an offset, and one posted while it was away comes when it resumes with since."""
    import urllib.request

    def post_state(g, order_id, state):
        req = urllib.request.Request(g.url(f"/orders/{order_id}"), data=json.dumps(state).encode(),
                                     headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=10).status == 202

    g = run_as_documented("durable", pg_dsn)
    try:
        ws = Ws(g.ws_url("/ws"))
        ws.client.send(json.dumps({"action": "subscribe", "channel": "orders", "id": 1}))
        reply = ws.recv_json()
        assert reply["event"] == "subscribed"
        post_state(g, 42, "shipped")
        first = ws.recv_json()
        assert first["payload"] == {"id": 42, "state": "shipped"}
        assert first["offset"] == reply["offset"] + 1
        ws.close()
        post_state(g, 7, "paid")  # while away
        ws = Ws(g.ws_url("/ws"))
        ws.client.send(json.dumps({"action": "subscribe", "channel": "orders", "id": 2,
                                   "since": first["offset"], "epoch": first["epoch"]}))
        assert ws.recv_json()["event"] == "subscribed"
        assert ws.recv_json()["payload"] == {"id": 7, "state": "paid"}
        ws.close()
    finally:
        g.stop()


@pytest.mark.parametrize("module, tests, driver", [
    ("notes", 5, "psycopg"), ("notes", 5, "psycopg2"), ("chat", 3, "psycopg")])
def test_examples_pass_their_own_tests_written_with_pgws_sync_testing(pg_dsn, module, tests,
                                                                      driver):
    """examples/test_<module>.py, run as its docstring says (the app's SQLAlchemy URL given,
    on psycopg 3 and on psycopg2)."""
    migrate(pg_dsn)
    url = pg_dsn.replace("postgresql://", f"postgresql+{driver}://", 1)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PG")}
    env["PGWS_DB_URI"] = url
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"examples/test_{module}.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{tests} passed" in result.stdout, result.stdout[-2000:]


def test_notes_example_page_in_chromium(pg_dsn, page):
    """The notes page, logged in by the browser itself: a saved note appears live, and one
    saved while the page was closed appears after a reload (sessionStorage resumes it)."""
    migrate(pg_dsn)
    url = pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    g = Gunicorn("examples.notes:app", env={"PGWS_DB_URI": url}).wait_up()
    try:
        page.goto(g.url("/healthz"))
        page.evaluate("fetch('/login/chromium', {method: 'POST'})")
        page.goto(g.url("/"))
        save = ("text => fetch('/notes', {method: 'POST', headers: {'Content-Type': "
                "'application/json'}, body: JSON.stringify({text})})")
        page.wait_for_function("document.body.dataset.live === 'yes'")  # subscribed
        page.evaluate(save, "first note")
        page.wait_for_function("document.getElementById('notes').textContent.includes('first note')")
        page.goto(g.url("/healthz"))  # the page is gone
        page.evaluate(save, "while away")
        page.goto(g.url("/"))
        page.wait_for_function("document.getElementById('notes').textContent.includes('while away')")
    finally:
        g.stop()
