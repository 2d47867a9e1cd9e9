"""Database addresses as apps write them: libpq's forms and SQLAlchemy's URLs, made libpq's."""

from __future__ import annotations

import re
from typing import Protocol, Union


class RendersUrl(Protocol):
    """A SQLAlchemy ``URL`` (``db.engine.url``): anything that renders itself, password included."""

    def render_as_string(self, hide_password: bool = ...) -> str: ...


#: What an app may give as a database address: a libpq connection string or URI, a
#: SQLAlchemy URL string (``postgresql+psycopg2://``, ``postgresql+psycopg://``), or a
#: SQLAlchemy ``URL`` object.
Dsn = Union[str, RendersUrl]

# SQLAlchemy's dialect+driver prefix: postgresql+psycopg2://, postgres+psycopg://, ...
_DRIVER_SCHEME = re.compile(r"^(postgresql|postgres)\+[A-Za-z0-9_]+://", re.IGNORECASE)


def libpq_dsn(dsn: Dsn) -> str:
    """``dsn`` as libpq reads it: a SQLAlchemy URL loses its ``+driver`` (its password is kept);
    anything else is returned as it is, for libpq to judge."""
    if not isinstance(dsn, str):
        render = getattr(dsn, "render_as_string", None)
        if render is None:
            raise TypeError(f"a database address is a string or a SQLAlchemy URL, not "
                            f"{type(dsn).__name__}")
        dsn = str(render(hide_password=False))
    match = _DRIVER_SCHEME.match(dsn)
    if match:
        return "postgresql://" + dsn[match.end():]
    return dsn
