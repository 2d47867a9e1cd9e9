"""The durable log: messages kept in the application's own PostgreSQL, numbered after commit.

Publishing (the SQL function ``<schema>.publish``) checks its arguments and
inserts one row into ``<schema>.messages``, in the caller's transaction: no lock
another transaction waits for, no NOTIFY, nothing that conflicts under any
isolation level, and a rolled-back publish leaves nothing. Each row gets a
``seq`` (an identity) when it is inserted, which is not commit order.

One sequencer per database (``<schema>.sequence``, called by the elected
process, see ``sequencer.py``) numbers rows after they commit: it reads the rows
above ``meta.numbered_upto`` that its snapshot sees, gives each the next offset
of its channel (1, 2, 3... with no gap) in ``seq`` order, writes the narrow
``<schema>.offsets`` rows and the channel's head in ``<schema>.streams``, and
sends one payload-free NOTIFY per channel to wake the readers, who then ask the
tables what is new. A ``seq`` below the newest numbered one that it could not see
yet (its transaction was still running) is kept in ``<schema>.gaps`` and numbered
when it commits, or forgotten once every transaction that could hold it has ended
(``pg_snapshot_xmin`` past the gap's horizon): it was rolled back. Offsets thus
follow the order in which the sequencer saw transactions commit (see
docs/guides/durable.md for exactly what that promises). ``meta.offset_floor`` is
where a channel without a ``streams`` row starts, so a channel whose row was
removed after retention never numbers an offset again that a client may hold.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import psycopg2
from psycopg2 import sql

from .._formats import (
    Raw,
    check_json,
    dumps,
    json_body,
    json_message,
    message_id_problem,
    name_problem,
    new_message_id,
    reply_to_problem,
    text_body,
    validate_name,
)
from .._dsn import libpq_dsn
from .._statement import error_text, login_role, run, sqlstate
from ..errors import InvalidPayload, LogUnavailable, MessageTooLarge, first_line

logger = logging.getLogger(__name__)

#: The schema the log lives in unless told otherwise.
DEFAULT_SCHEMA = "pgws_sync"
#: The largest payload (UTF-8 bytes, inclusive) the log takes unless migrated otherwise.
DEFAULT_MAX_PAYLOAD = 1_048_576
#: The version of the log's tables and functions this release writes and reads.
SCHEMA_VERSION = 2
#: Message types a durable channel carries (a binary frame has no room for an offset).
DURABLE_TYPES = ("json", "text")
#: Messages one call of the sequencer numbers at most.
SEQUENCE_BATCH = 1000

# The statements that create a log; {s} is the schema. Shown in docs/guides/durable.md.
_CREATE = [
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE {s}.meta (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version integer NOT NULL,
    epoch text NOT NULL DEFAULT gen_random_uuid()::text,
    max_payload integer NOT NULL,
    wake_channel text NOT NULL,
    numbered_upto bigint NOT NULL DEFAULT 0,
    offset_floor bigint NOT NULL DEFAULT 0
)""",
    """CREATE TABLE {s}.messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- no CHECK: publish() checks every field, and a CHECK costs every publishing
    -- transaction about a seventh of a plain insert's CPU (docs/performance.md); a row
    -- written around publish() is numbered and framed safely whatever it holds
    channel text NOT NULL,
    id text,  -- NULL: the caller gave none; read back as a uuid made of the epoch and seq
    type text NOT NULL,
    payload text NOT NULL,
    reply_to text,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    published_at timestamptz NOT NULL DEFAULT clock_timestamp()
)""",
    """CREATE TABLE {s}.offsets (
    channel text NOT NULL,
    "offset" bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (channel, "offset")
)""",
    # no index on seq: each would cost the sequencer a sixth of its work per message, and
    # pruning finds a channel's expired offsets from its primary key (see _expired)
    """CREATE TABLE {s}.streams (
    channel text PRIMARY KEY,
    head bigint NOT NULL DEFAULT 0,
    pruned_to bigint NOT NULL DEFAULT 0,
    touched_at timestamptz NOT NULL DEFAULT now()
)""",
    """CREATE TABLE {s}.gaps (
    seq bigint PRIMARY KEY,
    horizon xid8 NOT NULL
)""",
]

# Version 1 (offsets taken under a row lock by the publisher) to 2, in place.
_UPGRADE_1 = [
    "ALTER TABLE {s}.messages RENAME TO messages_v1",
    "ALTER INDEX {s}.messages_pkey RENAME TO messages_v1_pkey",
    "ALTER TABLE {s}.streams RENAME TO streams_v1",
    "ALTER INDEX {s}.streams_pkey RENAME TO streams_v1_pkey",
    "ALTER TABLE {s}.meta ADD COLUMN numbered_upto bigint NOT NULL DEFAULT 0, "
    "ADD COLUMN offset_floor bigint NOT NULL DEFAULT 0",
] + _CREATE[2:] + [
    """INSERT INTO {s}.messages (seq, channel, id, type, payload, reply_to, xid, published_at)
    OVERRIDING SYSTEM VALUE SELECT row_number() OVER (ORDER BY m.published_at, m.channel,
    m."offset"), m.channel, m.id, m.type, m.payload, m.reply_to, '0'::xid8, m.published_at
    FROM {s}.messages_v1 m""",
    """INSERT INTO {s}.offsets (channel, "offset", seq) SELECT m.channel, m."offset",
    row_number() OVER (ORDER BY m.published_at, m.channel, m."offset") FROM {s}.messages_v1 m""",
    """INSERT INTO {s}.streams (channel, head, pruned_to) SELECT s.channel,
    greatest(s.pruned_to, coalesce((SELECT max(m."offset") FROM {s}.messages_v1 m
    WHERE m.channel = s.channel), 0)), s.pruned_to FROM {s}.streams_v1 s""",
    "UPDATE {s}.meta SET numbered_upto = (SELECT count(*) FROM {s}.messages_v1)",
    "SELECT setval(pg_get_serial_sequence({name} || '.messages', 'seq'), "
    "greatest(1, (SELECT count(*) FROM {s}.messages_v1)), "
    "(SELECT count(*) > 0 FROM {s}.messages_v1))",
    "DROP FUNCTION IF EXISTS {s}.publish(text, text, text, text, text)",
    "DROP TABLE {s}.messages_v1, {s}.streams_v1",
]

