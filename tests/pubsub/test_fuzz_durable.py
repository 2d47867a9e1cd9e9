"""Fuzzing a durable endpoint's subscribe positions (``since``, ``epoch``) against a real server:
every client frame gets exactly one strict answer, replayed messages aside, and the socket
stays usable."""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..durable_helpers import new_log, publish_many, serve_durable
from ..fuzzing import FUZZ, answers_until, client_frames, no_tracebacks, texts
from ..pubsub_helpers import Client

#: The log's epoch, filled in by the client fixture before the first example is drawn.
REAL = {"epoch": "unknown"}

FIELDS = {
    "action": st.sampled_from(["subscribe", "unsubscribe", "publish"]),
    "channel": st.sampled_from(["fuzz", "five", "\u00e9 ch"]) | texts,
    "id": st.sampled_from(["m1", 7]) | texts,
    "payload": st.just({"x": 1}),
    "since": (st.integers(min_value=-3, max_value=8) | st.integers() | st.floats()
              | st.booleans() | st.none() | texts),
    "epoch": (st.deferred(lambda: st.just(REAL["epoch"])) | st.just("another") | texts
              | st.integers() | st.none()),
}

_sentinels = itertools.count()


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Any]:
    schema = new_log(pg_dsn)
    # the limiter has its own tests (test_ratelimit.py); a replay limit within reach of the
    # fuzzed positions (5 messages), so that resumes past it are fuzzed too
    g = serve_durable(pg_dsn, schema, {"client_rate": None, "max_replay": 3})
    publish_many(pg_dsn, schema, (("five", n) for n in range(5)))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Client]:
    c = Client(server, headers={"X-User": "fuzzer"})  # may publish
    reply = c.request(action="subscribe", channel="five", id="epoch")
    REAL["epoch"] = reply["epoch"]
    c.request(action="unsubscribe", channel="five", id="undo")
    yield c
    c.close()


def one_answer(client: Client, frame: Any) -> Any:
    """Send ``frame`` then a sentinel; return the one event answering ``frame`` (replayed
    messages are skipped: a valid ``since`` replays what came after it)."""
    client.ws.client.send(frame)
    tag = f"sentinel-{next(_sentinels)}"
    client.send(action="unsubscribe", channel="sentinel", id=tag)
    before = answers_until(client.ws.recv,
                           lambda v: isinstance(v, dict) and v.get("reply_to") == tag)
    events = [v for v in before if not (isinstance(v, dict) and "offset" in v and "event" not in v)]
    assert len(events) == 1, f"{frame!r:.300} got {before!r:.600}"
    answer = events[0]
    if answer.get("event") in ("subscribed", "resync_required"):
        client.send(action="unsubscribe", channel=answer["channel"], id="undo")
        answers_until(client.ws.recv, lambda v: isinstance(v, dict) and v.get("reply_to") == "undo")
    return answer


@FUZZ
@given(frame=client_frames(FIELDS))
def test_every_subscribe_position_gets_one_strict_answer(server, client, frame):
    answer = one_answer(client, frame)
    assert answer.get("event") in ("subscribed", "resync_required", "unsubscribed", "published",
                                   "error"), answer
    if answer["event"] == "error" and ("'since'" in answer["error"] or "'epoch'" in answer["error"]):
        assert answer["error"].startswith(("invalid 'since': ", "invalid 'epoch': ")), answer
    if answer["event"] == "resync_required":
        assert answer["reason"].startswith(("epoch: ", "replay limit: ", "retention: ")), answer


def test_the_fuzzed_durable_server_logged_no_traceback(server, client):
    # the fuzzed frames may have published to "five" too: resume one message before its head
    head = one_answer(client, '{"action": "subscribe", "channel": "five", "id": 0}')["offset"]
    answer = one_answer(client, json.dumps({"action": "subscribe", "channel": "five",
                                            "since": head - 1, "id": 1}))
    assert answer["event"] == "subscribed", answer
    no_tracebacks(server.log())
