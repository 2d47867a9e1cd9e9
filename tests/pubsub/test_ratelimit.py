"""Client frames are rate-limited per connection, against a real endpoint: a flooding client
gets "rate limited" answers, then 1008; everyone else goes on."""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any, Iterator, List, Optional

import psycopg2
import pytest
import simple_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from ..pubsub_helpers import Client, serve_pubsub, sql_publish


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Any]:
    # the limiter's defaults (50 frames a second, 100 at once); a backlog bound far away, so
    # that the limiter, not the backlog, is what stops a flood here
    g = serve_pubsub(pg_dsn, {"max_backlog": 100_000})
    yield g
    g.stop()


def latencies(client: Client, conn: Any, channel: str, n: int = 40,
              starts: Optional[List[float]] = None) -> List[float]:
    """Milliseconds from publishing to receiving, ``n`` messages one after the other (when
    each was published goes into ``starts``, if given)."""
    out = []
    for i in range(n):
        started = time.monotonic()
        if starts is not None:
            starts.append(started)
        sql_publish(conn, channel, args=(i,))
        while True:
            frame = client.recv_json()
            if frame.get("channel") == channel:
                break
        out.append((time.monotonic() - started) * 1000)
    return out


def test_a_flooding_client_is_rate_limited_then_closed_and_others_go_on(server, pg_dsn,
                                                                        channel):
    bystander = Client(server)
    bystander.subscribe(channel)
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    quiet = latencies(bystander, conn, channel)
    flooder = Client(server)
    frame = json.dumps({"action": "subscribe", "channel": "flood", "id": "f"})
    sent = [0]
    flood_times: List[float] = []

    def flood() -> None:
        flood_times.append(time.monotonic())
        try:
            for _ in range(20_000):
                flooder.ws.client.send(frame)
                sent[0] += 1
        except (simple_websocket.ConnectionClosed, OSError):
            pass
        flood_times.append(time.monotonic())

    thread = threading.Thread(target=flood, name="flood", daemon=True)
    thread.start()
    starts: List[float] = []
    busy = latencies(bystander, conn, channel, starts=starts)
    answers = {"subscribed": 0, "rate limited": 0}
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        while True:
            reply = flooder.recv_json(timeout=20)
            key = reply.get("event") if reply.get("event") == "subscribed" else reply.get("error")
            answers[key] = answers.get(key, 0) + 1
    thread.join(30)
    conn.close()
    assert (closed.value.reason, closed.value.message) == (1008, "rate limited")
    assert answers["rate limited"] > 0 and answers["subscribed"] <= 100 + 10
    bystander.subscribe(channel + "-after")  # the bystander's socket still answers
    print(f"\nflooder sent {sent[0]} frames: {answers}, closed with 1008 "
          f"{closed.value.message!r}; bystander latency median {statistics.median(quiet):.1f} "
          f"ms quiet, {statistics.median(busy):.1f} ms during the flood (p90 "
          f"{sorted(quiet)[35]:.1f} / {sorted(busy)[35]:.1f} ms); the flood lasted "
          f"{(flood_times[-1] - flood_times[0]) * 1000:.0f} ms, "
          f"{sum(t < flood_times[-1] for t in starts)} of {len(busy)} samples began in it: "
          f"{[round(ms, 1) for t, ms in zip(starts, busy) if t < flood_times[-1]]} ms")


@settings(max_examples=25, deadline=None)
@given(burst=st.integers(min_value=1, max_value=30))
def test_fuzz_a_burst_within_client_burst_is_answered_in_full(server, burst):
    """Any burst up to the limit's burst (100 here) is answered frame by frame, nothing
    refused: the limiter never touches a client within it."""
    client = Client(server)
    try:
        for i in range(burst):
            client.send(action="unsubscribe", channel=f"c{i}", id=i)
        replies = [client.recv_json() for _ in range(burst)]
        assert [r.get("reply_to") for r in replies] == list(range(burst)), replies
        assert all(r["event"] == "unsubscribed" for r in replies)
    finally:
        client.close()


@settings(max_examples=15, deadline=None)
@given(frames=st.lists(st.sampled_from(["unsubscribe", "garbage"]), min_size=101,
                       max_size=190))
def test_fuzz_a_burst_past_client_burst_is_limited_frame_by_frame(server, frames):
    """Any burst past the limit's burst (100 here) but short of its close (100 more refused
    frames), garbage mixed in: every frame gets one answer, the first 100 and no more than
    the refill are acted on, in order, the rest are answered "rate limited", and the socket
    stays open: one more frame is answered."""
    client = Client(server)
    try:
        started = time.monotonic()
        for i, kind in enumerate(frames):
            if kind == "garbage":
                client.ws.client.send(f"not json {i}")
            else:
                client.send(action="unsubscribe", channel=f"c{i}", id=i)
        replies = [client.recv_json() for _ in frames]
        elapsed = time.monotonic() - started
        limited = [r for r in replies if r == {"event": "error", "error": "rate limited"}]
        acted = [r for r in replies if r not in limited]
        assert 100 <= len(acted) <= 100 + 50 * elapsed + 1, (len(acted), elapsed)
        assert len(acted) + len(limited) == len(frames)
        ids = [r["reply_to"] for r in acted if "reply_to" in r]
        assert ids == sorted(ids) and all(frames[i] == "unsubscribe" for i in ids), ids
        assert [frames[i] for i in range(100)].count("unsubscribe") <= len(ids)
        after = client.request(action="unsubscribe", channel="after", id="after")
        assert after.get("reply_to") == "after" or after == limited[0], after
    finally:
        client.close()