# Replaced on every migrate, so a release can fix them without a new version.
_FUNCTIONS = [
    """CREATE OR REPLACE FUNCTION {s}.publish(
    channel text, payload text, type text DEFAULT 'json', id text DEFAULT NULL,
    reply_to text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    limit_bytes CONSTANT integer := {max_payload};  -- meta.max_payload, set by migrate
    answered jsonb;
    parsed boolean;
    xact xid8;
    seq bigint;
BEGIN
    -- the common call, checked in one expression: a sixth less of the function's own cost
    -- than a statement per check; anything else takes the checks below, which name the fault
    IF NOT coalesce(publish.channel <> '' AND length(publish.channel) <= 200
            AND publish.channel !~ '[[:cntrl:]]' AND publish.type IN ('json', 'text')
            AND octet_length(publish.payload) <= limit_bytes
            AND (publish.type = 'text' OR publish.payload::json IS NOT NULL)
            AND publish.id IS NULL AND publish.reply_to IS NULL, false) THEN
        IF publish.channel IS NULL OR publish.channel = '' OR length(publish.channel) > 200
                OR publish.channel ~ '[[:cntrl:]]' THEN
            RAISE EXCEPTION 'pgws_sync.publish: invalid channel name %',
                quote_nullable(publish.channel) USING ERRCODE = '22023';
        END IF;
        IF publish.type IS NULL OR publish.type NOT IN ('json', 'text') THEN
            RAISE EXCEPTION 'pgws_sync.publish: type must be json or text, not %',
                quote_nullable(publish.type) USING ERRCODE = '22023';
        END IF;
        IF publish.payload IS NULL THEN
            RAISE EXCEPTION 'pgws_sync.publish: the payload is NULL' USING ERRCODE = '22004';
        END IF;
        IF octet_length(publish.payload) > limit_bytes THEN
            RAISE EXCEPTION 'pgws_sync.publish: the message for channel % is % bytes; '
                'the log takes at most %', publish.channel, octet_length(publish.payload),
                limit_bytes USING ERRCODE = '54000';
        END IF;
        IF publish.type = 'json' THEN
            -- raises on anything that is not JSON (an assignment, not PERFORM: no query per call)
            parsed := publish.payload::json IS NULL;
        END IF;
        IF publish.id IS NOT NULL AND (publish.id = '' OR length(publish.id) > 200
                OR publish.id ~ '[[:cntrl:]]') THEN
            RAISE EXCEPTION 'pgws_sync.publish: invalid message id % (1 to 200 characters, no '
                'control characters)', left(publish.id, 60) USING ERRCODE = '22023';
        END IF;
        IF publish.reply_to IS NOT NULL THEN
            BEGIN
                answered := publish.reply_to::jsonb;
            EXCEPTION WHEN invalid_text_representation THEN
                answered := NULL;
            END;
            IF answered IS NULL OR jsonb_typeof(answered) NOT IN ('string', 'number')
                    OR length(answered #>> '{{}}') > 200 THEN
                RAISE EXCEPTION 'pgws_sync.publish: reply_to must be the JSON text of a string '
                    '(at most 200 characters) or a number, not %', left(publish.reply_to, 60)
                    USING ERRCODE = '22023';
            END IF;
        END IF;
    END IF;
    -- the transaction id before the seq: a transaction holding a seq the sequencer cannot
    -- see yet is one its snapshots list as running (see sequence below)
    xact := pg_current_xact_id();
    INSERT INTO {s}.messages (channel, id, type, payload, reply_to)
        VALUES (publish.channel, publish.id, publish.type,
                publish.payload, publish.reply_to)
        RETURNING messages.seq INTO seq;
    RETURN seq;
END
$fn$""",
    """CREATE OR REPLACE FUNCTION {s}.sequence(batch integer DEFAULT 1000)
    RETURNS TABLE (channel text, head bigint, numbered bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
-- planned once per session, not on every call (a fifth of a call's CPU)
SET plan_cache_mode = force_generic_plan AS $fn$
#variable_conflict use_column
DECLARE
    m {s}.meta;
    before pg_snapshot;
    fresh bigint[];
    fresh_channels text[];
    filled bigint[] := '{{}}';  -- committed gaps, read only when there are gaps
    filled_channels text[] := '{{}}';
    top bigint;
BEGIN
    -- one numbering transaction at a time, whoever calls (and the pruner, when it drops a row)
    PERFORM pg_advisory_xact_lock(hashtext({lock}));
    SELECT * INTO STRICT m FROM {s}.meta;
    before := pg_current_snapshot();  -- every transaction running now began before this
    SELECT coalesce(array_agg(f.seq ORDER BY f.seq), '{{}}'),
           coalesce(array_agg(f.channel ORDER BY f.seq), '{{}}')
        INTO fresh, fresh_channels
        FROM (SELECT x.seq, x.channel FROM {s}.messages x WHERE x.seq > m.numbered_upto
              ORDER BY x.seq LIMIT batch) f;
    IF EXISTS (SELECT FROM {s}.gaps) THEN  -- nearly always empty: one look instead of two
        SELECT coalesce(array_agg(x.seq ORDER BY x.seq), '{{}}'),
               coalesce(array_agg(x.channel ORDER BY x.seq), '{{}}')
            INTO filled, filled_channels  -- by primary key, whatever the statistics say
            FROM {s}.messages x WHERE x.seq = ANY(ARRAY(SELECT g.seq FROM {s}.gaps g));
        -- gaps whose transaction committed are numbered now; those whose every possible
        -- transaction had ended before this call began (the oldest running id is past the
        -- horizon), and still unseen, were rolled back
        DELETE FROM {s}.gaps g
            WHERE g.seq = ANY(filled) OR g.horizon <= pg_snapshot_xmin(before);
    END IF;
    IF cardinality(fresh) > 0 THEN
        top := fresh[cardinality(fresh)];
        -- the horizon: this transaction's own id, taken after the rows were read; every
        -- transaction holding a gap took its id before its seq (see publish), so before this
        IF top - m.numbered_upto > cardinality(fresh) THEN  -- some seq is missing
            INSERT INTO {s}.gaps (seq, horizon)
                SELECT g.n, pg_current_xact_id()
                FROM (SELECT generate_series(m.numbered_upto + 1, top) AS n
                      EXCEPT SELECT unnest(fresh)) g;
        END IF;
        UPDATE {s}.meta SET numbered_upto = top;
    END IF;
    IF cardinality(fresh) + cardinality(filled) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH taken AS (
        SELECT t.seq, t.channel FROM unnest(filled || fresh, filled_channels || fresh_channels)
            AS t(seq, channel)
    ), counted AS (
        SELECT t.channel, count(*) AS n FROM taken t GROUP BY t.channel
    ), bumped AS (
        INSERT INTO {s}.streams AS s (channel, head)
        SELECT c.channel, m.offset_floor + c.n FROM counted c
        ON CONFLICT (channel) DO UPDATE
            SET head = s.head + excluded.head - m.offset_floor, touched_at = now()
        RETURNING s.channel, s.head
    ), added AS (
        INSERT INTO {s}.offsets (channel, "offset", seq)
        SELECT t.channel, b.head - c.n + row_number() OVER (PARTITION BY t.channel ORDER BY t.seq),
               t.seq
        FROM taken t JOIN counted c ON c.channel = t.channel JOIN bumped b ON b.channel = t.channel
    )
    -- a name no subscriber can hold (written around publish) wakes nobody: a NOTIFY of
    -- it could fail and stop numbering for every channel. The wake-up names the channel,
    -- its new head and where the WAL was (a replica reader waits for that head, see
    -- wake_target)
    SELECT b.channel, b.head, c.n FROM bumped b JOIN counted c ON c.channel = b.channel
        CROSS JOIN LATERAL (SELECT CASE WHEN b.channel <> '' AND length(b.channel) <= 200
            AND b.channel !~ '[[:cntrl:]]' THEN pg_notify(m.wake_channel, b.channel
                || chr(9) || b.head || chr(9) || pg_current_wal_insert_lsn()) END) n;
END
$fn$""",
    # publishing runs with the log owner's rights: only roles granted EXECUTE may publish
    "REVOKE ALL ON FUNCTION {s}.publish(text, text, text, text, text) FROM PUBLIC",
    "REVOKE ALL ON FUNCTION {s}.sequence(integer) FROM PUBLIC",
]

