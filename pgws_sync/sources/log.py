"""The durable log: messages kept in the application's own PostgreSQL, offsets in commit order.

Each durable channel has a row in ``<schema>.streams``. Publishing (the SQL
function ``<schema>.publish``) locks that row (``SELECT ... FOR UPDATE``), takes
the channel's newest offset plus one, and inserts the message, in the caller's
transaction. The lock lasts until the transaction ends, so the next publisher of
the channel waits and then sees the committed message: within a channel, offsets
follow commit order with no gap, and a rolled-back transaction leaves no trace.
Locking writes no new row version, so publishing many messages in one transaction
stays cheap. ``pruned_to`` remembers the newest pruned offset, so offsets keep
growing when every message of a channel was pruned. A payload-free
NOTIFY naming the channel wakes the readers; they then ask the table what is
new, so a lost wake-up loses nothing (see docs/guides/durable.md).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import psycopg2
from psycopg2 import sql

from .._formats import (
    check_json,
    dumps,
    json_body,
    name_problem,
    new_message_id,
    text_body,
    validate_name,
)
from ..errors import InvalidPayload, LogUnavailable, MessageTooLarge, first_line

logger = logging.getLogger(__name__)

#: The schema the log lives in unless told otherwise.
DEFAULT_SCHEMA = "pgws_sync"
#: The largest payload (UTF-8 bytes, inclusive) the log takes unless migrated otherwise.
DEFAULT_MAX_PAYLOAD = 1_048_576
#: The version of the log's tables and function this release writes and reads.
SCHEMA_VERSION = 1
#: Message types a durable channel carries (a binary frame has no room for an offset).
DURABLE_TYPES = ("json", "text")

# The statements that create version 1; {s} is the schema. Shown in docs/guides/durable.md.
_VERSION_1 = [
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE {s}.meta (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version integer NOT NULL,
    epoch text NOT NULL DEFAULT gen_random_uuid()::text,
    max_payload integer NOT NULL,
    wake_channel text NOT NULL
)""",
    """CREATE TABLE {s}.streams (
    channel text PRIMARY KEY,
    pruned_to bigint NOT NULL DEFAULT 0
)""",
    """CREATE TABLE {s}.messages (
    channel text NOT NULL,
    "offset" bigint NOT NULL,
    id text NOT NULL,
    type text NOT NULL CHECK (type IN ('json', 'text')),
    payload text NOT NULL,
    reply_to text,
    published_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, "offset")
)""",
]

# Replaced on every migrate, so a release can fix it without a new version.
_PUBLISH_FUNCTION = """CREATE OR REPLACE FUNCTION {s}.publish(
    channel text, payload text, type text DEFAULT 'json', id text DEFAULT NULL,
    reply_to text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    m {s}.meta;
    floor_offset bigint;
    next_offset bigint;
BEGIN
    SELECT * INTO STRICT m FROM {s}.meta;
    IF publish.channel IS NULL OR publish.channel = '' OR length(publish.channel) > 200
            OR publish.channel ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'pgws_sync.publish: invalid channel name %', quote_nullable(publish.channel)
            USING ERRCODE = '22023';
    END IF;
    IF publish.type IS NULL OR publish.type NOT IN ('json', 'text') THEN
        RAISE EXCEPTION 'pgws_sync.publish: type must be json or text, not %',
            quote_nullable(publish.type) USING ERRCODE = '22023';
    END IF;
    IF publish.payload IS NULL THEN
        RAISE EXCEPTION 'pgws_sync.publish: the payload is NULL' USING ERRCODE = '22004';
    END IF;
    IF octet_length(publish.payload) > m.max_payload THEN
        RAISE EXCEPTION 'pgws_sync.publish: the message for channel % is % bytes; '
            'the log takes at most %', publish.channel, octet_length(publish.payload),
            m.max_payload USING ERRCODE = '54000';
    END IF;
    IF publish.type = 'json' THEN
        PERFORM publish.payload::jsonb;  -- raises on anything that is not JSON
    END IF;
    INSERT INTO {s}.streams (channel) VALUES (publish.channel) ON CONFLICT DO NOTHING;
    -- held until this transaction ends: the channel's next publisher waits here
    SELECT pruned_to INTO STRICT floor_offset FROM {s}.streams
        WHERE streams.channel = publish.channel FOR UPDATE;
    -- a statement after the wait: it sees what the previous publisher committed
    SELECT greatest(floor_offset, coalesce(max(messages."offset"), 0)) + 1 INTO next_offset
        FROM {s}.messages WHERE messages.channel = publish.channel;
    INSERT INTO {s}.messages (channel, "offset", id, type, payload, reply_to)
        VALUES (publish.channel, next_offset, coalesce(publish.id, gen_random_uuid()::text),
                publish.type, publish.payload, publish.reply_to);
    PERFORM pg_notify(m.wake_channel, publish.channel);
    RETURN next_offset;
END
$fn$"""


