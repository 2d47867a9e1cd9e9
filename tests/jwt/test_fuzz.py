"""Fuzzing the JWT gateway's client frames: each is relayed through the database and comes back
to the sender (it reads its own channel) or is refused with one error frame."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..fuzzing import FUZZ, answers_until, client_frames, no_tracebacks, texts
from ..helpers import Gunicorn, Ws
from ..jwt_helpers import SECRET, make_token

_sentinels = itertools.count()


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[Gunicorn]:
    listen = f"pgws-fuzz-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    g = Gunicorn("tests.apps.jwt_app:app", env={
        "PGWS_DB_URI": pg_dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_LISTEN_CHANNEL": listen,
        "PGWS_OPTIONS": json.dumps({"client_rate": None}),  # the limiter: test_ratelimit.py
    }).wait_up()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def ws(server: Gunicorn) -> Iterator[Ws]:
    client = Ws(server.ws_url("/fuzz/" + make_token({"mode": "rw", "channel": "fuzz"})))
    yield client
    client.close()


def one_answer(ws: Ws, frame: Any) -> Any:
    ws.client.send(frame)
    tag = f"sentinel-{next(_sentinels)}"
    ws.client.send(tag)
    before = answers_until(ws.recv, lambda v: isinstance(v, dict) and v.get("payload") == tag)
    assert len(before) == 1, f"{frame!r:.300} got {before!r:.600}"
    return before[0]


@FUZZ
@given(frame=client_frames({"channel": texts, "payload": texts, "event": st.just("x")}))
def test_every_frame_comes_back_or_gets_one_error(server, ws, frame):
    answer = one_answer(ws, frame)
    if answer.get("event") == "error":
        assert isinstance(answer["error"], str)
        return
    assert answer["event"] == "WebsocketMessage" and answer["channel"] == "fuzz"
    sent = frame if isinstance(frame, str) else frame.decode("utf-8")
    assert answer["payload"] == sent and answer["claims"]["mode"] == "rw"


def test_the_fuzzed_gateway_logged_no_traceback(server, ws):
    assert one_answer(ws, "still here")["payload"] == "still here"
    assert one_answer(ws, b"\xff")["event"] == "error"
    assert one_answer(ws, "x" * 9000)["event"] == "error"
    no_tracebacks(server.log())