#: The rights of a role that runs workers (reads, numbers, prunes, publishes); {r} the role.
_WORKER_GRANTS = [
    "GRANT USAGE ON SCHEMA {s} TO {r}",
    "GRANT SELECT, UPDATE ON {s}.meta TO {r}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.streams TO {r}",
    "GRANT SELECT, INSERT, DELETE ON {s}.messages, {s}.offsets, {s}.gaps TO {r}",
    "GRANT EXECUTE ON FUNCTION {s}.publish(text, text, text, text, text), "
    "{s}.sequence(integer) TO {r}",
]
#: The rights of a role that only publishes (an app's writers, a trigger's owner).
_PUBLISHER_GRANTS = [
    "GRANT USAGE ON SCHEMA {s} TO {r}",
    "GRANT EXECUTE ON FUNCTION {s}.publish(text, text, text, text, text) TO {r}",
]


def grant_sql(schema: str, role: str, *, publisher_only: bool = False) -> List[str]:
    """The GRANT statements giving ``role`` what a worker needs on the log (or, with
    ``publisher_only``, only the right to publish), as text."""
    _check_schema_name(schema)
    return [t.replace("{s}", _quoted(schema)).replace("{r}", _quoted(role))
            for t in (_PUBLISHER_GRANTS if publisher_only else _WORKER_GRANTS)]


def _statements(schema: str, templates: Iterable[str],
                max_payload: int = DEFAULT_MAX_PAYLOAD) -> List[sql.Composed]:
    return [sql.SQL(t).format(s=sql.Identifier(schema), lock=sql.Literal(_lock_key(schema)),
                              name=sql.Literal(_quoted(schema)),
                              max_payload=sql.Literal(max_payload))
            for t in templates]


