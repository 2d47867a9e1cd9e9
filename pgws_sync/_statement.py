"""One statement on the connection the app already has: psycopg2, psycopg 3, or SQLAlchemy.

Every function that publishes inside the caller's transaction runs its one
statement here, so each accepts the same kinds of connection and fails the same way:
a psycopg2 or psycopg 3 connection (its current transaction), a SQLAlchemy
``Connection`` (its current transaction), or a SQLAlchemy ``Session`` (including
Flask-SQLAlchemy's ``db.session``), whose transaction it joins or begins.
The statement is plain text with ``%s`` placeholders, which all of them read alike.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from .errors import first_line


def _is_sqlalchemy_session(conn: Any) -> bool:
    # Session and scoped_session (db.session): get_bind and a callable connection()
    return hasattr(conn, "get_bind") and callable(getattr(conn, "connection", None))


def run(conn: Any, query: str, params: Sequence[Any]) -> Optional[Tuple[Any, ...]]:
    """Execute ``query`` with ``params`` in ``conn``'s transaction; the first row, if any.

    Database errors are raised as the driver (or SQLAlchemy) raises them; :func:`sqlstate`
    and :func:`error_text` read any of them.
    """
    if _is_sqlalchemy_session(conn):
        conn = conn.connection()
    if hasattr(conn, "exec_driver_sql"):  # a SQLAlchemy Connection
        # a tuple: SQLAlchemy reads a list of tuples as many executions
        result = conn.exec_driver_sql(query, tuple(params))
        row = result.first() if result.returns_rows else None
        return None if row is None else tuple(row)
    if not hasattr(conn, "cursor"):
        raise TypeError(f"publishing takes a psycopg2 or psycopg connection, or a SQLAlchemy "
                        f"Connection or Session, not {type(conn).__name__}")
    with conn.cursor() as cur:
        cur.execute(query, tuple(params))
        if cur.description is None:
            return None
        row = cur.fetchone()
        return None if row is None else tuple(row)


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own error inside ``exc`` (SQLAlchemy wraps it as ``.orig``)."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def sqlstate(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a database error from any of the drivers, or None."""
    err = driver_error(exc)
    code = getattr(err, "pgcode", None) or getattr(err, "sqlstate", None)
    return code if isinstance(code, str) else None


def error_text(exc: BaseException) -> str:
    """The first line of the database's message, whichever driver raised it."""
    return first_line(driver_error(exc))


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from the database (any driver, or SQLAlchemy around one)."""
    return sqlstate(exc) is not None


def login_role(conn: Any) -> Optional[str]:
    """The role ``conn`` logged in as (psycopg2, psycopg 3, SQLAlchemy), or None if unknown."""
    try:
        if _is_sqlalchemy_session(conn):
            name = conn.get_bind().url.username
        elif hasattr(conn, "exec_driver_sql"):
            name = conn.engine.url.username
        else:
            name = conn.info.user
    except Exception:  # whatever the object is, the message goes on without the name
        return None
    return name if isinstance(name, str) and name else None
