"""Helpers for the durable-stream tests: a fresh log per test, a durable app, resuming clients."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import psycopg2

from pgws_sync import migrate

from .helpers import Gunicorn, Ws, wait_for
from .pubsub_helpers import serve_pubsub

_schemas = itertools.count()


def new_log(dsn: str, **options: Any) -> str:
    """Create a log in a schema no other test uses; returns the schema's name."""
    schema = f"log_{os.getpid()}_{next(_schemas)}"
    conn = psycopg2.connect(dsn)
    try:
        migrate(conn, schema=schema, **options)
    finally:
        conn.close()
    return schema


def one(dsn: str, query: str) -> Any:
    """The first column of the first row ``query`` returns, on a connection of its own."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()[0]
    finally:
        conn.close()


def serve_durable(dsn: str, schema: str, options: Optional[Dict[str, Any]] = None,
                  **kwargs: Any) -> Gunicorn:
    return serve_pubsub(dsn, {"durable": True, "log_schema": schema, **(options or {})},
                        **kwargs)


class Resumer:
    """A client of a durable endpoint that remembers, per channel, the offset it has read up to
    and the epoch, and resumes with them."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.positions: Dict[str, Tuple[int, str]] = {}
        self.received: Dict[str, List[Any]] = {}
        self.ws: Optional[Ws] = None

    def connect(self, channels: List[str]) -> List[Dict[str, Any]]:
        """Open a socket, subscribe (with since and epoch when known); returns the replies."""
        self.ws = Ws(self.server.ws_url())
        welcome = self.ws.recv_json()
        assert welcome["event"] == "welcome", welcome
        replies = []
        for channel in channels:
            action: Dict[str, Any] = {"action": "subscribe", "channel": channel, "id": channel}
            if channel in self.positions:
                action["since"], action["epoch"] = self.positions[channel]
            self.ws.client.send(json.dumps(action))
            reply = self.read_until_reply(channel)
            replies.append(reply)
        return replies

    def read_until_reply(self, channel: str) -> Dict[str, Any]:
        while True:
            frame = self.next()
            if frame.get("reply_to") == channel and "event" in frame:
                assert frame["event"] in ("subscribed", "resync_required"), frame
                return frame

    def next(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The next frame; message frames are checked and recorded."""
        assert self.ws is not None
        frame: Dict[str, Any] = self.ws.recv_json(timeout)
        if "offset" in frame and "event" not in frame:
            channel = frame["channel"]
            last = self.positions.get(channel, (0, frame["epoch"]))[0]
            assert frame["offset"] == last + 1 or channel not in self.positions, \
                f"{channel}: offset {frame['offset']} after {last}"
            self.positions[channel] = (frame["offset"], frame["epoch"])
            self.received.setdefault(channel, []).append(frame["payload"])
        elif frame.get("event") in ("subscribed", "resync_required"):
            channel = frame["channel"]
            if channel not in self.positions or frame["event"] == "resync_required":
                self.positions[channel] = (frame["offset"], frame["epoch"])
        return frame

    def read_all(self, counts: Dict[str, int], timeout: float = 30.0) -> None:
        """Read until ``counts[channel]`` messages of each channel were received in all."""
        wait_for(lambda: self._read_some() or all(
            len(self.received.get(c, [])) >= n for c, n in counts.items()), timeout,
            message=f"messages {counts}")

    def _read_some(self) -> bool:
        """Read every frame that has arrived (waiting up to 50 ms for the first)."""
        assert self.ws is not None
        client = self.ws.client
        if not client.input_buffer:
            client.event.wait(0.05)
            client.event.clear()
        while client.input_buffer:
            self.next(timeout=1)
        return False

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


def publish_many(dsn: str, schema: str, messages: Iterable[Tuple[str, Any]], *,
                 numbered: bool = True) -> int:
    """Publish ``(channel, message)`` pairs in one transaction; returns how many. With
    ``numbered``, wait until a running sequencer has numbered them (a server must run)."""
    from pgws_sync import publish_durable

    conn = psycopg2.connect(dsn)
    n = 0
    try:
        with conn:
            for channel, message in messages:
                publish_durable(conn, channel, message, schema=schema)
                n += 1
    finally:
        conn.close()
    if numbered:
        wait_numbered(dsn, schema)
    return n


def intake(dsn: str, schema: str) -> int:
    """How many committed messages wait for the sequencer."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {schema}.messages "
                        f"WHERE seq > (SELECT numbered_upto FROM {schema}.meta)")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def wait_numbered(dsn: str, schema: str, timeout: float = 30.0) -> None:
    """Wait until the server's sequencer has numbered every committed message."""
    wait_for(lambda: intake(dsn, schema) == 0, timeout, message="the sequencer to number "
             "every committed message")


def number_all(dsn: str, schema: str) -> int:
    """Number every committed message here, as the sequencer would (no server needed);
    returns how many."""
    from pgws_sync.sources.log import sequence

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    total = 0
    try:
        while True:
            done = sum(n.numbered for n in sequence(conn, schema))
            total += done
            if not done:
                return total
    finally:
        conn.close()