def _lock_key(schema: str) -> str:
    return schema + ".sequence"


def migration_sql(schema: str = DEFAULT_SCHEMA) -> List[str]:
    """The statements a new log's migration runs, as text (for the docs and for review)."""
    _check_schema_name(schema)
    first_row = ("INSERT INTO {s}.meta (version, max_payload, wake_channel) VALUES "
                 f"({SCHEMA_VERSION}, {DEFAULT_MAX_PAYLOAD}, {_literal(wake_channel_for(schema))})")
    return [t.replace("{s}", _quoted(schema)).replace("{lock}", _literal(_lock_key(schema)))
            .replace("{max_payload}", str(DEFAULT_MAX_PAYLOAD)).replace("{{", "{")
            .replace("}}", "}")
            for t in _CREATE + [first_row] + _FUNCTIONS]


class LogInfo(NamedTuple):
    """What the ``meta`` row of a log says."""

    schema: str
    version: int
    epoch: str
    max_payload: int
    wake_channel: str


def wake_channel_for(schema: str) -> str:
    """The NOTIFY channel a log's sequencer wakes readers on."""
    return f"{schema}_log"


class WakeTarget(NamedTuple):
    """What a wake-up says: new messages were numbered on ``channel``, up to ``head``."""

    channel: str
    #: The channel's head after the numbering (None: a wake-up of an earlier build).
    head: Optional[int]
    #: The primary's WAL insert position before the numbering committed, in bytes.
    wal: Optional[int]


def lsn(text: Optional[str]) -> int:
    """A ``pg_lsn`` (``'16/B374D848'``) as a number of bytes; None (nothing replayed) is 0.
    Raises ValueError for text that is not one."""
    if not text:
        return 0
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def wake_target(payload: str) -> WakeTarget:
    """Parse a wake-up's payload: ``channel<TAB>head<TAB>lsn``, or a bare channel name
    (earlier builds). A woken name never holds a control character (see ``sequence``)."""
    channel, tab, rest = payload.partition("\t")
    head, _, wal = rest.partition("\t")
    if not tab or not head.isdigit() or not head.isascii() or int(head) >= 2**63:
        return WakeTarget(payload, None, None)  # no head a log can hold (a bigint)
    try:
        position: Optional[int] = lsn(wal) if "/" in wal else None
    except ValueError:
        position = None
    return WakeTarget(channel, int(head), position)


def migrate(conn: Any, *, schema: str = DEFAULT_SCHEMA,
            max_payload: Optional[int] = None, grant: Sequence[str] = (),
            grant_publish: Sequence[str] = ()) -> List[str]:
    """Create or upgrade the durable log (idempotent); returns what it did, one line each.

    ``conn`` is a psycopg2 connection (not inside a transaction) or a DSN (a SQLAlchemy
    URL too). It
    runs in one transaction under an advisory lock, so several workers
    migrating at once do it once. A version 1 log is upgraded in place.
    ``max_payload`` (bytes): set the largest payload; None keeps the current
    one (:data:`DEFAULT_MAX_PAYLOAD` for a new log). ``grant``: roles that run
    workers get their rights (:func:`grant_sql`); ``grant_publish``: roles that
    may only publish. Publishing runs with the owner's rights (``SECURITY
    DEFINER``): no other role may publish until granted.
    """
    _check_schema_name(schema)
    if max_payload is not None and not 1 <= max_payload <= 1_000_000_000:
        raise InvalidPayload(f"max_payload must be between 1 and 1000000000 bytes, "
                             f"got {max_payload!r}")
    if isinstance(conn, str) or hasattr(conn, "render_as_string"):
        own = psycopg2.connect(libpq_dsn(conn))
        try:
            return migrate(own, schema=schema, max_payload=max_payload, grant=grant,
                           grant_publish=grant_publish)
        finally:
            own.close()
    done: List[str] = []
    ident = sql.Identifier(schema)
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema + ".migrate",))
            cur.execute("SELECT to_regclass(%s)", (f"{_quoted(schema)}.meta",))
            if cur.fetchone()[0] is None:
                for stmt in _statements(schema, _CREATE):
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
                if version == 1:
                    for stmt in _statements(schema, _UPGRADE_1):
                        cur.execute(stmt)
                    cur.execute(sql.SQL("UPDATE {}.meta SET version = %s").format(ident),
                                (SCHEMA_VERSION,))
                    done.append(f"upgraded the durable log in schema {schema!r} from version 1 "
                                f"to {SCHEMA_VERSION} (offsets numbered after commit)")
                done.extend(_relax_messages(cur, schema))
                done.extend(_drop_seq_index(cur, schema))
                if max_payload is not None and max_payload != current:
                    cur.execute(sql.SQL("UPDATE {}.meta SET max_payload = %s").format(ident),
                                (max_payload,))
                    done.append(f"set max_payload from {current} to {max_payload} bytes")
                if not done:
                    done.append(f"the durable log in schema {schema!r} is up to date "
                                f"(version {version}); nothing to do")
            cur.execute(sql.SQL("SELECT max_payload FROM {}.meta").format(ident))
            for stmt in _statements(schema, _FUNCTIONS, max_payload=cur.fetchone()[0]):
                cur.execute(stmt)  # the function carries the limit: no read of meta per call
            for role, publisher_only in ([(r, False) for r in grant]
                                         + [(r, True) for r in grant_publish]):
                for grant_stmt in grant_sql(schema, role, publisher_only=publisher_only):
                    cur.execute(grant_stmt)
                    done.append(grant_stmt)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise LogUnavailable(_migrate_rights_message(conn, schema, first_line(exc))) from None
    finally:
        conn.autocommit = autocommit
    return done


