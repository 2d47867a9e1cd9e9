"""WebSocket wire format for server-to-client data frames (RFC 6455), as pure functions."""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import struct
from typing import Optional, Union

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2

#: A frame's content: ``str`` for a text frame, ``bytes`` for a binary frame.
Frame = Union[str, bytes]


class CloseCode(enum.IntEnum):
    """The close codes the server sends (RFC 6455 section 7.4 and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    #: Too many messages, rate limited, or no pong in time.
    POLICY_VIOLATION = 1008
    #: A drain: the server restarts; the reason says when to reconnect.
    SERVICE_RESTART = 1012
    #: The client reads too slowly (its send queue is full).
    TRY_AGAIN_LATER = 1013

    def __str__(self) -> str:
        return str(self.value)  # "1001" in logs, on every Python


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


#: RFC 6455 section 1.3: appended to the client's key to prove the server read it.
HANDSHAKE_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def valid_key(key: Optional[str]) -> bool:
    """Whether ``key`` is a Sec-WebSocket-Key: base64 of 16 bytes (22 characters and ``==``)."""
    if not key:
        return False
    try:
        data = key.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    return len(data) == 24 and data.endswith(b"==") and \
        data.translate(None, _BASE64_ALPHABET) == b"=="


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value answering the client's ``key``."""
    digest = hashlib.sha1((key.strip() + HANDSHAKE_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


_ANSWER_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
_GUID = HANDSHAKE_GUID.encode("ascii")


def switching_protocols(key: str, subprotocol: Optional[str] = None) -> bytes:
    """The complete 101 answer to an upgrade request with ``key`` (no extensions)."""
    accept = binascii.b2a_base64(hashlib.sha1(key.strip().encode("ascii") + _GUID).digest(),
                                 newline=False)
    if subprotocol:
        return b"".join((_ANSWER_HEAD, accept, b"\r\nSec-WebSocket-Protocol: ",
                         subprotocol.encode("latin-1"), b"\r\n\r\n"))
    return _ANSWER_HEAD + accept + b"\r\n\r\n"


def warm_up() -> None:
    """Run the handshake's SHA-1 once: OpenSSL's first use in a process touches
    much of its library code, better paid at start than by the first socket.
    (After a fork the child maps those pages again, so workers call it too.)"""
    accept_key("dGhlIHNhbXBsZSBub25jZQ==")


warm_up()
