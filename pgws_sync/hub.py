"""The hub: which connections exist, who is in which audience, and fan-out to their queues."""

from __future__ import annotations

import logging
import threading
from typing import Dict, FrozenSet, Iterable, List, Sequence, Set, Tuple

from .connection import CLOSE_TRY_AGAIN_LATER, Connection, Delivery

logger = logging.getLogger(__name__)


class Hub:
    """Registry of connections by audience; hands each one frames without ever blocking.

    A connection whose queue is full is unregistered at once and asked to
    close with 1013 ``send queue full``: a slow client never slows the others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the two dicts below
        self._connections: Dict[str, Connection] = {}
        self._by_audience: Dict[str, Set[Connection]] = {}

    def add(self, conn: Connection) -> None:
        with self._lock:
            self._connections[conn.id] = conn
            for audience in conn.audiences:
                self._by_audience.setdefault(audience, set()).add(conn)

    def remove(self, conn: Connection) -> bool:
        """Unregister ``conn``; False if it was not registered (any more)."""
        with self._lock:
            if self._connections.pop(conn.id, None) is None:
                return False
            for audience in conn.audiences:
                members = self._by_audience.get(audience)
                if members is not None:
                    members.discard(conn)
                    if not members:
                        del self._by_audience[audience]
            return True

    def __len__(self) -> int:
        return len(self._connections)

    def connections(self) -> List[Connection]:
        with self._lock:
            return list(self._connections.values())

    def audience_count(self) -> int:
        """How many audiences have at least one connection (for leak checks)."""
        with self._lock:
            return len(self._by_audience)

    def fan_out(self, messages: Sequence[Tuple[str, str]]) -> None:
        """Deliver ``(audience, frame text)`` pairs, in order, as one item per connection.

        Each frame is encoded once; a connection in several of the audiences
        gets the frames meant for any of them, in the order given.
        """
        if not messages:
            return
        encoded = [(audience, Delivery.of(text)) for audience, text in messages]
        wanted = {audience for audience, _ in encoded}
        with self._lock:
            members = {a: list(self._by_audience.get(a, ())) for a in wanted}
        if len(encoded) == 1:
            audience, item = encoded[0]
            self._deliver((conn, item) for conn in members[audience])
            return
        memberships: Dict[Connection, List[str]] = {}
        for audience, conns in members.items():
            for conn in conns:
                memberships.setdefault(conn, []).append(audience)
        cache: Dict[FrozenSet[str], Delivery] = {}
        pairs = []
        for conn, audiences in memberships.items():
            key = frozenset(audiences)
            if key not in cache:
                cache[key] = Delivery.join([d for a, d in encoded if a in key])
            pairs.append((conn, cache[key]))
        self._deliver(pairs)

    def broadcast(self, text: str) -> None:
        """Deliver one frame to every connection, whatever its audiences."""
        item = Delivery.of(text)
        self._deliver((conn, item) for conn in self.connections())

    def _deliver(self, pairs: Iterable[Tuple[Connection, Delivery]]) -> None:
        overflowed = [conn for conn, item in pairs if not conn.deliver(item)]
        for conn in overflowed:
            if self.remove(conn):
                conn.request_close(CLOSE_TRY_AGAIN_LATER, "send queue full")
                logger.warning(
                    "dropped connection %s: its send queue is full (the client reads too slowly)",
                    conn.id,
                )