def _relax_messages(cur: Any, schema: str) -> List[str]:
    """A log made by an earlier version 2 release: drop the CHECKs of ``messages`` and the
    NOT NULL of its ``id`` (see ``_CREATE``). Only when they are there: the ALTER waits for
    every open publishing transaction."""
    table = f"{_quoted(schema)}.messages"
    cur.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass "
                "AND contype = 'c' ORDER BY conname", (table,))
    changes: List[sql.Composable] = [
        sql.SQL("DROP CONSTRAINT {}").format(sql.Identifier(name)) for (name,) in cur.fetchall()]
    cur.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass "
                "AND attname = 'id'", (table,))
    if cur.fetchone()[0]:
        changes.append(sql.SQL("ALTER COLUMN id DROP NOT NULL"))
    if not changes:
        return []
    cur.execute(sql.SQL("ALTER TABLE {}.messages ").format(sql.Identifier(schema))
                + sql.SQL(", ").join(changes))
    return [f"relaxed {schema}.messages: no CHECK, id may be NULL (publishing costs less)"]


def _drop_seq_index(cur: Any, schema: str) -> List[str]:
    """A log made by an earlier version 2 release: drop the index on ``offsets.seq`` (see
    ``_CREATE``). Only when it is there: the DROP waits for the sequencer's transaction."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{_quoted(schema)}.offsets_seq",))
    if not cur.fetchone()[0]:
        return []
    cur.execute(sql.SQL("DROP INDEX {}.offsets_seq").format(sql.Identifier(schema)))
    return [f"dropped the index {schema}.offsets_seq (numbering costs less)"]


def _migrate_rights_message(conn: Any, schema: str, said: str) -> str:
    """One line: who cannot migrate, what PostgreSQL said, and who can (and how to let them)."""
    role = login_role(conn) or "<role>"
    database = getattr(getattr(conn, "info", None), "dbname", None) or "<database>"
    return (f"the role {role} cannot create or upgrade the durable log in schema {schema!r}: "
            f"{said}. Run 'pgws-sync migrate' as the role that owns the log (for a new log, "
            f"one with CREATE on the database: GRANT CREATE ON DATABASE {_quoted(database)} TO "
            f"{_quoted(role)}), then give the app's role its rights: 'pgws-sync migrate "
            f"--schema {schema} --grant <app role>'")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: The longest schema name whose wake-up channel (``<schema>_log``) still fits 63 bytes.
MAX_SCHEMA_BYTES = 63 - len("_log")


def _check_schema_name(schema: str) -> None:
    problem = name_problem(schema, max_chars=None)
    if problem is None and len(schema.encode()) > MAX_SCHEMA_BYTES:
        problem = (f"it is {len(schema.encode())} bytes long; at most {MAX_SCHEMA_BYTES} "
                   f"(its wake-up channel {schema}_log must fit PostgreSQL's 63 bytes)")
    if problem is not None:
        raise InvalidPayload(f"invalid schema name {schema!r}: {problem}")


def log_info(cur: Any, schema: str = DEFAULT_SCHEMA) -> LogInfo:
    """Read the log's ``meta`` row, or raise :class:`LogUnavailable` saying how to fix it."""
    try:
        cur.execute("SELECT to_regclass(%s)", (f"{_quoted(schema)}.meta",))
        if cur.fetchone()[0] is None:
            raise LogUnavailable(
                f"the durable log is missing: no table {schema}.meta in this database. Create "
                f"it once with 'pgws-sync migrate --dsn <DSN>' (or pgws_sync.migrate(conn))")
        cur.execute(sql.SQL("SELECT version, epoch, max_payload, wake_channel FROM {}.meta")
                    .format(sql.Identifier(schema)))
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise LogUnavailable(_rights_message(schema, first_line(exc),
                                             login_role(cur.connection) or "<role>")) from None
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


def _rights_message(schema: str, missing: str, role: str = "<role>", *,
                    publisher_only: bool = False) -> str:
    """One line: the role, what it lacks, and the command and GRANTs that give it the rights."""
    option = "--grant-publish" if publisher_only else "--grant"
    return (f"the role {role} cannot {'publish to' if publisher_only else 'use'} the durable "
            f"log in schema {schema!r}: {missing}. Have the log's owner run 'pgws-sync migrate "
            f"--schema {schema} {option} {role}', or these GRANTs: "
            f"{'; '.join(grant_sql(schema, role, publisher_only=publisher_only))}")


#: What a worker does with each table: read, publish, number and prune.
_TABLE_RIGHTS = (("meta", "SELECT UPDATE"), ("streams", "SELECT INSERT UPDATE DELETE"),
                 ("messages", "SELECT INSERT DELETE"), ("offsets", "SELECT INSERT DELETE"),
                 ("gaps", "SELECT INSERT DELETE"))


