"""Backpressure policies: ``close`` (1013) and ``drop`` (lose frames, then a gap frame), per
subscription; in the hub with real Connection objects, then a slow reader under gunicorn."""

import json
import threading
import time

import psutil
import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import TextMessage
import psycopg2

from pgws_sync import Connection
from pgws_sync._core.hub import Hub
from pgws_sync._formats import gap_frame

from ..helpers import raw_upgrade, read_frame, wait_for
from ..pubsub_helpers import Client, serve_pubsub, stats


def texts(conn):
    out = []
    while conn.queue_depth:
        item = conn._queue.get_nowait()
        conn._queue.task_done()
        out.extend(getattr(item, "texts", ()))
    return out


def test_drop_policy_counts_and_puts_the_gap_before_the_next_frame():
    hub = Hub()
    conn = Connection([], max_queue=3)
    hub.add(conn)
    hub.join(conn, "sub:g", drop_as="g")
    for i in range(5):
        hub.fan_out([("sub:g", str(i))])
    assert len(hub) == 1 and conn.close_code is None
    assert conn.missed == {"g": 2} and conn.dropped == {"g": 2}
    hub.fan_out([("sub:g", "5"), ("sub:g", "6")])  # one poll, two frames: both lost
    assert conn.missed == {"g": 4}
    assert texts(conn) == ["0", "1", "2"]
    hub.fan_out([("sub:g", "7")])
    assert texts(conn) == [gap_frame("g", 4), "7"]
    assert conn.missed == {} and conn.dropped == {"g": 4}


def test_a_poll_goes_in_whole_or_not_at_all_and_an_empty_queue_takes_any():
    hub = Hub()
    conn = Connection([], max_queue=3)
    hub.add(conn)
    hub.join(conn, "sub:g", drop_as="g")
    hub.fan_out([("sub:g", "0"), ("sub:g", "1")])
    hub.fan_out([("sub:g", "2"), ("sub:g", "3")])  # 2 + 2 > 3: none of it goes in
    assert conn.missed == {"g": 2}  # (its wake-up marker took the last place)
    hub.fan_out([("sub:g", "4")])  # the gap frame and "4" are two frames: no room either
    assert conn.missed == {"g": 3} and conn.queue_depth == 3
    assert texts(conn) == ["0", "1"]
    hub.fan_out([("sub:g", str(i)) for i in range(5, 10)])  # empty: a poll larger than the bound goes in
    assert conn.queue_depth == 6 and conn.missed == {}
    assert texts(conn) == [gap_frame("g", 3)] + [str(i) for i in range(5, 10)]


def test_close_policy_and_mixed_frames_close_with_1013():
    hub = Hub()
    mixed = Connection([], max_queue=1)
    hub.add(mixed)
    hub.join(mixed, "sub:g", drop_as="g")
    hub.join(mixed, "sub:h")
    hub.fan_out([("sub:g", "g0")])
    hub.fan_out([("sub:g", "g1")])  # dropped: g has the drop policy
    assert len(hub) == 1 and mixed.missed == {"g": 1}
    hub.fan_out([("sub:g", "g2"), ("sub:h", "h0")])  # the lost item holds an h frame: close
    assert len(hub) == 0 and (mixed.close_code, mixed.close_reason) == (1013, "send queue full")


def test_replies_and_broadcasts_are_never_dropped_silently():
    hub = Hub()
    conn = Connection([], max_queue=1)
    hub.add(conn)
    hub.join(conn, "sub:g", drop_as="g")
    hub.fan_out([("sub:g", "0")])
    assert hub.send_to(conn.id, "to you")  # the queue is full and this is not droppable
    assert len(hub) == 0 and (conn.close_code, conn.close_reason) == (1013, "send queue full")


