"""The durable delivery part on its own: Streams with a real log, a hub and socketless
connections; one failure (a row, a request, a stalled read) stays where it happened."""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Dict, Iterator, List

import psycopg2
import pytest

from pgws_sync import publish_durable
from pgws_sync._core.connection import Connection, Delivered, Delivery
from pgws_sync._core.hub import Hub
from pgws_sync.pubsub import streams as streams_module
from pgws_sync.pubsub.streams import Streams
from pgws_sync.sources.log import Row

from ..durable_helpers import new_log
from ..helpers import wait_for


class Recording(Connection):
    """A connection without a socket that keeps every frame handed to it, in order."""

    def __init__(self) -> None:
        super().__init__(["test"])
        self.frames: List[Dict[str, Any]] = []
        self.frames_lock = threading.Lock()

    def deliver(self, item: Delivery) -> Delivered:
        with self.frames_lock:
            self.frames.extend(json.loads(text) for text in item.texts)
        return Delivered.QUEUED

    def seen(self) -> List[Dict[str, Any]]:
        with self.frames_lock:
            return list(self.frames)

    def events(self, event: str) -> List[Dict[str, Any]]:
        return [f for f in self.seen() if f.get("event") == event]

    def messages(self, channel: str) -> List[Dict[str, Any]]:
        return [f for f in self.seen() if f.get("channel") == channel and "offset" in f
                and "event" not in f]


def plain_frame(row: Row, epoch: str) -> str:
    """A message frame as the test reads it back (the endpoint's own adds more fields)."""
    frame: Dict[str, Any] = {"channel": row.channel, "offset": row.offset,
                             "payload": row.payload}
    if row.reply_to is not None:
        frame["reply_to"] = json.loads(row.reply_to)
    return json.dumps(frame)


@pytest.fixture
def make_streams(pg_dsn: str) -> Iterator[Callable[..., Streams]]:
    """Start a Streams on a fresh log (safety-net checks every 0.1 s, so no listener is
    needed to wake it); stopped at the end."""
    made: List[Streams] = []

    def make(make_frame: Callable[[Row, str], str] = plain_frame,
             key: Callable[[str], str] = lambda channel: "sub:" + channel) -> Streams:
        streams = Streams(pg_dsn, schema=new_log(pg_dsn), hub=Hub("test"), key=key,
                          make_frame=make_frame, label="test", retention_seconds=3600,
                          retention_messages=1000, prune_every=None, check_interval=0.1,
                          sequencer_poll=0.01)
        streams.start()
        made.append(streams)
        wait_for(lambda: streams.status()["connected"], message="the streams thread connected")
        return streams

    yield make
    for streams in made:
        streams.stop()


def connect(streams: Streams) -> Recording:
    conn = Recording()
    streams.hub.add(conn)
    return conn


def publish(dsn: str, schema: str, channel: str, message: Any, **options: Any) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        publish_durable(conn, channel, message, schema=schema, **options)
    finally:
        conn.close()


def subscribed(conn: Recording, streams: Streams, channel: str) -> None:
    assert streams.subscribe(conn, channel, reply_to=channel) is None
    wait_for(lambda: any(f.get("reply_to") == channel for f in conn.seen()),
             message=f"the reply to the subscribe to {channel!r}")


def test_a_row_that_cannot_be_framed_goes_out_without_its_bad_field(make_streams, pg_dsn):
    """The frame builder fails on one row (its reply_to): that row is delivered without it,
    the rows around it as they are, and the position moves past all three."""
    def strict_frame(row: Row, epoch: str) -> str:
        if row.reply_to is not None:
            raise ValueError("this frame builder refuses reply_to")
        return plain_frame(row, epoch)

    streams = make_streams(make_frame=strict_frame)
    conn = connect(streams)
    subscribed(conn, streams, "rows")
    publish(pg_dsn, streams.schema, "rows", {"n": 1})
    publish(pg_dsn, streams.schema, "rows", {"n": 2}, reply_to="request-7")
    publish(pg_dsn, streams.schema, "rows", {"n": 3})
    wait_for(lambda: len(conn.messages("rows")) == 3, message="three messages")
    got = conn.messages("rows")
    assert [json.loads(m["payload"])["n"] for m in got] == [1, 2, 3]
    assert [m["offset"] for m in got] == [1, 2, 3]
    assert all("reply_to" not in m for m in got)
    assert conn.events("error") == [] and streams.status()["connected"]