def _statements(schema: str, templates: Iterable[str]) -> List[sql.Composed]:
    ident = sql.Identifier(schema)
    return [sql.SQL(t).format(s=ident) for t in templates]


def migration_sql(schema: str = DEFAULT_SCHEMA) -> List[str]:
    """The statements a new log's migration runs, as text (for the docs and for review)."""
    first_row = (f"INSERT INTO {{s}}.meta (version, max_payload, wake_channel) VALUES "
                 f"({SCHEMA_VERSION}, {DEFAULT_MAX_PAYLOAD}, '{wake_channel_for(schema)}')")
    return [t.replace("{s}", _quoted(schema))
            for t in _VERSION_1 + [first_row, _PUBLISH_FUNCTION]]


class LogInfo(NamedTuple):
    """What the ``meta`` row of a log says."""

    schema: str
    version: int
    epoch: str
    max_payload: int
    wake_channel: str


def wake_channel_for(schema: str) -> str:
    """The NOTIFY channel a log's publishes wake readers on."""
    return f"{schema}_log"


def migrate(conn: Any, *, schema: str = DEFAULT_SCHEMA,
            max_payload: Optional[int] = None) -> List[str]:
    """Create or upgrade the durable log (idempotent); returns what it did, one line each.

    ``conn`` is a psycopg2 connection (not inside a transaction) or a DSN. It
    runs in one transaction under an advisory lock, so several workers
    migrating at once do it once. ``max_payload`` (bytes): set the largest
    payload; None keeps the current one (:data:`DEFAULT_MAX_PAYLOAD` for a new log).
    """
    if isinstance(conn, str):
        own = psycopg2.connect(conn)
        try:
            return migrate(own, schema=schema, max_payload=max_payload)
        finally:
            own.close()
    _check_schema_name(schema)
    if max_payload is not None and not 1 <= max_payload <= 1_000_000_000:
        raise InvalidPayload(f"max_payload must be between 1 and 1000000000 bytes, "
                             f"got {max_payload!r}")
    done: List[str] = []
    ident = sql.Identifier(schema)
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema + ".migrate",))
            cur.execute("SELECT to_regclass(%s)", (f"{_quoted(schema)}.meta",))
            if cur.fetchone()[0] is None:
                for stmt in _statements(schema, _VERSION_1):
                    cur.execute(stmt)
                cur.execute(sql.SQL("INSERT INTO {}.meta (version, max_payload, wake_channel) "
                                    "VALUES (%s, %s, %s) RETURNING epoch").format(ident),
                            (SCHEMA_VERSION, max_payload or DEFAULT_MAX_PAYLOAD,
                             wake_channel_for(schema)))
                epoch = cur.fetchone()[0]
                done.append(f"created the durable log in schema {schema!r} (version "
                            f"{SCHEMA_VERSION}, epoch {epoch}, max_payload "
                            f"{max_payload or DEFAULT_MAX_PAYLOAD} bytes)")
            else:
                cur.execute(sql.SQL("SELECT version, max_payload FROM {}.meta").format(ident))
                version, current = cur.fetchone()
                if version > SCHEMA_VERSION:
                    raise LogUnavailable(
                        f"the durable log in schema {schema!r} is version {version}, newer than "
                        f"this pgws_sync knows ({SCHEMA_VERSION}): upgrade pgws_sync")
                if max_payload is not None and max_payload != current:
                    cur.execute(sql.SQL("UPDATE {}.meta SET max_payload = %s").format(ident),
                                (max_payload,))
                    done.append(f"set max_payload from {current} to {max_payload} bytes")
                if not done:
                    done.append(f"the durable log in schema {schema!r} is up to date "
                                f"(version {version}); nothing to do")
            cur.execute(_statements(schema, [_PUBLISH_FUNCTION])[0])
    finally:
        conn.autocommit = autocommit
    return done


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_schema_name(schema: str) -> None:
    problem = name_problem(schema, max_chars=None)
    if problem is not None or len(schema.encode()) > 63:
        raise InvalidPayload(f"invalid schema name {schema!r}: "
                             f"{problem or 'longer than 63 bytes'}")