def test_joining_again_changes_the_policy_and_leaving_forgets_it():
    hub = Hub()
    conn = Connection([], max_queue=1)
    hub.add(conn)
    hub.join(conn, "sub:g", drop_as="g")
    assert hub.policy_count() == 1
    hub.join(conn, "sub:g")  # now "close"
    assert hub.policy_count() == 0
    hub.join(conn, "sub:g", drop_as="g")
    hub.leave(conn, "sub:g")
    assert hub.policy_count() == 0 and hub.key_count() == 0
    hub.join(conn, "sub:g", drop_as="g")
    hub.remove(conn)
    assert hub.policy_count() == 0 and hub.key_count() == 0


# ------------------------------------------------------------ end to end

PAD = 7000          # bytes per message: the slow client's buffers fill quickly
RATE = 1000         # messages per second published
SECONDS = 3.0       # of publishing
SLOW_RATE = 10.0    # messages per second the slow clients read while publishing goes on
MAX_QUEUE = 200
HURRY_AFTER = 2.0  # seconds into the firehose, the slow clients start reading fast


class SlowReader:
    """A raw WebSocket client with a small receive buffer that reads SLOW_RATE frames per
    second until ``hurry()``, then as fast as it can; it records every frame."""

    def __init__(self, port, backpressure):
        self.sock, head = raw_upgrade(port, rcvbuf=4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.frames = []
        self.close = None
        self._fast = threading.Event()
        self._ws = WsprotoConnection(ConnectionType.CLIENT)
        welcome = json.loads(read_frame(self.sock)[1])
        self.id = welcome["id"]
        action = {"action": "subscribe", "channel": "firehose", "id": "s"}
        if backpressure:
            action["backpressure"] = backpressure
        self.sock.sendall(self._ws.send(TextMessage(data=json.dumps(action))))
        assert json.loads(read_frame(self.sock)[1])["event"] == "subscribed"
        self.thread = threading.Thread(target=self._run, name=f"test-slow-{backpressure}", daemon=True)
        self.thread.start()

    def hurry(self):
        self._fast.set()

    def _run(self):
        try:
            while True:
                opcode, payload = read_frame(self.sock, timeout=60)
                if opcode == 0x8:
                    self.close = (int.from_bytes(payload[:2], "big"), payload[2:].decode())
                    return
                self.frames.append(json.loads(payload))
                if not self._fast.is_set():
                    self._fast.wait(1.0 / SLOW_RATE)  # reading slowly, on purpose
        except (OSError, ConnectionError):
            return

    def messages(self):
        return [f["payload"]["i"] for f in list(self.frames) if "payload" in f]

    def gaps(self):
        return [f for f in list(self.frames) if f.get("event") == "gap"]


def publish_firehose(dsn, stop_at):
    """Publish RATE messages per second from SQL, 10 per statement, until stop_at; return the count."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    sent = 0
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            while time.monotonic() < stop_at:
                cur.execute(
                    "SELECT pg_notify('pgws_sync', json_build_object('channel', 'firehose', 'payload',"
                    " json_build_object('i', i, 'pad', repeat('x', %s)))::text)"
                    " FROM generate_series(%s, %s) AS i", (PAD, sent, sent + 9))
                sent += 10
                ahead = started + sent / RATE - time.monotonic()
                if ahead > 0:
                    threading.Event().wait(ahead)  # keeps the rate, not waiting for anything
    finally:
        conn.close()
    return sent


@pytest.mark.parametrize("endpoint_policy", ["close", "drop"])
def test_slow_readers_under_a_firehose(pg_dsn, endpoint_policy):
    """One fast client, one slow client with each policy (one by default, one by override).

    Fast clients lose nothing; the slow ``close`` client gets what was written, in
    order, then 1013; the slow ``drop`` client stays, and its gap frames account for
    exactly the frames the server counted as dropped. Queues never exceed their bound.
    """
    # write_timeout: the 1013 close frame waits behind what the paced reader has not read yet
    g = serve_pubsub(pg_dsn, options={"max_queue": MAX_QUEUE, "ping_interval": None,
                                      "write_timeout": 30.0, "backpressure": endpoint_policy})
    try:
        worker = psutil.Process(g.worker_pids()[0])
        fast = Client(g)
        fast.subscribe("firehose")
        other_policy = "drop" if endpoint_policy == "close" else "close"
        slow = {endpoint_policy: SlowReader(g.port, None), other_policy: SlowReader(g.port, other_policy)}
        rss_before = worker.memory_info().rss
        result = {}
        publisher = threading.Thread(
            target=lambda: result.update(sent=publish_firehose(pg_dsn, time.monotonic() + SECONDS)),
            name="test-firehose", daemon=True)
        publisher.start()
        depths, rss_peak = [], rss_before
        hurry_at = time.monotonic() + HURRY_AFTER
        while publisher.is_alive():  # sample the server while it publishes
            depths += [c["queue_depth"] for c in stats(g)["connections"]]
            rss_peak = max(rss_peak, worker.memory_info().rss)
            if time.monotonic() >= hurry_at:  # catch up while messages still flow
                for reader in slow.values():
                    reader.hurry()
            publisher.join(0.1)
        sent = result["sent"]
        fast_seen = [fast.recv_json()["payload"]["i"] for _ in range(sent)]
        assert fast_seen == list(range(sent))  # the fast client lost nothing

        for reader in slow.values():
            reader.hurry()
        dropper, closer = slow["drop"], slow["close"]
        # close policy: frames in order, then 1013
        wait_for(lambda: closer.close is not None, timeout=30, message="the 1013 close")
        assert closer.close == (1013, "send queue full")
        got = closer.messages()
        assert got == list(range(len(got))) and len(got) < sent
        # drop policy: every message either arrived or is counted in a gap frame
        wait_for(lambda: len(dropper.messages()) + sum(g_["missed"] for g_ in dropper.gaps()) == sent,
                 timeout=30, message="the drop client to account for every message")
        missed = sum(g_["missed"] for g_ in dropper.gaps())
        server_side = {c["id"]: c for c in stats(g)["connections"]}[dropper.id]
        assert missed > 0 and server_side["dropped"] == {"firehose": missed}
        assert all(gap["channel"] == "firehose" for gap in dropper.gaps())
        # each gap frame sits exactly where its messages are missing
        next_expected, pending = 0, 0
        for frame in list(dropper.frames):
            if frame.get("event") == "gap":
                pending += frame["missed"]
            elif "payload" in frame:
                assert frame["payload"]["i"] == next_expected + pending, (frame["payload"]["i"],
                                                                          next_expected, pending)
                next_expected, pending = frame["payload"]["i"] + 1, 0
        assert next_expected + pending == sent
        assert closer.id not in {c["id"] for c in stats(g)["connections"]}
        # bounded: a poll's frames go into a queue only if they all fit, and no poll
        # carries more than MAX_BATCH (< MAX_QUEUE) frames, so not even into an empty queue
        assert max(depths) <= MAX_QUEUE, depths
        assert rss_peak - rss_before < 16 << 20
        print(f"\n[{endpoint_policy}] sent {sent} x {PAD} B; drop client received "
              f"{len(dropper.messages())}, missed {missed} in {len(dropper.gaps())} gap frames; "
              f"close client read {len(got)} before 1013; max queue depth {max(depths)}; "
              f"worker RSS {rss_before >> 20} MiB -> peak {rss_peak >> 20} MiB")
        # the drop client keeps receiving afterwards
        publish_firehose_one(pg_dsn)
        wait_for(lambda: dropper.messages()[-1:] == [-1], message="a message after the firehose")
        fast.close()
        for reader in slow.values():
            reader.sock.close()
    finally:
        g.stop()


def publish_firehose_one(dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_notify('pgws_sync', json_build_object('channel', 'firehose', "
                    "'payload', json_build_object('i', -1))::text)")
    conn.close()

