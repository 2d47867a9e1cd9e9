"""Fuzzing the pub/sub protocol against a real endpoint: every client frame gets exactly one
answer, every frame the server sends is strict JSON, the socket stays usable, no traceback."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..fuzzing import FUZZ, answers_until, client_frames, no_tracebacks, texts
from ..pubsub_helpers import Client, serve_pubsub

FIELDS = {
    "action": st.sampled_from(["subscribe", "unsubscribe", "publish", "message"]),
    "channel": st.sampled_from(["fuzz", "forbidden-x", "readonly-x", "\u00e9 ch"]) | texts,
    "id": st.sampled_from(["m1", 7, 1.5, -0.0]) | texts,
    "payload": st.just({"x": 1}),
    "backpressure": st.sampled_from(["close", "drop"]),
}

_sentinels = itertools.count()


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Any]:
    g = serve_pubsub(pg_dsn, {"client_rate": None})  # the limiter: test_ratelimit.py
    yield g
    g.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Client]:
    c = Client(server, headers={"X-User": "fuzzer"})  # may publish
    yield c
    c.close()


def one_answer(client: Client, frame: Any) -> Any:
    """Send ``frame`` then a sentinel; return the one event answering ``frame``."""
    client.ws.client.send(frame)
    tag = f"sentinel-{next(_sentinels)}"
    client.send(action="unsubscribe", channel="sentinel", id=tag)
    before = answers_until(client.ws.recv, lambda v: isinstance(v, dict) and v.get("reply_to") == tag)
    assert len(before) == 1, f"{frame!r:.300} got {before!r:.600}"
    answer = before[0]
    if answer.get("event") == "subscribed":  # hold no subscription: no message may come unasked
        reply = client.request(action="unsubscribe", channel=answer["channel"], id="undo")
        assert reply == {"event": "unsubscribed", "channel": answer["channel"], "reply_to": "undo"}
    return answer


@FUZZ
@given(frame=client_frames(FIELDS))
def test_every_client_frame_gets_one_strict_answer(server, client, frame):
    answer = one_answer(client, frame)
    assert answer.get("event", "reply") in ("subscribed", "unsubscribed", "published", "received",
                                            "error", "reply")


def test_the_fuzzed_server_logged_no_traceback(server, client):
    # runs after the fuzz test in this module: the server survived it cleanly
    one_answer(client, '{"action": "subscribe", "channel": "still-here"}')
    no_tracebacks(server.log())


@pytest.mark.parametrize("frame, says", [
    ('{"action": "subscribe", "channel": "c", "id": 1e400}', "'id' must be a finite number"),
    ('{"action": "subscribe", "channel": "c", "id": "\\ud800"}', "lone surrogate"),
    ('{"action": "subscribe", "channel": "\\ud800", "id": "m"}', "lone surrogate"),
    ('{"action": "publish", "channel": "\\udfff", "payload": 1}', "lone surrogate"),
    ('{"action": "publish", "channel": "c", "payload": {"a": "\\ud800"}, "id": 2}', "lone surrogate"),
    ('{"action": "publish", "channel": "c", "payload": [1e999]}', "not finite"),
])
def test_hostile_values_get_an_error_frame_not_silence(server, client, frame, says):
    answer = one_answer(client, frame)
    assert answer["event"] == "error" and says in answer["error"], answer
