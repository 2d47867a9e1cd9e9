"""Watching a table: a row trigger that publishes each change into the durable log.

``watch_table`` installs, on one table, an ``AFTER INSERT OR UPDATE OR DELETE``
row trigger named ``pgws_live`` and its function (in the table's schema). Each
changed row publishes ``{"op", "table", "key", "row", "xid"}`` through the log's
``publish`` function, inside the writing transaction: ``key`` holds the primary
key's columns, ``row`` the watched columns of the new row (null on delete),
``xid`` the writing transaction's id (what :func:`pgws_sync.load_live` needs to
join a snapshot to the log). An update that moves a row to another channel (or
changes its key) publishes a delete under the old and an insert under the new;
an update that changes no watched column publishes nothing.
"""

from __future__ import annotations

import hashlib
from typing import Any, List, NamedTuple, Optional, Sequence

import psycopg2
from psycopg2 import sql

from .._dsn import libpq_dsn
from ..errors import ConfigError
from ..sources.log import DEFAULT_SCHEMA, log_info

#: The name of the trigger ``watch_table`` puts on a table.
TRIGGER = "pgws_live"
#: What an oversized change does: fail the writing statement, or publish its key only.
OVERSIZE = ("fail", "key-only")


class Watched(NamedTuple):
    """A table as ``watch_table`` found it: its names, key and columns."""

    oid: int
    schema: str
    name: str
    key: List[str]
    columns: List[str]

    @property
    def qualified(self) -> str:
        """``schema.table``, as the messages' ``table`` field says it."""
        return f"{self.schema}.{self.name}"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _function_name(table: str) -> str:
    name = f"{table}_pgws_live"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    return f"{table.encode()[:40].decode(errors='ignore')}_{digest}_pgws_live"


def describe(cur: Any, table: str) -> Watched:
    """The table ``table`` names (``schema.table`` or a name on the search path), with its
    primary key; :class:`ConfigError` if there is no such table or it has no primary key."""
    cur.execute("SELECT to_regclass(%s)::oid", (table,))
    row = cur.fetchone()
    if row is None or row[0] is None:
        raise ConfigError(f"no table {table!r} in this database (give schema.table, or a name "
                          f"on the search path)")
    oid = row[0]
    cur.execute("SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.oid = %s", (oid,))
    schema, name, kind = cur.fetchone()
    if kind not in ("r", "p"):
        raise ConfigError(f"{schema}.{name} is not a table: only tables can be watched")
    cur.execute("SELECT a.attname FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(n, o) "
                "JOIN pg_attribute a ON a.attnum = k.n WHERE i.indrelid = %s AND i.indisprimary "
                "AND a.attrelid = %s ORDER BY k.o", (oid, oid))
    key = [r[0] for r in cur.fetchall()]
    if not key:
        raise ConfigError(
            f"table {schema}.{name} has no primary key: a live table's rows are told apart by "
            f"their primary key. Add one (ALTER TABLE {_q(schema)}.{_q(name)} ADD PRIMARY KEY "
            f"(...)), then watch it")
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT "
                "attisdropped ORDER BY attnum", (oid,))
    return Watched(oid, schema, name, key, [r[0] for r in cur.fetchall()])


