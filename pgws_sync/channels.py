"""Channel names: what PostgreSQL accepts as the same name for LISTEN and pg_notify()."""

from __future__ import annotations

from .errors import InvalidChannel

#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_CHANNEL_BYTES = 63


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it can be LISTENed to and NOTIFYed as is, else raise.

    Names are used as quoted identifiers, so case, dashes, spaces and quotes are
    kept. LISTEN would silently truncate a name longer than 63 bytes while
    ``pg_notify()`` rejects it, so such names are refused here.
    """
    if not isinstance(channel, str):
        raise InvalidChannel(channel, "a channel name must be a string")
    if not channel:
        raise InvalidChannel(channel, "a channel name cannot be empty")
    if "\x00" in channel:
        raise InvalidChannel(channel, "a channel name cannot contain NUL characters")
    size = len(channel.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            channel,
            f"it is {size} bytes long; PostgreSQL keeps only {MAX_CHANNEL_BYTES} bytes of a name",
        )
    return channel
