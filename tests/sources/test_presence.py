"""The presence store against a real database: writes, announcements, expiry, stop; its
NOTIFY format; ``pgws-sync migrate`` creating its tables."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from typing import Any, List, Optional

import psycopg2
import pytest

from pgws_sync.pubsub.control import parse_control
from pgws_sync.sources.presence import (Answer, Change, Member, PresenceStore, format_changes,
                                        info_value, setup)

from ..helpers import ROOT, wait_for


def test_changes_are_split_under_postgres_limit_and_read_back() -> None:
    members = [Member(str(uuid.uuid4()), {"user": "u" * 50}) for _ in range(300)]
    payloads = format_changes([Change("room", members[:200], members[200:], 200)])
    assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
    controls = [parse_control(p) for p in payloads]
    assert [m["client"] for c in controls for m in c.joins] == [m.client for m in members[:200]]
    assert [m["client"] for c in controls for m in c.leaves] == [m.client for m in members[200:]]
    assert {c.total for c in controls} == {200}


def test_info_must_be_a_small_json_object() -> None:
    assert info_value({"user": "a"}) == {"user": "a"}
    assert info_value(["a"]) == {}  # type: ignore[arg-type]
    assert info_value({"x": object()}) == {}
    assert info_value({"x": "y" * 2000}) == {}


def listen(dsn: str, channel: str) -> Any:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f'LISTEN "{channel}"')
    return conn


def notes(conn: Any) -> List[Any]:
    conn.poll()
    got = [parse_control(n.payload) for n in conn.notifies]
    conn.notifies.clear()
    return got


def count(dsn: str, sql: str, *args: Any) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_the_store_writes_announces_answers_and_cleans_up(pg_dsn: str) -> None:
    scope = f"scope-{uuid.uuid4().hex[:8]}"
    watch = listen(pg_dsn, scope)
    store = PresenceStore(pg_dsn, schema="pgws_sync", scope=scope, timeout=3.0)
    store.start()
    try:
        store.join("room", "c1", {"user": "a"})
        store.join("room", "c2", {})
        answers: List[Optional[Answer]] = []
        done = threading.Event()
        store.query("room", 1, lambda a: (answers.append(a), done.set()))
        assert done.wait(10)
        assert answers[0] is not None and answers[0].total == 2 and len(answers[0].members) == 1
        seen: List[Any] = []
        wait_for(lambda: seen.extend(notes(watch)) or
                 sum(len(c.joins) for c in seen) == 2, 5.0, "two joins announced")
        store.gone("c1")
        wait_for(lambda: seen.extend(notes(watch)) or
                 any(c.leaves == ({"client": "c1", "info": {"user": "a"}},) for c in seen), 5.0)
    finally:
        store.stop()
    assert count(pg_dsn, "SELECT count(*) FROM pgws_sync.presence WHERE scope = %s", scope) == 0
    assert count(pg_dsn, "SELECT count(*) FROM pgws_sync.presence_workers WHERE worker = %s",
                 store.worker) == 0
    wait_for(lambda: seen.extend(notes(watch)) or
             any(c.leaves and c.leaves[0]["client"] == "c2" for c in seen), 5.0, "c2's leave")
    watch.close()


def test_a_dead_worker_s_members_expire_and_leave(pg_dsn: str) -> None:
    scope = f"scope-{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    setup(conn, "pgws_sync")
    with conn.cursor() as cur:  # a worker that stopped beating a minute ago
        cur.execute("INSERT INTO pgws_sync.presence_workers VALUES ('dead', now() - interval '60 s')")
        cur.execute("INSERT INTO pgws_sync.presence (scope, channel, client, worker) "
                    "VALUES (%s, 'room', 'ghost', 'dead')", (scope,))
    watch = listen(pg_dsn, scope)
    store = PresenceStore(pg_dsn, schema="pgws_sync", scope=scope, timeout=3.0)
    store.start()
    try:
        seen: List[Any] = []
        wait_for(lambda: seen.extend(notes(watch)) or
                 any(c.leaves and c.leaves[0]["client"] == "ghost" for c in seen), 5.0)
        assert count(pg_dsn, "SELECT count(*) FROM pgws_sync.presence WHERE worker = 'dead'") == 0
    finally:
        store.stop()
        watch.close()
        conn.close()


def test_migrate_creates_the_presence_tables(pg_dsn: str) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-m", "pgws_sync", "migrate", "--dsn", pg_dsn,
                           "--schema", schema], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"presence tables ready in schema {schema}" in done.stdout
    assert count(pg_dsn, "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s "
                 "AND table_name IN ('presence', 'presence_workers')", schema) == 2
    printed = subprocess.run([sys.executable, "-m", "pgws_sync", "migrate", "--print-sql",
                              "--schema", schema], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert f'CREATE TABLE IF NOT EXISTS "{schema}".presence (' in printed.stdout


def test_a_leave_written_while_the_connection_is_lost_is_written_after_it(pg_dsn: str) -> None:
    scope = f"scope-{uuid.uuid4().hex[:8]}"
    store = PresenceStore(pg_dsn, schema="pgws_sync", scope=scope, timeout=3.0)
    store.start()
    rows = "SELECT count(*) FROM pgws_sync.presence WHERE scope = %s"
    try:
        store.join("room", "c1", {})
        store.join("room", "c2", {})
        wait_for(lambda: count(pg_dsn, rows, scope) == 2, 5.0, "both written")
        assert count(pg_dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE application_name = 'pgws_sync presence'") >= 1
        store.gone("c1")  # its first attempt meets the dead connection
        wait_for(lambda: count(pg_dsn, rows, scope) == 1, 10.0, "c1's leave written")
        assert store.status()["members"] == 1 and store.status()["error"] is None
    finally:
        store.stop()
    assert count(pg_dsn, rows, scope) == 0


def test_a_drained_member_that_does_not_come_back_leaves_after_the_grace(pg_dsn: str) -> None:
    scope = f"scope-{uuid.uuid4().hex[:8]}"
    watch = listen(pg_dsn, scope)
    store = PresenceStore(pg_dsn, schema="pgws_sync", scope=scope, timeout=3.0, grace=1.0)
    store.start()
    rows = "SELECT count(*) FROM pgws_sync.presence WHERE scope = %s"
    try:
        store.join("room", "d1", {"user": "a"})
        store.join("room", "d2", {"user": "b"})
        wait_for(lambda: count(pg_dsn, rows, scope) == 2, 5.0, "both written")
        store.gone("d1", drained=True)
        store.gone("d2", drained=True)
        store.join("room", "d3", {"user": "b"})  # b comes back: it takes d2's place
        seen: List[Any] = []
        wait_for(lambda: seen.extend(notes(watch)) or
                 any(c.joins and c.joins[0].get("replaces") == "d2" for c in seen), 5.0)
        assert not any(c.leaves for c in seen)
        # a never comes back: it leaves once the grace is over (at the next expiry look)
        wait_for(lambda: seen.extend(notes(watch)) or
                 any(c.leaves and c.leaves[0]["client"] == "d1" for c in seen), 8.0)
        assert count(pg_dsn, rows, scope) == 1
    finally:
        store.stop()
        watch.close()


def test_answers_are_reused_until_the_channel_changes(pg_dsn: str) -> None:
    scope = f"scope-{uuid.uuid4().hex[:8]}"
    store = PresenceStore(pg_dsn, schema="pgws_sync", scope=scope, timeout=3.0)
    store.start()

    def ask() -> Answer:
        got: List[Answer] = []
        done = threading.Event()
        store.query("room", 10, lambda a: (got.append(a), done.set()))  # type: ignore[func-returns-value]
        assert done.wait(10) and got[0] is not None
        return got[0]

    try:
        store.join("room", "c1", {})
        first = ask()
        assert first.total == 1 and ask() is first  # the second from the cache
        conn = psycopg2.connect(pg_dsn)  # a row another worker wrote, not announced yet
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO pgws_sync.presence (scope, channel, client, worker) "
                        "VALUES (%s, 'room', 'other', %s)", (scope, store.worker))
        conn.close()
        assert ask() is first
        store.changed("room")  # what the listener does when that worker's NOTIFY arrives
        assert ask().total == 2
        store.join("room", "c3", {})  # this process's own write forgets it at once
        assert ask().total == 3
    finally:
        store.stop()