def log_info(cur: Any, schema: str = DEFAULT_SCHEMA) -> LogInfo:
    """Read the log's ``meta`` row, or raise :class:`LogUnavailable` saying how to fix it."""
    cur.execute("SELECT to_regclass(%s)", (f"{_quoted(schema)}.meta",))
    if cur.fetchone()[0] is None:
        raise LogUnavailable(
            f"the durable log is missing: no table {schema}.meta in this database. Create it "
            f"once with 'pgws-sync migrate --dsn <DSN>' (or pgws_sync.migrate(conn))")
    try:
        cur.execute(sql.SQL("SELECT version, epoch, max_payload, wake_channel FROM {}.meta")
                    .format(sql.Identifier(schema)))
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise LogUnavailable(_rights_message(schema, first_line(exc))) from None
    row = cur.fetchone()
    if row is None:
        raise LogUnavailable(f"the durable log's {schema}.meta row is missing: run "
                             f"'pgws-sync migrate' again")
    version, epoch, max_payload, wake = row
    if version != SCHEMA_VERSION:
        raise LogUnavailable(
            f"the durable log in schema {schema!r} is version {version}; this pgws_sync reads "
            f"version {SCHEMA_VERSION}: run 'pgws-sync migrate'" if version < SCHEMA_VERSION else
            f"the durable log in schema {schema!r} is version {version}, newer than this "
            f"pgws_sync ({SCHEMA_VERSION}): upgrade pgws_sync")
    return LogInfo(schema, version, epoch, max_payload, wake)


def _rights_message(schema: str, missing: str) -> str:
    return (f"this database role cannot use the durable log in schema {schema!r}: {missing}. "
            f"Grant it, e.g. GRANT USAGE ON SCHEMA {schema} TO <role>; GRANT SELECT, INSERT, "
            f"UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO <role>; GRANT EXECUTE ON "
            f"FUNCTION {schema}.publish TO <role>")


def check_rights(cur: Any, schema: str = DEFAULT_SCHEMA) -> None:
    """Raise :class:`LogUnavailable` naming the first right the current role lacks to read,
    publish to and prune the log."""
    cur.execute("SELECT has_schema_privilege(%s, 'USAGE')", (schema,))
    if not cur.fetchone()[0]:
        raise LogUnavailable(_rights_message(schema, f"it lacks USAGE on schema {schema}"))
    for table, rights in (("meta", "SELECT"), ("streams", "SELECT INSERT UPDATE"),
                          ("messages", "SELECT INSERT DELETE")):
        for right in rights.split():  # one at a time: a list asks whether any is held
            cur.execute("SELECT has_table_privilege(%s, %s)", (f"{_quoted(schema)}.{table}", right))
            if not cur.fetchone()[0]:
                raise LogUnavailable(_rights_message(schema,
                                                     f"it lacks {right} on {schema}.{table}"))
    cur.execute("SELECT has_function_privilege(%s, 'EXECUTE')",
                (f"{_quoted(schema)}.publish(text, text, text, text, text)",))
    if not cur.fetchone()[0]:
        raise LogUnavailable(_rights_message(schema, f"it lacks EXECUTE on {schema}.publish"))


# ------------------------------------------------------------------ publishing


class Raw(str):
    """JSON text to publish as written, byte for byte (e.g. what a client sent)."""