def trigger_function(table: Watched, *, log_schema: str, max_payload: int,
                     channel: Optional[str] = None, channel_expr: Optional[str] = None,
                     columns: Optional[Sequence[str]] = None, oversize: str = "fail") -> str:
    """The body of the trigger function (plpgsql) for ``table``."""
    def key_of(rec: str) -> str:
        return "json_build_object(" + ", ".join(
            f"{_lit(c)}, {rec}.{_q(c)}" for c in table.key) + ")"

    def row_of(rec: str) -> str:
        if columns is None:
            return f"to_jsonb({rec})"
        return "jsonb_build_object(" + ", ".join(f"{_lit(c)}, {rec}.{_q(c)}" for c in columns) + ")"

    def channel_of(rec: str) -> str:
        if channel_expr is None:
            return _lit(channel or table.qualified)
        # the expression names the row's columns: evaluated over the one record
        return f"(SELECT ({channel_expr})::text FROM (SELECT {rec}.*) AS r)"

    def emit(op: str, chan: str, key: str, row: str) -> str:
        body = (f"json_build_object('op', {_lit(op)}, 'table', {_lit(table.qualified)}, "
                f"'key', {key}, 'row', {row}, 'xid', xact)::text")
        if row == "NULL":
            code = f"    PERFORM {_q(log_schema)}.publish({chan}, {body});\n"
        else:
            too_large = (
                f"        payload := json_build_object('op', {_lit(op)}, 'table', "
                f"{_lit(table.qualified)}, 'key', {key}, 'row', NULL, 'xid', xact, "
                f"'too_large', true)::text;\n"
                if oversize == "key-only" else
                f"        RAISE EXCEPTION 'pgws_sync live table %: the % of the row with key % "
                f"is % bytes; the durable log takes at most % (watch fewer columns, or publish "
                f"the key only: pgws-sync watch --oversize key-only)', "
                f"{_lit(table.qualified)}, {_lit(op)}, {key}, octet_length(payload), "
                f"{max_payload} USING ERRCODE = '54000';\n")
            code = (f"    payload := {body};\n"
                    f"    IF octet_length(payload) > {max_payload} THEN\n{too_large}    END IF;\n"
                    f"    PERFORM {_q(log_schema)}.publish({chan}, payload);\n")
        if channel_expr is None:
            return code
        # a row whose channel expression is NULL belongs to no channel: published nowhere
        return f"    IF {chan} IS NOT NULL THEN\n{code}    END IF;\n"

    old_key_changed = " OR ".join(f"OLD.{_q(c)} IS DISTINCT FROM NEW.{_q(c)}" for c in table.key)
    moved = f"old_channel IS DISTINCT FROM new_channel OR {old_key_changed}"
    if channel_expr is None:
        moved = old_key_changed
    return f"""
DECLARE
    xact bigint := pg_current_xact_id()::text::bigint;
    payload text;
    new_row jsonb;
    old_channel text;
    new_channel text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        new_channel := {channel_of('NEW')};
        new_row := {row_of('NEW')};
{emit('insert', 'new_channel', key_of('NEW'), 'new_row')}    ELSIF TG_OP = 'DELETE' THEN
        old_channel := {channel_of('OLD')};
{emit('delete', 'old_channel', key_of('OLD'), 'NULL')}    ELSE
        old_channel := {channel_of('OLD')};
        new_channel := {channel_of('NEW')};
        new_row := {row_of('NEW')};
        IF {moved} THEN
{emit('delete', 'old_channel', key_of('OLD'), 'NULL')}{emit('insert', 'new_channel', key_of('NEW'), 'new_row')}        ELSIF new_row IS DISTINCT FROM {row_of('OLD')} THEN
{emit('update', 'new_channel', key_of('NEW'), 'new_row')}        END IF;
    END IF;
    RETURN NULL;
END
"""


def _connected(conn: Any) -> Any:
    if isinstance(conn, str) or hasattr(conn, "render_as_string"):
        return psycopg2.connect(libpq_dsn(conn))
    return None


