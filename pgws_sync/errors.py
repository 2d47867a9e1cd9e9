"""Every error pgws_sync raises: one tree under :class:`PgwsError`, each class importable here."""

from __future__ import annotations

from typing import Any, Dict, Optional


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (database errors run to several), for logs."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


class JsonTextWarning(UserWarning):
    """A ``str`` holding a JSON object or array was published as a value: it arrives as a JSON
    string, not as the object. Pass the object itself, or the text with ``json_text=True``."""


class PgwsError(Exception):
    """Root of every error pgws_sync raises on purpose."""


# ------------------------------------------------------------------ settings


class ConfigError(PgwsError, ValueError):
    """A setting is missing or has a value the library cannot use."""


class ListenerStopped(PgwsError, RuntimeError):
    """The listener (or another source) was stopped and cannot be used again."""


# --------------------------------------------------------- names and payloads


class InvalidChannel(PgwsError, ValueError):
    """A channel name that cannot be used (``channel`` and ``reason`` say why)."""

    def __init__(self, channel: object, reason: str) -> None:
        self.channel = channel
        self.reason = reason
        super().__init__(f"invalid channel name {channel!r}: {reason}")


class InvalidPayload(PgwsError, ValueError):
    """A message or payload that does not have the shape its format needs."""

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


class PublicationTooLarge(PayloadTooLarge):
    """A pub/sub message whose NOTIFY would reach PostgreSQL's 8000-byte limit."""

    def __init__(self, size: int, limit: int, channel: Optional[str]) -> None:
        super().__init__(size, limit, channel)
        where = f"for channel {channel!r} " if channel is not None else ""
        self.args = (
            f"the message {where}would take {size} bytes as a NOTIFY; PostgreSQL accepts at most "
            f"{limit - 1} bytes, envelope included (about {limit - 100} bytes of JSON or text, "
            f"{(limit - 100) * 3 // 4} of binary). Send a smaller message, for example the id "
            f"of a row the browser then fetches.",
        )


class MessageTooLarge(PayloadTooLarge):
    """A message for a durable channel larger than the log's ``max_payload``."""

    def __init__(self, size: int, limit: int, channel: Optional[str]) -> None:
        super().__init__(size, limit + 1, channel)
        self.limit = limit
        where = f"for channel {channel!r} " if channel is not None else ""
        self.args = (
            f"the message {where}is {size} bytes (UTF-8); the durable log takes at most {limit} "
            f"(its max_payload, set by 'pgws-sync migrate --max-payload'). Nothing was published.",
        )


class ProtocolError(PgwsError, ValueError):
    """A client frame the server cannot act on; the reason goes back in an error frame."""

    def __init__(self, reason: str, reply_to: Any = None) -> None:
        self.reason = reason
        self.reply_to = reply_to
        super().__init__(reason)


# ----------------------------------------------------------------- sockets


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


class TokenRefused(Refused):
    """A token that does not open a socket: HTTP 400 with ``body`` as the answer.

    ``body`` is ``Token expired``, ``Missing mode``, ``No allowed channels`` or
    ``Error: <reason>``, as postgres-websockets answers.
    """

    def __init__(self, body: str) -> None:
        super().__init__(400, body)

    def __str__(self) -> str:
        return self.body


# -------------------------------------------------------------- publishing


class NotifyFailed(PgwsError, RuntimeError):
    """A NOTIFY was not sent: no connection was free, or the database is unreachable or refused it.

    ``reason`` is one line; ``message`` (default: the reason) is what ``str()`` gives;
    ``cause`` is ``unreachable``, ``busy``, ``closed``, ``queue_full`` (PostgreSQL's
    notification queue is fuller than ``max_queue_usage``) or ``refused`` (the database said no).
    """

    cause = "refused"

    def __init__(self, reason: str, message: Optional[str] = None) -> None:
        self.reason = reason
        super().__init__(message or reason)


class PublishFailed(NotifyFailed):
    """The database did not take a publication's NOTIFY (it is unreachable, or refused it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, f"could not publish: {reason}")


class WriteFailed(NotifyFailed):
    """A browser's message could not be NOTIFYed; the sender gets the reason in an error frame."""


class RedisPublishFailed(PgwsError, RuntimeError):
    """A PUBLISH did not reach Redis (it is unreachable, refused it, or the source was stopped).

    ``channel`` is the channel, ``reason`` one line, ``url`` the server's
    address with any password redacted.
    """

    def __init__(self, channel: str, reason: str, url: str,
                 hint: str = "Check that redis-server is running there and that the URL is right.",
                 ) -> None:
        self.channel = channel
        self.reason = reason
        self.url = url
        super().__init__(
            f"could not PUBLISH on Redis channel {channel!r} at {url}: {reason}. {hint}"
        )


class LogUnavailable(PgwsError, RuntimeError):
    """The durable log cannot be used: its schema is missing or of another version, or this
    database role lacks a right it needs. The message names the fix."""


class BatcherStopped(PgwsError, RuntimeError):
    """The batcher was stopped (the endpoint is shutting down): nothing more is batched."""


class DatabaseUnreachable(PgwsError):
    """The database did not answer within the start-up attempts."""


class CommandFailed(PgwsError):
    """A command could not do its job for a reason outside the configuration (exit code 1)."""


#: Every class above; each is importable from here (``pgws_sync.errors``).
ERRORS = (
    PgwsError, ConfigError, ListenerStopped, InvalidChannel, InvalidPayload, PayloadTooLarge,
    PublicationTooLarge, MessageTooLarge, ProtocolError, Refused, TokenRefused, NotifyFailed,
    PublishFailed, WriteFailed, RedisPublishFailed, LogUnavailable, BatcherStopped,
    DatabaseUnreachable, CommandFailed,
)

#: The errors of the front door (``pgws_sync.<Name>``): the root, and those users raise or
#: catch in ordinary work. The others are named ``pgws_sync.errors.<Name>``.
FRONT_DOOR_ERRORS = (
    PgwsError, ConfigError, InvalidChannel, InvalidPayload, PayloadTooLarge, ProtocolError,
    Refused, PublishFailed, LogUnavailable,
)

for _cls in ERRORS:
    _cls.__module__ = "pgws_sync" if _cls in FRONT_DOOR_ERRORS else "pgws_sync.errors"
del _cls
