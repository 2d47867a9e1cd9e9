"""WebSocket client framing for the benchmark: the upgrade request, frames in and out, deflate."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from typing import List, Optional, Tuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN, RSV1 = 0x80, 0x40


class ProtocolError(Exception):
    """The server sent something this client cannot read."""


def upgrade_request(host: str, path: str, *, deflate: bool = False) -> Tuple[bytes, bytes]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Accept`` value the answer must carry."""
    key = base64.b64encode(os.urandom(16))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key.decode()}",
             "Sec-WebSocket-Version: 13"]
    if deflate:
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


class Handshake:
    """The parsed answer to an upgrade request."""

    def __init__(self, status: int, headers: dict) -> None:
        self.status = status
        self.headers = headers

    @classmethod
    def parse(cls, head: bytes) -> "Handshake":
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP answer: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return cls(int(parts[1]), headers)

    def check(self, accept: bytes) -> None:
        """Raise ProtocolError unless this is a valid 101 answer for ``accept``."""
        if self.status != 101:
            raise ProtocolError(f"HTTP {self.status} instead of 101")
        if self.headers.get("sec-websocket-accept", "").encode() != accept:
            raise ProtocolError("wrong Sec-WebSocket-Accept")

    def deflate(self) -> Optional["Inflater"]:
        """An Inflater if the server accepted permessage-deflate, else None."""
        value = self.headers.get("sec-websocket-extensions", "")
        for ext in value.split(","):
            params = [p.strip() for p in ext.split(";")]
            if params[0] == "permessage-deflate":
                return Inflater(no_context_takeover="server_no_context_takeover" in params[1:])
            if params[0]:
                raise ProtocolError(f"extension not offered: {params[0]!r}")
        return None


class Inflater:
    """Decompresses permessage-deflate messages (RFC 7692) for one connection."""

    __slots__ = ("no_context_takeover", "_z")

    def __init__(self, *, no_context_takeover: bool = False) -> None:
        self.no_context_takeover = no_context_takeover
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)

    def inflate(self, data: bytes) -> bytes:
        if self.no_context_takeover:
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            return self._z.decompress(data + b"\x00\x00\xff\xff")
        except zlib.error as exc:
            raise ProtocolError(f"bad compressed message: {exc}") from exc


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One complete, masked client frame (payloads under 64 KiB)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([FIN | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return head + mask + masked


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    return client_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])


def split_frames(buf: bytearray) -> List[Tuple[int, bytes]]:
    """Remove the complete server frames from ``buf``: [(first byte, payload), ...].

    The first byte carries FIN, RSV1 and the opcode. Server frames must not be masked.
    """
    frames = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        b1, b2 = buf[pos], buf[pos + 1]
        if b2 & 0x80:
            raise ProtocolError("masked frame from the server")
        size, start = b2 & 0x7F, pos + 2
        if size == 126:
            if end - pos < 4:
                break
            size, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
        elif size == 127:
            if end - pos < 10:
                break
            size, start = struct.unpack_from("!Q", buf, pos + 2)[0], pos + 10
        if end - start < size:
            break
        frames.append((b1, bytes(buf[start:start + size])))
        pos = start + size
    if pos:
        del buf[:pos]
    return frames


def close_payload(payload: bytes) -> Tuple[int, str]:
    """(code, reason) of a close frame's payload; 1005 when it has none."""
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack_from("!H", payload)[0], payload[2:].decode("utf-8", "replace")