def check_rights(cur: Any, schema: str = DEFAULT_SCHEMA) -> None:
    """Raise :class:`LogUnavailable` naming the first right the current role lacks to read,
    publish to, number and prune the log."""
    cur.execute("SELECT current_user, has_schema_privilege(%s, 'USAGE')", (schema,))
    role, usage = cur.fetchone()
    if not usage:
        raise LogUnavailable(_rights_message(schema, f"it lacks USAGE on schema {schema}", role))
    for table, rights in _TABLE_RIGHTS:
        for right in rights.split():  # one at a time: a list asks whether any is held
            cur.execute("SELECT has_table_privilege(%s, %s)", (f"{_quoted(schema)}.{table}", right))
            if not cur.fetchone()[0]:
                raise LogUnavailable(_rights_message(
                    schema, f"it lacks {right} on {schema}.{table}", role))
    for function in ("publish(text, text, text, text, text)", "sequence(integer)"):
        cur.execute("SELECT has_function_privilege(%s, 'EXECUTE')",
                    (f"{_quoted(schema)}.{function}",))
        if not cur.fetchone()[0]:
            name = function.split("(")[0]
            raise LogUnavailable(_rights_message(schema, f"it lacks EXECUTE on {schema}.{name}",
                                                 role))


# ------------------------------------------------------------------ publishing


def log_payload(message: Any, type: str) -> str:
    """The payload column's text for ``message`` of ``type`` (json: JSON text; text: the str)."""
    if type == "json":
        return str(message) if isinstance(message, Raw) else json_body(message)
    if type == "text":
        return text_body(message)
    raise InvalidPayload(f"durable channels carry json or text messages, not {type!r} "
                         f"(a binary frame has no room for an offset)")


def check_message(channel: str, payload: str, type: str, max_payload: Optional[int]) -> None:
    """Raise before publishing what the log would refuse (:class:`MessageTooLarge` above
    ``max_payload`` bytes, None: no size check here; :class:`InvalidPayload`)."""
    size = len(payload.encode("utf-8", "surrogatepass"))
    if max_payload is not None and size > max_payload:
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
                 reply_to: Any, max_payload: Optional[int]
                 ) -> Tuple[str, str, str, str, Optional[str]]:
    """The checked arguments of :func:`publish_call` (raises what :func:`publish` raises);
    ``max_payload`` None leaves the size to the database's check."""
    validate_name(channel)
    payload = log_payload(message, type)
    check_message(channel, payload, type, max_payload)
    if message_id is not None:
        problem = message_id_problem(message_id)
        if problem is not None:
            raise InvalidPayload(f"invalid message id {message_id!r:.60}: {problem}")
    if reply_to is not None:
        problem = reply_to_problem(reply_to)
        if problem is not None:
            raise InvalidPayload(f"invalid reply_to {reply_to!r:.60}: {problem}")
    return (channel, payload, type, message_id or new_message_id(),
            None if reply_to is None else dumps(reply_to))


def publish(conn: Any, channel: str, message: Any, *, type: str = "json",
            json_text: bool = False, message_id: Optional[str] = None, reply_to: Any = None,
            schema: str = DEFAULT_SCHEMA, max_payload: Optional[int] = None) -> int:
    """Append ``message`` to ``channel``'s durable stream inside ``conn``'s transaction.

    ``conn`` is a psycopg2 or psycopg 3 connection, or a SQLAlchemy ``Connection`` or
    ``Session`` (``db.session``: its current transaction). The message reaches
    subscribers when the transaction commits (at once in autocommit) and never if it rolls
    back; it takes no lock another transaction waits for. Its offset is numbered after
    commit, so this returns the message's ``seq`` in the log's intake instead (increasing,
    not per channel). ``type`` ``json``: ``message`` is a Python value, sent as JSON (a
    ``str`` is a JSON string); with ``json_text=True`` it is JSON text, sent as written.
    ``type`` ``text``: a str. Raises :class:`MessageTooLarge` above the log's
    ``max_payload`` (checked here first when ``max_payload`` is given),
    :class:`InvalidPayload` / :class:`InvalidChannel` for bad input, and
    :class:`LogUnavailable` naming the role and the GRANT when the role lacks a right.
    """
    if json_text and type != "json":
        raise InvalidPayload(f"json_text=True is for json messages, not {type!r} ones")
    args = publish_args(channel, json_message(message, json_text), type=type,
                        message_id=message_id, reply_to=reply_to, max_payload=max_payload)
    try:
        row = run(conn, f"SELECT {_quoted(schema)}.publish(%s, %s, %s, %s, %s)", args)
    except Exception as exc:
        code = sqlstate(exc)
        if code == "54000":  # the log's own max_payload
            limit = _limit_in(error_text(exc))
            if limit is not None:
                raise MessageTooLarge(len(args[1].encode("utf-8", "surrogatepass")), limit,
                                      channel) from None
        if code == "42501":  # insufficient_privilege
            raise LogUnavailable(_rights_message(schema, error_text(exc),
                                                 login_role(conn) or "<role>",
                                                 publisher_only=True)) from None
        raise
    if row is None:
        raise LogUnavailable(f"{schema}.publish returned nothing: is {schema!r} a pgws_sync log?")
    return int(row[0])


def _limit_in(error: str) -> Optional[int]:
    """The limit named by the publish function's 'takes at most N' error, if it is one."""
    words = error.rsplit("takes at most ", 1)
    return int(words[1].split()[0]) if len(words) == 2 and words[1].split()[0].isdigit() else None


class Numbered(NamedTuple):
    """What one call of the sequencer did to one channel."""

    channel: str
    #: The channel's newest offset now.
    head: int
    #: How many messages it numbered (the last ``numbered`` offsets up to ``head``).
    numbered: int


