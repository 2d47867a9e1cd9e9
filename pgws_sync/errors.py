"""The one error tree of pgws_sync: every error the library raises is a PgwsError."""

from __future__ import annotations

from typing import Dict, Optional


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (database errors run to several), for logs."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


class PgwsError(Exception):
    """Root of every error pgws_sync raises on purpose."""


class ConfigError(PgwsError, ValueError):
    """A setting is missing or has a value the library cannot use."""


class InvalidChannel(ConfigError):
    """A channel name PostgreSQL would not treat as the same name everywhere."""

    def __init__(self, channel: object, reason: str) -> None:
        self.channel = channel
        self.reason = reason
        super().__init__(f"invalid channel name {channel!r}: {reason}")


class InvalidPayload(PgwsError, ValueError):
    """A payload that is not what the pgws format needs (a JSON object)."""

    def __init__(self, reason: str, payload_start: str = "") -> None:
        self.reason = reason
        self.payload_start = payload_start
        text = reason if not payload_start else f"{reason} (payload starts {payload_start!r})"
        super().__init__(text)


class PayloadTooLarge(PgwsError, ValueError):
    """A NOTIFY payload that PostgreSQL would refuse: 8000 bytes or more."""

    def __init__(self, size: int, limit: int, channel: Optional[str] = None) -> None:
        self.size = size
        self.limit = limit
        self.channel = channel
        where = f" on channel {channel!r}" if channel is not None else ""
        super().__init__(
            f"NOTIFY payload{where} is {size} bytes; PostgreSQL accepts at most {limit - 1} "
            f"(UTF-8 bytes, audience prefix included). Send a smaller message, for example "
            f"the id of a row the browser then fetches."
        )


class Refused(PgwsError):
    """Raised by an endpoint's ``on_connect`` hook to refuse a socket before the upgrade.

    The client gets an HTTP response with ``status`` and ``body`` (plain text)
    and no WebSocket is opened.
    """

    def __init__(self, status: int, body: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        super().__init__(f"refused with HTTP {status}: {body}")


class ListenerStopped(PgwsError, RuntimeError):
    """The listener was stopped and cannot be used again."""
