"""Channel names: what PostgreSQL accepts as the same name for LISTEN and pg_notify()."""

from __future__ import annotations

from .errors import InvalidChannel

#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_CHANNEL_BYTES = 63


def validate_name(channel: object) -> str:
    """Return ``channel`` if it is a name any source can carry, else raise.

    A channel name is non-empty text without NUL that encodes as UTF-8.
    """
    if not isinstance(channel, str):
        raise InvalidChannel(channel, "a channel name must be a string")
    if not channel:
        raise InvalidChannel(channel, "a channel name cannot be empty")
    if "\x00" in channel:
        raise InvalidChannel(channel, "a channel name cannot contain NUL characters")
    try:
        channel.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidChannel(channel, "a channel name must be encodable as UTF-8 "
                                      "(it contains a lone surrogate)") from None
    return channel


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it can be LISTENed to and NOTIFYed as is, else raise.

    Names are used as quoted identifiers, so case, dashes, spaces and quotes are
    kept. LISTEN would silently truncate a name longer than 63 bytes while
    ``pg_notify()`` rejects it, so such names are refused here.
    """
    name = validate_name(channel)
    size = len(name.encode("utf-8"))
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            name,
            f"it is {size} bytes long; PostgreSQL keeps only {MAX_CHANNEL_BYTES} bytes of a name",
        )
    return name