def sequence(conn: Any, schema: str = DEFAULT_SCHEMA, batch: int = SEQUENCE_BATCH
             ) -> List[Numbered]:
    """Number up to ``batch`` newly committed messages (one call of ``<schema>.sequence``,
    which also wakes the readers); returns what it did per channel. ``conn`` must be in
    autocommit.

    Any number of callers may run it at once: the function takes a transaction
    lock, so numbering is serial.
    """
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT channel, head, numbered FROM {}.sequence(%s)").format(
            sql.Identifier(schema)), (batch,))
        return [Numbered(channel, int(head), int(n)) for channel, head, n in cur.fetchall()]


def has_work_sql(schema: str, conn: Any) -> str:
    """A query saying whether :func:`sequence` has anything to do: a committed message
    above ``numbered_upto``, or a gap to look at again. Prepared once, it costs far less
    than a call that finds nothing (no function, lock or snapshot), which a quiet log
    would otherwise pay every poll."""
    return sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM {s}.messages m WHERE m.seq > e.numbered_upto) "
        "OR EXISTS (SELECT 1 FROM {s}.gaps) FROM {s}.meta e").format(
            s=sql.Identifier(schema)).as_string(conn)


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
    #: The payload's bytes and those of the rows before it in the same read.
    running_bytes: int = 0


def read_after(cur: Any, schema: str, positions: Sequence[Tuple[str, int]],
               limit: int, max_bytes: Optional[int] = None) -> Tuple[str, Dict[str, List[Row]]]:
    """The log's epoch, and up to ``limit`` messages of each ``(channel, after)`` with offsets
    above ``after``, in offset order, by channel (one round trip for every channel). With
    ``max_bytes``, a channel's messages stop before the first that starts past that many
    payload bytes (the first always comes)."""
    cur.execute(sql.SQL(
        'SELECT e.epoch, r.channel, r."offset", coalesce(r.id, substr(encode(sha256(convert_to('
        "e.epoch || '/' || r.seq, 'UTF8')), 'hex'), 1, 32)::uuid::text), r.type, r.payload, "
        'r.reply_to, '
        "extract(epoch FROM r.published_at)::float8, r.running FROM {s}.meta e "
        "LEFT JOIN LATERAL (SELECT w.* FROM unnest(%s::text[], %s::bigint[]) AS p(channel, after) "
        "CROSS JOIN LATERAL (SELECT k.*, sum(octet_length(k.payload)) OVER (ORDER BY "
        'k."offset")::bigint AS running FROM (SELECT o."offset", m.* FROM {s}.offsets o '
        'JOIN {s}.messages m ON m.seq = o.seq WHERE o.channel = p.channel AND o."offset" > '
        # offsets have no gaps: the range bounds the read whatever plan the statistics give
        'p.after AND o."offset" <= p.after + %s ORDER BY o."offset" LIMIT %s) k) w '
        "WHERE %s::bigint IS NULL OR w.running - octet_length(w.payload) < %s) r ON true "
        'ORDER BY r.channel, r."offset"').format(s=sql.Identifier(schema)),
        ([c for c, _ in positions], [a for _, a in positions], limit, limit, max_bytes,
         max_bytes))
    epoch = ""
    out: Dict[str, List[Row]] = {}
    for record in cur.fetchall():
        epoch = record[0]
        if record[1] is not None:
            out.setdefault(record[1], []).append(Row(record[1], *record[2:]))
    return epoch, out


