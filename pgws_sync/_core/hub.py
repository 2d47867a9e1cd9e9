"""The hub: which connections exist, which keys (audiences, channels) reach them, and fan-out."""

from __future__ import annotations

import logging
import threading
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from .. import _metrics
from .connection import APP_JSON, Connection, Delivered, Delivery
from .wire import CloseCode
from .wire import Frame

logger = logging.getLogger(__name__)


class Memberships(NamedTuple):
    """Which keys each connection of a fan-out to several keys is reached by."""

    #: Per connection, the keys it is in (of those fanned out to).
    keys_of: Dict[Connection, List[str]]
    #: The key of each frame, in order.
    frame_keys: List[str]


class Hub:
    """Registry of connections by key; hands each one frames without ever blocking.

    A key is any string a connection can be reached by: its audiences, and
    whatever an application joins it to (prefix your own keys, e.g.
    ``"sub:" + channel``, to keep them apart from audiences). A connection
    whose queue is full is unregistered at once and asked to close with 1013
    (reason ``conn.slow_reason``): a slow client never slows the others. Keys joined
    with ``drop_as`` (the ``drop`` policy) instead lose the frames that do not
    fit, counted for a gap frame, and the connection stays.
    """

    def __init__(self, label: str = "hub") -> None:
        #: The ``endpoint`` label of the figures this hub records.
        self.label = label
        self._lock = threading.Lock()  # guards the four dicts below
        self._connections: Dict[str, Connection] = {}
        self._by_key: Dict[str, Set[Connection]] = {}
        self._keys: Dict[Connection, Set[str]] = {}
        self._drop_as: Dict[Connection, Dict[str, str]] = {}

    def add(self, conn: Connection) -> None:
        """Register ``conn`` under its audiences."""
        with self._lock:
            self._connections[conn.id] = conn
            self._keys[conn] = set()
            for audience in conn.audiences:
                self._join(conn, audience)

    def remove(self, conn: Connection) -> bool:
        """Unregister ``conn`` from every key; False if it was not registered (any more)."""
        with self._lock:
            if self._connections.pop(conn.id, None) is None:
                return False
            for key in self._keys.pop(conn, ()):
                self._drop(conn, key)
            self._drop_as.pop(conn, None)
            return True

    def join(self, conn: Connection, key: str, *, drop_as: Optional[str] = None) -> bool:
        """Make ``conn`` receive what is sent to ``key``; False if it is not registered.

        With ``drop_as`` (a channel name for the gap frame), frames for
        ``key`` that do not fit in the queue are dropped for ``conn`` and
        counted under that name instead of closing the connection with 1013.
        Joining again replaces the policy.
        """
        with self._lock:
            if conn.id not in self._connections:
                return False
            self._join(conn, key)
            policies = self._drop_as.get(conn)
            if drop_as is not None:
                if policies is None:
                    policies = self._drop_as[conn] = {}
                policies[key] = drop_as
            elif policies is not None:
                self._forget_policy(conn, policies, key)
            return True

    def _forget_policy(self, conn: Connection, policies: Dict[str, str], key: str) -> None:
        policies.pop(key, None)
        if not policies:
            del self._drop_as[conn]

    def leave(self, conn: Connection, key: str) -> bool:
        """Stop ``conn`` receiving ``key``; False if it was not a member."""
        with self._lock:
            keys = self._keys.get(conn)
            if keys is None or key not in keys:
                return False
            keys.discard(key)
            self._drop(conn, key)
            policies = self._drop_as.get(conn)
            if policies is not None:
                self._forget_policy(conn, policies, key)
            return True

    def _join(self, conn: Connection, key: str) -> None:
        self._keys[conn].add(key)
        self._by_key.setdefault(key, set()).add(conn)

    def _drop(self, conn: Connection, key: str) -> None:
        members = self._by_key.get(key)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._by_key[key]

    def keys_of(self, conn: Connection) -> FrozenSet[str]:
        """The keys ``conn`` is reachable by now (empty once it is unregistered)."""
        with self._lock:
            return frozenset(self._keys.get(conn, ()))

    def members(self, key: str) -> List[Connection]:
        with self._lock:
            return list(self._by_key.get(key, ()))

    def get(self, conn_id: str) -> Optional[Connection]:
        """The registered connection with id ``conn_id``, if it is here."""
        with self._lock:
            return self._connections.get(conn_id)

    def __len__(self) -> int:
        return len(self._connections)

    def connections(self) -> List[Connection]:
        with self._lock:
            return list(self._connections.values())

    def key_count(self) -> int:
        """How many keys have at least one connection (for leak checks)."""
        with self._lock:
            return len(self._by_key)

    def policy_count(self) -> int:
        """How many connections have a ``drop_as`` key (for leak checks)."""
        with self._lock:
            return len(self._drop_as)

    def fan_out(self, messages: Sequence[Tuple[str, Frame]], *, kind: int = APP_JSON) -> None:
        """Deliver ``(key, frame)`` pairs, in order, as one item per connection.

        A frame is text (``str``) or binary (``bytes``), an app frame of ``kind``
        (``APP_TEXT`` for text that may not be JSON).

        Each frame is encoded once; a connection in several of the audiences
        gets the frames meant for any of them, in the order given.
        """
        if not messages:
            return
        encoded = [(audience, Delivery.of(text, kind)) for audience, text in messages]
        wanted = {audience for audience, _ in encoded}
        with self._lock:
            members = {a: list(self._by_key.get(a, ())) for a in wanted}
        if len(encoded) == 1:
            audience, item = encoded[0]
            self._deliver(((conn, item) for conn in members[audience]), (audience,), None)
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
        self._deliver(pairs, None, Memberships(memberships, [a for a, _ in encoded]))

    def broadcast(self, text: str) -> None:
        """Deliver one frame to every connection, whatever its keys."""
        item = Delivery.of(text)
        self._deliver(((conn, item) for conn in self.connections()), (), None)

    def send_to(self, conn_id: str, data: Frame, *, kind: int = APP_JSON) -> bool:
        """Deliver one app frame to the connection ``conn_id``; False if it is not here."""
        conn = self.get(conn_id)
        if conn is None:
            return False
        self._deliver([(conn, Delivery.of(data, kind))], (), None)
        return True

    def _deliver(
        self,
        pairs: Iterable[Tuple[Connection, Delivery]],
        keys: Optional[Sequence[str]],
        several: Optional[Memberships],
    ) -> None:
        """Hand each connection its item; deal with those whose queue is full.

        The keys an overflowing connection's item was for are ``keys``, or its
        entry in ``several.keys_of`` (``several.frame_keys`` lists the key of each frame).
        """
        if _metrics.enabled():
            overflowed: List[Connection] = []
            delivered = queued = written = 0
            for conn, item in pairs:
                done = conn.deliver(item)
                if done is Delivered.FULL:
                    overflowed.append(conn)
                    continue
                delivered += len(item.texts) or 1
                if done is Delivered.WRITTEN:
                    written += 1
                else:
                    queued += 1
            _metrics.inc("messages_delivered", delivered, endpoint=self.label)
            _metrics.inc("socket_writes", queued, endpoint=self.label, how="queued")
            _metrics.inc("socket_writes", written, endpoint=self.label, how="direct")
        else:
            overflowed = [conn for conn, item in pairs if not conn.deliver(item)]
        for conn in overflowed:
            if several is not None:
                mine = set(several.keys_of[conn])
                frame_keys: Sequence[str] = [k for k in several.frame_keys if k in mine]
            else:
                frame_keys = keys or ()
            missed = self._droppable(conn, frame_keys)
            if missed is not None:
                conn.add_missed(missed)
                _metrics.inc("frames_dropped", sum(missed.values()), endpoint=self.label)
                continue
            if self.remove(conn):
                _metrics.inc("slow_clients_dropped", endpoint=self.label)
                conn.request_close(CloseCode.TRY_AGAIN_LATER, conn.slow_reason)
                logger.warning(
                    "dropped connection %s: its send queue is full (the client reads too slowly)",
                    conn.id,
                )

    def _droppable(self, conn: Connection, frame_keys: Sequence[str]) -> Optional[Dict[str, int]]:
        """Frames to count as missed, by channel, if every key of the lost frames has the
        drop policy for ``conn``; None if the connection must be closed instead."""
        with self._lock:
            policies = self._drop_as.get(conn)
            if not policies or not frame_keys or not all(k in policies for k in frame_keys):
                return None
            missed: Dict[str, int] = {}
            for key in frame_keys:
                channel = policies[key]
                missed[channel] = missed.get(channel, 0) + 1
            return missed
