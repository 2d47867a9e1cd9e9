"""WebSocket wire format for server-to-client data frames (RFC 6455), as pure functions."""

from __future__ import annotations

import struct

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


def encode_frame(data: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """Return one complete, unmasked, unfragmented frame carrying ``data``.

    A server's frames are never masked, so the bytes are the same for every
    recipient: encode a message once and write the result to every socket.
    """
    size = len(data)
    first = 0x80 | opcode
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + data


def encode_text(text: str) -> bytes:
    """Return one complete text frame for ``text``."""
    return encode_frame(text.encode("utf-8"), OPCODE_TEXT)