def test_a_request_that_fails_is_answered_alone_and_the_others_go_on(make_streams, pg_dsn):
    """A subscribe whose handling raises (a bug, here in the hub key of one channel) gets one
    error frame; the other subscribes of the same burst are served, the thread stays
    connected, and the failed channel no longer counts toward the socket's limit."""
    def key(channel: str) -> str:
        if channel == "broken":
            raise RuntimeError("a bug in one request")
        return "sub:" + channel

    streams = make_streams(key=key)
    conn = connect(streams)
    for channel in ("before", "broken", "after"):
        assert streams.subscribe(conn, channel, reply_to=channel) is None
    wait_for(lambda: len([f for f in conn.seen() if "reply_to" in f]) == 3,
             message="three replies")
    errors = conn.events("error")
    assert len(errors) == 1 and errors[0]["reply_to"] == "broken"
    assert "subscribe to 'broken' failed: internal error" in errors[0]["error"]
    assert {f["channel"] for f in conn.events("subscribed")} == {"before", "after"}
    assert streams.claimed(conn) == {"before", "after"}
    publish(pg_dsn, streams.schema, "after", "still served")
    wait_for(lambda: conn.messages("after"), message="a message on 'after'")
    status = streams.status()
    assert status["connected"] and status["error"] is None


def test_a_stalled_read_shows_in_status_and_delivery_resumes_when_it_ends(
        make_streams, pg_dsn, monkeypatch):
    """A lock on the log's tables holds the streams thread's read: status() says stalled
    (after STALL_SECONDS, shortened here) without dropping the connection; once the lock
    goes, the read finishes and what was published meanwhile is delivered."""
    monkeypatch.setattr(streams_module, "STALL_SECONDS", 0.3)
    streams = make_streams()
    conn = connect(streams)
    subscribed(conn, streams, "stall")
    locker = psycopg2.connect(pg_dsn)
    try:
        locker.cursor().execute(
            f"LOCK TABLE {streams.schema}.messages, {streams.schema}.offsets, "
            f"{streams.schema}.streams IN ACCESS EXCLUSIVE MODE")
        wait_for(lambda: streams.status()["stalled"], timeout=5, message="stalled")
        assert streams.status()["connected"]
        publisher = threading.Thread(  # waits for the lock, then commits
            target=publish, args=(pg_dsn, streams.schema, "stall", "after the stall"),
            name="publisher", daemon=True)
        publisher.start()
    finally:
        locker.rollback()
        locker.close()
    publisher.join(30)
    wait_for(lambda: conn.messages("stall"), timeout=15, message="the message after the stall")
    wait_for(lambda: not streams.status()["stalled"], message="not stalled any more")
    assert json.loads(conn.messages("stall")[0]["payload"]) == "after the stall"


def test_while_the_log_does_not_answer_new_subscribes_are_answered_busy(
        make_streams, pg_dsn, monkeypatch):
    """The requests waiting for a stalled streams thread are bounded: past the bound a
    subscribe is refused at once with "busy", and once the log answers again the waiting
    ones are answered and new ones taken."""
    monkeypatch.setattr(streams_module, "MAX_PENDING_REQUESTS", 3)
    monkeypatch.setattr(streams_module, "STALL_SECONDS", 0.3)
    streams = make_streams()
    conn = connect(streams)
    subscribed(conn, streams, "first")  # so the safety net's read needs the locked tables
    locker = psycopg2.connect(pg_dsn)
    try:
        locker.cursor().execute(f"LOCK TABLE {streams.schema}.offsets, "
                                f"{streams.schema}.streams IN ACCESS EXCLUSIVE MODE")
        wait_for(lambda: streams.status()["stalled"], timeout=5, message="a blocked read")
        waiting = [streams.subscribe(conn, f"w{i}", reply_to=f"w{i}") for i in range(3)]
        assert waiting == [None, None, None]
        refused = streams.subscribe(conn, "w3", reply_to="w3")
        assert refused == "busy: the durable log is not answering; try again later"
    finally:
        locker.rollback()
        locker.close()
    for i in range(3):
        wait_for(lambda i=i: any(f.get("reply_to") == f"w{i}" for f in conn.seen()),
                 message=f"the reply to waiting subscribe w{i}")
    subscribed(conn, streams, "w3")  # taken again once the log answers


def test_a_durable_room_join_while_the_log_is_busy_gets_an_error_frame(
        pg_dsn, monkeypatch):
    """Push's joinRoom answers the refusal with an error frame naming the room, instead of
    letting LogUnavailable escape the message handler; the socket stays."""
    from pgws_sync import Listener, Push

    monkeypatch.setattr(streams_module, "MAX_PENDING_REQUESTS", 2)
    push = Push(Listener(pg_dsn), durable=True, public=True, log_schema=new_log(pg_dsn))
    conn = Recording()  # its streams thread is never started: requests only wait
    push.hub.add(conn)
    for room in ("a", "b", "c"):
        push.on_message(conn, json.dumps({"joinRoom": room}))
    # a and b wait for the streams thread, which answers a durable join once it is done
    assert conn.seen() == [{"event": "error", "room": "c", "error":
                            "busy: the durable log is not answering; try again later"}]
    push.close(0)