def log_payload(message: Any, type: str) -> str:
    """The payload column's text for ``message`` of ``type`` (json: JSON text; text: the str)."""
    if type == "json":
        return str(message) if isinstance(message, Raw) else json_body(message)
    if type == "text":
        return text_body(message)
    raise InvalidPayload(f"durable channels carry json or text messages, not {type!r} "
                         f"(a binary frame has no room for an offset)")


def check_message(channel: str, payload: str, type: str, max_payload: int) -> None:
    """Raise before publishing what the log would refuse (:class:`MessageTooLarge`, ...)."""
    size = len(payload.encode("utf-8", "surrogatepass"))
    if size > max_payload:
        raise MessageTooLarge(size, max_payload, channel)
    if type == "json":
        try:
            check_json(payload)
        except ValueError as exc:
            raise InvalidPayload(f"invalid JSON payload: {exc}") from None


def publish_call(schema: str) -> sql.Composed:
    """``<schema>.publish(channel, payload, type, id, reply_to)`` with 5 placeholders."""
    return sql.SQL("{}.publish(%s, %s, %s, %s, %s)").format(sql.Identifier(schema))


def publish_args(channel: str, message: Any, *, type: str, message_id: Optional[str],
                 reply_to: Any, max_payload: int) -> Tuple[str, str, str, str, Optional[str]]:
    """The checked arguments of :func:`publish_call` (raises what :func:`publish` raises)."""
    validate_name(channel)
    payload = log_payload(message, type)
    check_message(channel, payload, type, max_payload)
    return (channel, payload, type, message_id or new_message_id(),
            None if reply_to is None else dumps(reply_to))


