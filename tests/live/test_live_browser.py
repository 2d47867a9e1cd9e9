"""pgws.js's live() in Chromium: a page follows a watched table across a server restart, and its
rows end equal to the table's."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
from playwright.sync_api import Page

from pgws_sync import watch_table

from ..durable_helpers import new_log, wait_numbered
from ..helpers import Gunicorn, wait_for
from .test_watch import new_table


def serve(pg_dsn: str, log: str, port: Any = None) -> Gunicorn:
    return Gunicorn("tests.apps.live_app:app", workers=2, threads=16, port=port,
                    env={"PGWS_DB_URI": pg_dsn, "PGWS_LOG_SCHEMA": log}).wait_up()


def test_a_page_follows_a_table_across_a_server_restart(pg_dsn: str, page: Page) -> None:
    log = new_log(pg_dsn)
    db = psycopg2.connect(pg_dsn)
    db.autocommit = True
    table = new_table(db, "id int PRIMARY KEY, v int NOT NULL, customer int")
    with db.cursor() as cur:
        cur.execute(f"INSERT INTO {table} SELECT n, 0, 1 FROM generate_series(1, 20) n")
    watch_table(pg_dsn, table, log_schema=log, channel="items")
    server = serve(pg_dsn, log)
    page.goto(server.url("/"))
    page.add_script_tag(url=server.url("/pgws.js"))
    page.evaluate("""table => {
        window.sock = new PgwsSocket("/ws", {minDelay: 100, maxDelay: 400});
        window.changes = 0;
        window.items = sock.live("items", {load: () =>
            fetch(`/load?table=${table}&channel=items`).then((r) => r.json())});
        items.on("change", () => { window.changes += 1; });
    }""", table)
    page.wait_for_function("items.loaded && items.size === 20", timeout=15_000)
    stop = threading.Event()
    written = [0]  # statements committed so far

    def write() -> None:
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        n = 100
        with conn.cursor() as cur:
            while not stop.is_set():
                n += 1
                written[0] += 1
                cur.execute(f"UPDATE {table} SET v = v + 1 WHERE id = %s", (n % 20 + 1,))
                if n % 5 == 0:
                    cur.execute(f"INSERT INTO {table} VALUES (%s, 0, 1)", (n,))
                if n % 7 == 0:
                    cur.execute(f"DELETE FROM {table} WHERE id = (SELECT max(id) FROM {table})")
                time.sleep(0.01)
        conn.close()

    writer = threading.Thread(target=write, name="writer", daemon=True)
    writer.start()
    try:
        page.wait_for_function("window.changes > 30", timeout=15_000)
        port = server.port
        server.stop()  # mid-stream: the page reconnects and resumes after its last offset
        during = written[0]
        wait_for(lambda: written[0] > during + 20, message="20 changes while the server is down")
        server = serve(pg_dsn, log, port=port)
        seen = page.evaluate("window.changes")
        page.wait_for_function(f"window.changes > {seen + 20}", timeout=20_000)  # resumed, live
        stop.set()
        writer.join(10)
        wait_numbered(pg_dsn, log)
        with db.cursor() as cur:
            cur.execute(f"SELECT id, v, customer FROM {table} ORDER BY id")
            expected = [{"id": i, "v": v, "customer": c} for i, v, c in cur.fetchall()]
            cur.execute(f"SELECT head FROM {log}.streams WHERE channel = 'items'")
            head = cur.fetchone()[0]
        page.wait_for_function("h => sock.position('items') && sock.position('items').offset === h",
                               arg=head, timeout=20_000)
        rows = page.evaluate("items.rows().slice().sort((a, b) => a.id - b.id)")
        assert rows == expected
        assert page.evaluate("window.changes") > 50
    finally:
        stop.set()
        server.stop()
        db.close()


def test_the_demo_page_follows_its_table_across_a_server_restart(tmp_path: Any,
                                                                 page: Page) -> None:
    """``pgws-sync demo``'s page: the table's rows through live(), across a restart of the
    server, equal to the table's (a row changes every second: they meet between changes)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from ..clirun import COMMAND, no_database_env
    from ..helpers import ROOT
    from ..pgserver import free_port
    from ..test_cli import Lines

    port = free_port()
    env = no_database_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([*COMMAND, "demo", "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = Lines(proc.stdout)  # type: ignore[arg-type]
        dsn = lines.value("database", timeout=40)
        page.goto(lines.value("page", timeout=40))
        page.wait_for_function("document.querySelectorAll('#rows tr').length === 5")
        page.wait_for_function("Number(document.getElementById('updates').textContent) >= 2")
        db = psycopg2.connect(dsn)
        db.autocommit = True

        def equal() -> bool:
            with db.cursor() as cur:
                cur.execute("SELECT symbol, price::text FROM demo_prices ORDER BY symbol")
                table = [[s, p] for s, p in cur.fetchall()]
            shown = page.eval_on_selector_all(
                "#rows tr", "trs => trs.map(tr => [tr.children[0].textContent, "
                "tr.children[1].textContent])")
            return sorted(shown) == table

        page.click("#restart")
        page.wait_for_function("document.getElementById('state').textContent === 'reconnecting'")
        page.wait_for_function("document.getElementById('state').textContent === 'live'",
                               timeout=30_000)
        before = int(page.text_content("#updates") or 0)
        page.wait_for_function(f"Number(document.getElementById('updates').textContent) > "
                               f"{before + 1}", timeout=30_000)
        wait_for(equal, 15, message="the page's rows to equal the table's")
        assert page.evaluate("prices.size") == 5
        db.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
