"""Loading a live page: rows and the log position they were read at, in one snapshot.

A change committed before the snapshot can be numbered in the log after it (the
sequencer numbers after commit), so "the channel's head when the rows were read"
alone would let a page apply again, and so step back to, a version its rows
already hold. The position therefore carries the snapshot too
(``pg_current_snapshot()``): a change whose transaction (its ``xid``) the snapshot
sees is already in the rows and is skipped; every other change has an offset
above ``offset`` (an offset at or below the head the snapshot sees was given by
a sequencer that committed before it, to a change that committed before it).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import psycopg2.extensions
from psycopg2 import sql

from .._statement import run
from ..errors import ConfigError
from ..sources.log import DEFAULT_SCHEMA


class LiveLoad(NamedTuple):
    """What :func:`load_live` read: the rows, and where the page follows them from."""

    rows: List[Dict[str, Any]]
    #: ``{"channel", "epoch", "offset", "snapshot", "key"}``: give it to pgws.js's ``live``
    position: Dict[str, Any]

    def to_json(self) -> Dict[str, Any]:
        """``{"rows": [...], "position": {...}}``, what pgws.js's ``live`` ``load`` returns."""
        return {"rows": self.rows, "position": self.position}


def visible(xid: int, snapshot: str) -> bool:
    """Whether a transaction id is visible in a snapshot's text (``xmin:xmax:xip,...``),
    as PostgreSQL's ``pg_visible_in_snapshot`` says for a committed transaction."""
    xmin, xmax, xip = snapshot.split(":")
    if xid < int(xmin):
        return True
    if xid >= int(xmax):
        return False
    return str(xid) not in xip.split(",")


def load_live(conn: Any, query: str, channel: str, params: Sequence[Any] = (), *,
              key: Optional[Sequence[str]] = None, log_schema: str = DEFAULT_SCHEMA) -> LiveLoad:
    """Run ``query`` (with ``params``, ``%s`` placeholders; write a literal ``%`` as ``%%``)
    and read the position of ``channel`` in the same snapshot, in one statement.

    ``conn``: a psycopg2 or psycopg 3 connection or a SQLAlchemy ``Connection`` or
    ``Session``, in a transaction that has not written to the watched table. Rows come
    as PostgreSQL's ``to_jsonb`` writes them, as the watched table's changes do.
    ``key``: the result's columns holding the table's primary key, in key order (default,
    on psycopg2 only: found from the query's table when its rows come from one table).
    """
    if key is None:
        key = _key_of(conn, query, params)
    statement = sql.SQL(
        "SELECT (SELECT coalesce(jsonb_agg(to_jsonb(q)), '[]'::jsonb) FROM ({query}) AS q), "
        "coalesce((SELECT s.head FROM {s}.streams s WHERE s.channel = %s), m.offset_floor), "
        "m.epoch, pg_current_snapshot()::text FROM {s}.meta m"
    ).format(query=sql.SQL(query), s=sql.Identifier(log_schema))
    row = run(conn, _text(conn, statement), (*params, channel))
    if row is None:
        raise ConfigError(f"the durable log in schema {log_schema!r} has no meta row: run "
                          f"'pgws-sync migrate'")
    rows, offset, epoch, snapshot = row
    if isinstance(rows, str):  # a driver that leaves jsonb as text
        rows = json.loads(rows)
    return LiveLoad(rows, {"channel": channel, "epoch": epoch, "offset": int(offset),
                           "snapshot": snapshot, "key": list(key)})


def _text(conn: Any, statement: sql.Composable) -> str:
    raw = _driver(conn)
    text: str = statement.as_string(raw) if raw is not None else _plain(statement)
    return text


def _plain(statement: sql.Composable) -> str:
    # no psycopg2 connection to quote with: identifiers and literals quoted here
    if isinstance(statement, sql.Composed):
        return "".join(_plain(part) for part in statement.seq)
    if isinstance(statement, sql.Identifier):
        return ".".join('"' + s.replace('"', '""') + '"' for s in statement.strings)
    if isinstance(statement, sql.SQL):
        return statement.string
    raise TypeError(f"cannot write {statement!r} without a connection")


def _driver(conn: Any) -> Any:
    return conn if isinstance(conn, psycopg2.extensions.connection) else None


def _key_of(conn: Any, query: str, params: Sequence[Any]) -> List[str]:
    raw = _driver(conn)
    if raw is None:
        raise ConfigError("load_live needs key=[...] (the result's primary key columns) on a "
                          "connection other than psycopg2's")
    with raw.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(sql.SQL(query)), params)
        columns = [(d.name, d.table_oid, d.table_column) for d in cur.description]
        tables = {t for _, t, _ in columns if t}
        if len(tables) == 1:
            oid = tables.pop()
            cur.execute("SELECT k.n FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS "
                        "k(n, o) WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.o", (oid,))
            numbers = [r[0] for r in cur.fetchall()]
            by_number = {c: name for name, t, c in columns if t == oid}
            if numbers and all(n in by_number for n in numbers):
                return [by_number[n] for n in numbers]
    raise ConfigError(f"load_live cannot tell the primary key of the rows of {query!r}: select "
                      f"the table's primary key columns from one table, or pass key=[...]")