def watch_table(conn: Any, table: str, *, channel: Optional[str] = None,
                channel_expr: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                oversize: str = "fail", log_schema: str = DEFAULT_SCHEMA) -> List[str]:
    """Publish every change of ``table`` into the durable log (idempotent); returns what it
    did, one line each.

    ``conn``: a psycopg2 connection (not inside a transaction) or a DSN. ``channel``: the
    channel of every change (default ``schema.table``); ``channel_expr``: instead, a SQL
    expression over the row's columns giving each row's channel (``'orders:' ||
    customer_id``; a row for which it is NULL is published nowhere). ``columns``: the
    columns a change carries (default all).
    ``oversize``: a change above the log's ``max_payload`` fails the writing statement
    (``"fail"``) or is published with its key only (``"key-only"``). Watching again
    replaces the trigger (run it again after ``migrate --max-payload``).
    """
    if channel is not None and channel_expr is not None:
        raise ConfigError("give a channel or a channel expression, not both")
    if oversize not in OVERSIZE:
        raise ConfigError(f"oversize must be one of {', '.join(OVERSIZE)}, not {oversize!r}")
    if channel is not None and (not channel or len(channel) > 200
                                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in channel)):
        raise ConfigError(f"invalid channel name {channel!r} (1 to 200 characters, no control "
                          f"characters)")
    own = _connected(conn)
    if own is not None:
        try:
            return watch_table(own, table, channel=channel, channel_expr=channel_expr,
                               columns=columns, oversize=oversize, log_schema=log_schema)
        finally:
            own.close()
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            info = log_info(cur, log_schema)
            found = describe(cur, table)
            if columns is not None:
                columns = list(columns)
                unknown = [c for c in columns if c not in found.columns]
                if not columns or unknown:
                    raise ConfigError(f"table {found.qualified} has no column "
                                      f"{', '.join(map(repr, unknown)) or '(none given)'}; its "
                                      f"columns: {', '.join(found.columns)}")
            if channel_expr is not None:
                try:
                    cur.execute("SAVEPOINT pgws_live_check")
                    cur.execute(sql.SQL("SELECT ({})::text FROM {}.{} AS r LIMIT 0").format(
                        sql.SQL(channel_expr), sql.Identifier(found.schema),
                        sql.Identifier(found.name)))
                    cur.execute("RELEASE SAVEPOINT pgws_live_check")
                except psycopg2.Error as exc:
                    raise ConfigError(f"the channel expression {channel_expr!r} does not work "
                                      f"on {found.qualified}: "
                                      f"{str(exc).strip().splitlines()[0]}") from None
            body = trigger_function(found, log_schema=log_schema, max_payload=info.max_payload,
                                    channel=channel, channel_expr=channel_expr,
                                    columns=columns, oversize=oversize)
            function = sql.SQL("{}.{}").format(sql.Identifier(found.schema),
                                               sql.Identifier(_function_name(found.name)))
            cur.execute("SELECT p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
                        "WHERE t.tgrelid = %s AND t.tgname = %s", (found.oid, TRIGGER))
            existing = cur.fetchone()
            if existing is not None and existing[0] == body:
                return [f"{found.qualified} is already watched so; nothing to do"]
            _drop(cur, found.oid)
            cur.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql "
                                "SET search_path = pg_catalog, pg_temp AS {}")
                        .format(function, sql.Literal(body)))
            cur.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {}.{} "
                                "FOR EACH ROW EXECUTE FUNCTION {}()")
                        .format(sql.Identifier(TRIGGER), sql.Identifier(found.schema),
                                sql.Identifier(found.name), function))
            where = (f"the channel {channel_expr!r} computes" if channel_expr is not None
                     else f"channel {channel or found.qualified!r}")
            what = "all columns" if columns is None else "columns " + ", ".join(columns)
            verb = "now watches" if existing is None else "changed how it watches"
            return [f"{'watching' if existing is None else 'rewatched'} {found.qualified}: each "
                    f"change goes to {where}, keyed by {', '.join(found.key)}, with {what} "
                    f"(oversize: {oversize}; the log in schema {log_schema!r}, {verb} it)"]
    finally:
        conn.autocommit = autocommit


def _drop(cur: Any, oid: int) -> bool:
    cur.execute("SELECT t.tgfoid::regprocedure::text, n.nspname, c.relname FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE t.tgrelid = %s AND t.tgname = %s",
                (oid, TRIGGER))
    row = cur.fetchone()
    if row is None:
        return False
    function, schema, name = row
    cur.execute(sql.SQL("DROP TRIGGER {} ON {}.{}").format(
        sql.Identifier(TRIGGER), sql.Identifier(schema), sql.Identifier(name)))
    cur.execute(sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.SQL(function)))
    return True


def unwatch_table(conn: Any, table: str) -> List[str]:
    """Remove what :func:`watch_table` installed on ``table`` (idempotent); one line saying
    what it did."""
    own = _connected(conn)
    if own is not None:
        try:
            return unwatch_table(own, table)
        finally:
            own.close()
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)::oid", (table,))
            row = cur.fetchone()
            if row is None or row[0] is None:
                raise ConfigError(f"no table {table!r} in this database")
            cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace"
                        " n ON n.oid = c.relnamespace WHERE c.oid = %s", (row[0],))
            name = cur.fetchone()[0]
            if _drop(cur, row[0]):
                return [f"stopped watching {name}: its trigger and function are dropped"]
            return [f"{name} was not watched; nothing to do"]
    finally:
        conn.autocommit = autocommit

