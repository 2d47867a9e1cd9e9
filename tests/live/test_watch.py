"""Watching a table: the trigger's messages, channel expressions and moves, refusals, sizes,
idempotent watch and unwatch (Python and the CLI)."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterator, List, Tuple

import psycopg2
import pytest

from pgws_sync import ConfigError, unwatch_table, watch_table

from ..clirun import no_database_env, run_cli
from ..durable_helpers import new_log

_tables = itertools.count()


@pytest.fixture
def db(pg_dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def log(pg_dsn: str) -> str:
    return new_log(pg_dsn, max_payload=2000)


def new_table(db: Any, columns: str = "id int PRIMARY KEY, customer int, name text, note text"
              ) -> str:
    name = f"live_{os.getpid()}_{next(_tables)}"
    with db.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} ({columns})")
    return name


def messages(db: Any, log: str) -> List[Tuple[str, Dict[str, Any]]]:
    with db.cursor() as cur:
        cur.execute(f"SELECT channel, payload FROM {log}.messages ORDER BY seq")
        out = [(c, json.loads(p)) for c, p in cur.fetchall()]
        cur.execute(f"DELETE FROM {log}.messages")
    return out


def run(db: Any, statement: str, params: Tuple[Any, ...] = ()) -> None:
    with db.cursor() as cur:
        cur.execute(statement, params)


def test_changes_are_published_in_the_writing_transaction(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    lines = watch_table(pg_dsn, table, log_schema=log)
    assert lines[0].startswith(f"watching public.{table}: each change goes to channel "
                               f"'public.{table}', keyed by id"), lines
    run(db, f"INSERT INTO {table} VALUES (1, 7, 'a', 'x'), (2, 8, 'b', NULL)")
    run(db, f"UPDATE {table} SET name = 'c' WHERE id = 1")
    run(db, f"UPDATE {table} SET name = name WHERE id = 1")  # no column changed: nothing
    run(db, f"DELETE FROM {table} WHERE id = 2")
    got = messages(db, log)
    assert [c for c, _ in got] == [f"public.{table}"] * 4
    bodies = [{k: v for k, v in m.items() if k != "xid"} for _, m in got]
    assert bodies == [
        {"op": "insert", "table": f"public.{table}", "key": {"id": 1},
         "row": {"id": 1, "customer": 7, "name": "a", "note": "x"}},
        {"op": "insert", "table": f"public.{table}", "key": {"id": 2},
         "row": {"id": 2, "customer": 8, "name": "b", "note": None}},
        {"op": "update", "table": f"public.{table}", "key": {"id": 1},
         "row": {"id": 1, "customer": 7, "name": "c", "note": "x"}},
        {"op": "delete", "table": f"public.{table}", "key": {"id": 2}, "row": None},
    ]
    assert all(isinstance(m["xid"], int) for _, m in got)
    # a rolled-back change publishes nothing
    conn = psycopg2.connect(pg_dsn)
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (3, 1, 'r', NULL)")
        cur.execute("SELECT pg_current_xact_id()::text::bigint")
        xid = cur.fetchone()[0]
    conn.rollback()
    with conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (4, 1, 'k', NULL)")
            cur.execute("SELECT pg_current_xact_id()::text::bigint")
            xid = cur.fetchone()[0]
    conn.close()
    got = messages(db, log)
    assert [(m["key"], m["xid"]) for _, m in got] == [({"id": 4}, xid)]


def test_columns_and_channel_expression_move_rows(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    watch_table(pg_dsn, table, log_schema=log, channel_expr="'orders:' || customer",
                columns=["id", "name"])
    run(db, f"INSERT INTO {table} VALUES (1, 7, 'a', 'x'), (2, 8, 'b', 'y')")
    run(db, f"UPDATE {table} SET note = 'z' WHERE id = 1")  # not a watched column: nothing
    run(db, f"UPDATE {table} SET customer = 8, name = 'moved' WHERE id = 1")
    run(db, f"UPDATE {table} SET id = 5 WHERE id = 2")  # a new key: delete and insert
    got = [(c, m["op"], m["key"], m["row"]) for c, m in messages(db, log)]
    assert got == [
        ("orders:7", "insert", {"id": 1}, {"id": 1, "name": "a"}),
        ("orders:8", "insert", {"id": 2}, {"id": 2, "name": "b"}),
        ("orders:7", "delete", {"id": 1}, None),
        ("orders:8", "insert", {"id": 1}, {"id": 1, "name": "moved"}),
        ("orders:8", "delete", {"id": 2}, None),
        ("orders:8", "insert", {"id": 5}, {"id": 5, "name": "b"}),
    ]
    # a row whose channel is NULL belongs to none: written freely, published nowhere
    run(db, f"INSERT INTO {table} VALUES (9, NULL, 'nobody', NULL)")
    run(db, f"UPDATE {table} SET name = 'still nobody' WHERE id = 9")
    run(db, f"UPDATE {table} SET customer = 7 WHERE id = 9")  # enters orders:7
    run(db, f"UPDATE {table} SET customer = NULL WHERE id = 5")  # leaves orders:8
    got = [(c, m["op"], m["key"]) for c, m in messages(db, log)]
    assert got == [("orders:7", "insert", {"id": 9}), ("orders:8", "delete", {"id": 5})]


def test_composite_keys_keep_their_order(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db, "b int, a int, v text, PRIMARY KEY (b, a)")
    watch_table(pg_dsn, table, log_schema=log, channel="things")
    run(db, f"INSERT INTO {table} VALUES (2, 1, 'x')")
    with db.cursor() as cur:
        cur.execute(f"SELECT payload FROM {log}.messages")
        assert '"key" : {"b" : 2, "a" : 1}' in cur.fetchone()[0]


def test_watch_and_unwatch_are_idempotent(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    assert unwatch_table(pg_dsn, table) == [f"public.{table} was not watched; nothing to do"]
    watch_table(pg_dsn, table, log_schema=log)
    assert watch_table(pg_dsn, table, log_schema=log) == [
        f"public.{table} is already watched so; nothing to do"]
    lines = watch_table(pg_dsn, table, log_schema=log, channel="other")
    assert lines[0].startswith(f"rewatched public.{table}: each change goes to channel 'other'")
    run(db, f"INSERT INTO {table} VALUES (1, 7, 'a', 'x')")
    assert [c for c, _ in messages(db, log)] == ["other"]  # one trigger, the new one
    assert unwatch_table(pg_dsn, table) == [
        f"stopped watching public.{table}: its trigger and function are dropped"]
    assert unwatch_table(pg_dsn, table) == [f"public.{table} was not watched; nothing to do"]
    run(db, f"INSERT INTO {table} VALUES (2, 7, 'a', 'x')")
    assert messages(db, log) == []
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE %s", (f"{table}_pgws_live",))
        assert cur.fetchone()[0] == 0


def test_refusals_are_one_clear_line(pg_dsn: str, db: Any, log: str) -> None:
    keyless = new_table(db, "id int, name text")
    with pytest.raises(ConfigError) as info:
        watch_table(pg_dsn, keyless, log_schema=log)
    assert str(info.value) == (
        f"table public.{keyless} has no primary key: a live table's rows are told apart by "
        f"their primary key. Add one (ALTER TABLE \"public\".\"{keyless}\" ADD PRIMARY KEY "
        f"(...)), then watch it")
    table = new_table(db)
    with pytest.raises(ConfigError, match="has no column 'nope'"):
        watch_table(pg_dsn, table, log_schema=log, columns=["id", "nope"])
    with pytest.raises(ConfigError, match="the channel expression .* does not work"):
        watch_table(pg_dsn, table, log_schema=log, channel_expr="'x' || missing")
    with pytest.raises(ConfigError, match="no table 'no_such_table'"):
        watch_table(pg_dsn, "no_such_table", log_schema=log)


def test_rows_beyond_max_payload(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    watch_table(pg_dsn, table, log_schema=log)
    with pytest.raises(psycopg2.Error) as info:
        run(db, f"INSERT INTO {table} VALUES (1, 7, repeat('a', 3000), NULL)")
    assert info.value.pgcode == "54000"
    assert str(info.value).splitlines()[0].startswith(
        f"pgws_sync live table public.{table}: the insert of the row with key {{\"id\" : 1}} is ")
    assert "the durable log takes at most 2000 (watch fewer columns, or publish the key only: " \
           "pgws-sync watch --oversize key-only)" in str(info.value)
    run(db, f"INSERT INTO {table} VALUES (1, 7, 'small', NULL)")  # small rows still go
    watch_table(pg_dsn, table, log_schema=log, oversize="key-only")
    run(db, f"UPDATE {table} SET name = repeat('a', 3000) WHERE id = 1")
    got = [m for _, m in messages(db, log)]
    assert [(m["op"], m["row"], m.get("too_large")) for m in got] == [
        ("insert", {"id": 1, "customer": 7, "name": "small", "note": None}, None),
        ("update", None, True)]


def test_a_statement_of_many_rows(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    watch_table(pg_dsn, table, log_schema=log)
    run(db, f"INSERT INTO {table} SELECT n, n %% 10, 'n' || n FROM generate_series(1, 10000) n")
    run(db, f"UPDATE {table} SET name = name || '!'")
    with db.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {log}.messages")
        assert cur.fetchone()[0] == 20000


def test_the_cli(pg_dsn: str, db: Any, log: str) -> None:
    table = new_table(db)
    env = no_database_env(PGWS_DB_URI=pg_dsn)
    done = run_cli("watch", table, "--schema", log, "--channel-expr", "'orders:' || customer",
                   "--columns", "id,name", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"watching public.{table}: each change goes to the channel "
                                  f"\"'orders:' || customer\" computes, keyed by id, with "
                                  f"columns id, name (oversize: fail")
    again = run_cli("watch", table, "--schema", log, "--channel-expr", "'orders:' || customer",
                    "--columns", "id,name", env=env)
    assert again.stdout == f"public.{table} is already watched so; nothing to do\n"
    run(db, f"INSERT INTO {table} VALUES (1, 7, 'a', 'x')")
    assert [(c, m["row"]) for c, m in messages(db, log)] == [("orders:7", {"id": 1, "name": "a"})]
    keyless = new_table(db, "id int")
    refused = run_cli("watch", keyless, "--schema", log, env=env)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"pgws-sync: table public.{keyless} has no primary key")
    assert len(refused.stderr.splitlines()) == 1
    assert run_cli("unwatch", table, env=env).stdout.startswith("stopped watching")
    assert run_cli("unwatch", table, env=env).stdout.endswith("was not watched; nothing to do\n")


def test_a_writer_with_only_the_right_to_publish(pg_dsn: str, db: Any, log: str) -> None:
    """The trigger runs as the writer: its table rights and --grant-publish are enough."""
    from pgws_sync import migrate

    table = new_table(db)
    watch_table(pg_dsn, table, log_schema=log)
    role = f"live_writer_{os.getpid()}"
    with db.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {role}")
        cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute(f"GRANT INSERT, UPDATE, SELECT ON {table} TO {role}")
    try:
        migrate(pg_dsn, schema=log, grant_publish=[role])
        writer = psycopg2.connect(pg_dsn.replace("postgres@", f"{role}@"))
        with writer, writer.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1, 7, 'a', NULL)")
            cur.execute(f"UPDATE {table} SET name = 'b' WHERE id = 1")
        writer.close()
        assert [m["op"] for _, m in messages(db, log)] == ["insert", "update"]
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")
