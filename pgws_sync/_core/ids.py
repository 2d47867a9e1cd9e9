"""Connection ids: random (version 4) UUID strings, cheap to draw while many sockets connect."""

from __future__ import annotations

import os
import threading


class _RandomIds:
    """Random (version 4) UUID strings, drawn from random bytes fetched 64 ids at a time.

    ``uuid.uuid4()`` asks the kernel on every call and lets go of the GIL:
    a thread switch per socket while many connect. The ids are as
    unguessable as uuid4's; a forked child starts with none of its parent's.
    """

    _BATCH = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._offset = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._offset = 0

    def next(self) -> str:
        while True:
            with self._lock:
                start = self._offset
                if start < len(self._bytes):
                    self._offset = start + 16
                    return uuid4_string(self._bytes, start)
            fresh = os.urandom(16 * self._BATCH)  # outside the lock
            with self._lock:
                if self._offset >= len(self._bytes):  # no other thread refilled meanwhile
                    self._bytes, self._offset = fresh, 0


def uuid4_string(data: bytes, start: int) -> str:
    """``str(uuid.UUID(bytes=data[start:start + 16], version=4))``, without building a UUID."""
    raw = bytearray(data[start:start + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_ids = _RandomIds()


def new_connection_id() -> str:
    """A fresh random id for a connection."""
    return _ids.next()
