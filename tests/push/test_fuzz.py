"""Fuzzing the push room frames (and the pub/sub protocol under them) against a real endpoint."""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..fuzzing import FUZZ, answers_until, client_frames, no_tracebacks, texts
from ..push_helpers import Tab, serve_push

ROOMS = st.sampled_from(["lobby", "private-1", "\u00e9 room", "r" * 200, "r" * 201]) | texts
FIELDS = {
    "joinRoom": ROOMS,
    "leaveRoom": ROOMS,
    "action": st.sampled_from(["subscribe", "unsubscribe", "publish"]),
    "channel": ROOMS,
    "id": st.sampled_from(["m1", 3]) | texts,
}

_sentinels = itertools.count()


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Any]:
    g = serve_push(pg_dsn, options={"client_rate": None})  # the limiter: test_ratelimit.py
    yield g
    g.stop()


@pytest.fixture(scope="module")
def tab(server: Any) -> Iterator[Tab]:
    t = Tab(server, user="fuzzer")
    yield t
    t.close()


def one_answer(tab: Tab, frame: Any) -> Any:
    tab.client.send(frame)
    tag = f"sentinel-{next(_sentinels)}"
    tab.send(json.dumps({"action": "unsubscribe", "channel": "sentinel", "id": tag}))
    before = answers_until(tab.recv, lambda v: isinstance(v, dict) and v.get("reply_to") == tag)
    events = [v for v in before if isinstance(v, dict) and "event" in v]
    assert len(events) == 1, f"{frame!r:.300} got {before!r:.600}"
    return events[0]


@FUZZ
@given(frame=client_frames(FIELDS))
def test_every_room_frame_gets_one_strict_answer(server, tab, frame):
    answer = one_answer(tab, frame)
    assert answer["event"] in ("joined", "left", "subscribed", "unsubscribed", "error")


def test_the_fuzzed_server_logged_no_traceback(server, tab):
    assert one_answer(tab, '{"joinRoom": "still-here"}') == {"event": "joined", "room": "still-here"}
    no_tracebacks(server.log())


@pytest.mark.parametrize("frame", ['{"joinRoom": "\\ud800"}', '{"leaveRoom": "a\\udc00b"}'])
def test_a_lone_surrogate_room_gets_an_error_frame(server, tab, frame):
    answer = one_answer(tab, frame)
    assert answer["event"] == "error" and "lone surrogate" in answer["error"], answer