def heads(cur: Any, schema: str, channels: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """``(head, oldest kept offset)`` of each channel: the newest numbered offset, and
    ``head + 1`` when nothing is kept. A channel without a ``streams`` row has its head at
    the log's ``offset_floor`` (0 until a channel's row was removed after retention)."""
    cur.execute(sql.SQL(
        "SELECT c.channel, coalesce(s.head, e.offset_floor), "
        "(SELECT min(o.\"offset\") FROM {s}.offsets o WHERE o.channel = c.channel) "
        "FROM unnest(%s::text[]) AS c(channel) CROSS JOIN {s}.meta e "
        "LEFT JOIN {s}.streams s ON s.channel = c.channel"
    ).format(s=sql.Identifier(schema)), (list(channels),))
    return {channel: (int(head), int(head) + 1 if low is None else int(low))
            for channel, head, low in cur.fetchall()}


def backlog(cur: Any, schema: str) -> Tuple[int, float]:
    """How many numbered messages the log keeps, and the age in seconds of its oldest
    (0 if none)."""
    cur.execute(sql.SQL(
        "SELECT coalesce(sum(s.head - greatest(s.pruned_to, (SELECT min(o.\"offset\") - 1 "
        "FROM {s}.offsets o WHERE o.channel = s.channel))), 0), coalesce((SELECT "
        "extract(epoch FROM now() - m.published_at) FROM {s}.messages m ORDER BY m.seq "
        "LIMIT 1), 0)::float8 FROM {s}.streams s WHERE s.head > s.pruned_to"
    ).format(s=sql.Identifier(schema)))
    kept, oldest = cur.fetchone()
    return int(kept or 0), max(0.0, float(oldest))


def intake(cur: Any, schema: str) -> Tuple[int, float]:
    """How many committed messages wait for the sequencer, and the age in seconds of the
    oldest of them (0 if none)."""
    cur.execute(sql.SQL(
        "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(m.published_at)), "
        "0)::float8 FROM {s}.messages m WHERE m.seq > (SELECT numbered_upto FROM {s}.meta)"
    ).format(s=sql.Identifier(schema)))
    waiting, oldest = cur.fetchone()
    return int(waiting), max(0.0, float(oldest))


def oldest_waiting(cur: Any, schema: str) -> Optional[int]:
    """The ``seq`` of the oldest committed message the sequencer has not numbered, if any."""
    cur.execute(sql.SQL(
        "SELECT min(m.seq) FROM {s}.messages m WHERE m.seq > (SELECT numbered_upto "
        "FROM {s}.meta)").format(s=sql.Identifier(schema)))
    oldest = cur.fetchone()[0]
    return None if oldest is None else int(oldest)


# --------------------------------------------------------------------- pruning


def prune(conn: Any, schema: str, *, max_age: float, keep: int, batch: int = 1000,
          stop: Optional[Any] = None) -> Optional[int]:
    """Delete numbered messages older than ``max_age`` seconds, or beyond the newest ``keep``
    of their channel, oldest first, ``batch`` rows per short transaction; then drop the
    ``streams`` rows of channels that kept nothing for ``max_age`` (raising ``offset_floor``
    past their heads, so no offset is ever numbered twice).

    It looks only at what is to be pruned: the oldest messages (by ``seq``) and one scan of
    ``streams``. Only one process prunes a log at a time (a session advisory lock): returns
    how many messages this call deleted, or None if another session holds the lock. Only
    the oldest offsets of a channel go, so what is kept has no holes. ``stop`` (an Event)
    ends the pass early. ``conn`` must be in autocommit.
    """
    ident = sql.Identifier(schema)
    deleted = 0
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (schema + ".prune",))
        if not cur.fetchone()[0]:
            return None
        try:
            upto: Dict[str, int] = {}
            for channel, offset in _expired(cur, ident, max_age, keep):
                upto[channel] = max(upto.get(channel, 0), offset)
            for channel in sorted(upto):
                while stop is None or not stop.is_set():
                    # one short transaction: a batch goes, the channel remembers how far
                    cur.execute(sql.SQL(
                        'WITH gone AS (DELETE FROM {s}.offsets WHERE channel = %s AND "offset" '
                        'IN (SELECT "offset" FROM {s}.offsets WHERE channel = %s '
                        'AND "offset" <= %s ORDER BY "offset" LIMIT %s) RETURNING "offset", seq), '
                        "dropped AS (DELETE FROM {s}.messages WHERE seq IN (SELECT seq FROM gone)) "
                        "UPDATE {s}.streams SET pruned_to = greatest(pruned_to, "
                        '(SELECT max("offset") FROM gone)) WHERE channel = %s '
                        "AND EXISTS (SELECT FROM gone) RETURNING (SELECT count(*) FROM gone)"
                    ).format(s=ident), (channel, channel, upto[channel], batch, channel))
                    row = cur.fetchone()
                    if row is None:
                        break
                    deleted += int(row[0])
            if stop is None or not stop.is_set():
                _drop_idle_streams(conn, schema, max_age)
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (schema + ".prune",))
    return deleted


def _expired(cur: Any, ident: sql.Identifier, max_age: float, keep: int
             ) -> List[Tuple[str, int]]:
    """``(channel, offset)``: prune the channel up to that offset. By age: walk the oldest
    numbered messages in ``seq`` order until one is young enough (so only the expired ones
    and one page more are read); each channel among them goes up to its first offset that
    is not expired (offsets in order from its primary key: nothing kept has a hole). By
    count: one scan of ``streams``."""
    last = 0
    while True:
        cur.execute(sql.SQL(
            "SELECT m.seq, m.published_at < now() - %s * interval '1 second' FROM {s}.messages m "
            "WHERE m.seq > %s AND m.seq <= (SELECT numbered_upto FROM {s}.meta) "
            "ORDER BY m.seq LIMIT 1000").format(s=ident), (max_age, last))
        page = cur.fetchall()
        for seq, old in page:
            if not old:
                break
            last = seq
        else:
            if len(page) == 1000:
                continue
        break
    cur.execute(sql.SQL(
        "SELECT s.channel, coalesce((SELECT o.\"offset\" - 1 FROM {s}.offsets o "
        "WHERE o.channel = s.channel AND o.\"offset\" > s.pruned_to AND o.seq > %s "
        "ORDER BY o.\"offset\" LIMIT 1), s.head) FROM {s}.streams s WHERE s.channel IN "
        "(SELECT DISTINCT m.channel FROM {s}.messages m WHERE m.seq <= %s) "
        "UNION ALL SELECT channel, head - %s FROM {s}.streams WHERE head - pruned_to > %s"
    ).format(s=ident), (last, last, keep, keep))
    return [(channel, int(offset)) for channel, offset in cur.fetchall() if offset is not None]


def _drop_idle_streams(conn: Any, schema: str, max_age: float) -> None:
    """Remove the rows of channels with nothing kept and nothing numbered for ``max_age``."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL(
            "SELECT pg_advisory_xact_lock(hashtext(%s)); "
            "WITH gone AS (DELETE FROM {s}.streams s WHERE s.pruned_to >= s.head "
            "AND s.touched_at < now() - %s * interval '1 second' "
            "AND NOT EXISTS (SELECT FROM {s}.offsets o WHERE o.channel = s.channel) "
            "RETURNING s.head) UPDATE {s}.meta SET offset_floor = greatest(offset_floor, "
            "(SELECT max(head) FROM gone)) WHERE EXISTS (SELECT FROM gone)"
        ).format(s=sql.Identifier(schema)), (_lock_key(schema), max_age))