def publish(conn: Any, channel: str, message: Any, *, type: str = "json",
            message_id: Optional[str] = None, reply_to: Any = None,
            schema: str = DEFAULT_SCHEMA, max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """Append ``message`` to ``channel``'s durable stream inside ``conn``'s transaction.

    It reaches subscribers when the transaction commits (at once in
    autocommit) and never if it rolls back. Returns its offset (messages
    published in one transaction get consecutive offsets, in call order).
    ``type`` is ``json`` (any JSON value; a ``str`` is a JSON string) or
    ``text`` (a str). Raises :class:`MessageTooLarge` above ``max_payload``
    UTF-8 bytes (the log's own limit is checked again by the database), and
    :class:`InvalidPayload` / :class:`InvalidChannel` for bad input.
    """
    args = publish_args(channel, message, type=type, message_id=message_id, reply_to=reply_to,
                        max_payload=max_payload)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT ") + publish_call(schema), args)
        return int(cur.fetchone()[0])


# --------------------------------------------------------------------- reading


class Row(NamedTuple):
    """One message read back from the log."""

    channel: str
    offset: int
    id: str
    type: str
    payload: str
    #: The JSON text of what it answers, or None.
    reply_to: Optional[str]
    #: When it was published (seconds since the epoch).
    published: float


def read_after(cur: Any, schema: str, positions: Sequence[Tuple[str, int]],
               limit: int) -> Tuple[str, Dict[str, List[Row]]]:
    """The log's epoch, and up to ``limit`` messages of each ``(channel, after)`` with offsets
    above ``after``, in offset order, by channel (one round trip for every channel)."""
    cur.execute(sql.SQL(
        'SELECT e.epoch, r.channel, r."offset", r.id, r.type, r.payload, r.reply_to, '
        "extract(epoch FROM r.published_at)::float8 FROM {s}.meta e LEFT JOIN LATERAL ("
        'SELECT m.channel, m."offset", m.id, m.type, m.payload, m.reply_to, m.published_at '
        "FROM unnest(%s::text[], %s::bigint[]) AS p(channel, after) "
        "CROSS JOIN LATERAL (SELECT * FROM {s}.messages m WHERE m.channel = p.channel "
        'AND m."offset" > p.after ORDER BY m."offset" LIMIT %s) m) r ON true '
        'ORDER BY r.channel, r."offset"').format(s=sql.Identifier(schema)),
        ([c for c, _ in positions], [a for _, a in positions], limit))
    epoch = ""
    out: Dict[str, List[Row]] = {}
    for record in cur.fetchall():
        epoch = record[0]
        if record[1] is not None:
            out.setdefault(record[1], []).append(Row(record[1], *record[2:]))
    return epoch, out


def heads(cur: Any, schema: str, channels: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """``(head, oldest kept offset)`` of each channel (``(0, 1)`` for one never published to):
    the newest committed offset, and ``head + 1`` when nothing is kept."""
    cur.execute(sql.SQL(
        "SELECT c.channel, greatest(coalesce(s.pruned_to, 0), coalesce(("
        "SELECT max(m.\"offset\") FROM {s}.messages m WHERE m.channel = c.channel), 0)), "
        "(SELECT min(m.\"offset\") FROM {s}.messages m WHERE m.channel = c.channel) "
        "FROM unnest(%s::text[]) AS c(channel) LEFT JOIN {s}.streams s ON s.channel = c.channel"
    ).format(s=sql.Identifier(schema)), (list(channels),))
    return {channel: (int(head), int(head) + 1 if low is None else int(low))
            for channel, head, low in cur.fetchall()}


def backlog(cur: Any, schema: str) -> Tuple[int, float]:
    """How many messages the log keeps, and the age in seconds of its oldest (0 if none);
    one index probe per channel."""
    cur.execute(sql.SQL(
        'SELECT coalesce(sum(l."offset" - f."offset" + 1), 0), '
        "coalesce(extract(epoch FROM now() - min(f.published_at)), 0)::float8 "
        "FROM {s}.streams s CROSS JOIN LATERAL (SELECT m.\"offset\", m.published_at "
        "FROM {s}.messages m WHERE m.channel = s.channel ORDER BY m.\"offset\" LIMIT 1) f "
        "CROSS JOIN LATERAL (SELECT m.\"offset\" FROM {s}.messages m "
        "WHERE m.channel = s.channel ORDER BY m.\"offset\" DESC LIMIT 1) l"
    ).format(s=sql.Identifier(schema)))
    kept, oldest = cur.fetchone()
    return int(kept), max(0.0, float(oldest))


# --------------------------------------------------------------------- pruning


def prune(conn: Any, schema: str, *, max_age: float, keep: int, batch: int = 1000,
          stop: Optional[Any] = None) -> Optional[int]:
    """Delete messages older than ``max_age`` seconds, or beyond the newest ``keep`` of their
    channel, oldest first, ``batch`` rows per short transaction.

    Only one process prunes a log at a time (a session advisory lock): returns
    how many rows this call deleted, or None if another session holds the lock.
    Only the oldest rows of a channel go, so what is kept has no holes.
    ``stop`` (an Event) ends the pass early. ``conn`` must be in autocommit.
    """
    ident = sql.Identifier(schema)
    deleted = 0
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (schema + ".prune",))
        if not cur.fetchone()[0]:
            return None
        try:
            cur.execute(sql.SQL(
                'SELECT s.channel, (SELECT max(m."offset") FROM {s}.messages m '
                "WHERE m.channel = s.channel) FROM {s}.streams s").format(s=ident))
            for channel, head in cur.fetchall():
                if head is None:
                    continue
                while stop is None or not stop.is_set():
                    cur.execute(sql.SQL(
                        'SELECT "offset", published_at < now() - %s * interval \'1 second\' '
                        'FROM {}.messages WHERE channel = %s ORDER BY "offset" LIMIT %s'
                    ).format(ident), (max_age, channel, batch))
                    upto, count = None, 0
                    for offset, old in cur.fetchall():
                        if not (old or offset <= head - keep):
                            break
                        upto, count = offset, count + 1
                    if upto is None:
                        break
                    # one short transaction: the rows go, and the channel remembers how far
                    cur.execute(sql.SQL(
                        'DELETE FROM {s}.messages WHERE channel = %s AND "offset" <= %s; '
                        "UPDATE {s}.streams SET pruned_to = greatest(pruned_to, %s) "
                        "WHERE channel = %s").format(s=ident), (channel, upto, upto, channel))
                    deleted += count
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (schema + ".prune",))
    return deleted

