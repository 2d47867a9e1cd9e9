"""Push on durable streams: rooms resume like channels, and pushes to a user or to one tab
wait in the log for the tab that reconnects."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import pytest

from ..durable_helpers import new_log, wait_numbered
from ..helpers import Gunicorn, Ws
from ..push_helpers import api, serve_push


@pytest.fixture
def durable_push(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_push(pg_dsn, options={"durable": True, "log_schema": schema}, workers=2)
    server.numbered = lambda: wait_numbered(pg_dsn, schema)  # type: ignore[attr-defined]
    yield server
    server.stop()


class DurableTab:
    """A tab of a durable Push endpoint: its tab window id, its streams, resumable positions."""

    def __init__(self, server: Gunicorn, user: str,
                 positions: Optional[Dict[str, List[Any]]] = None) -> None:
        self.ws = Ws(server.ws_url("/ws"), headers={"X-Auth-User": user})
        self.tab: str = self.ws.recv_json()["tabWindowId"]
        self.streams: Dict[str, str] = self.ws.recv_json()
        assert self.streams["event"] == "streams", self.streams
        self.positions = positions if positions is not None else {}

    def subscribe(self, channel: str) -> Dict[str, Any]:
        action: Dict[str, Any] = {"action": "subscribe", "channel": channel, "id": channel}
        if channel in self.positions:
            action["since"], action["epoch"] = self.positions[channel]
        self.ws.client.send(json.dumps(action))
        reply = self.ws.recv_json()
        if reply.get("event") == "subscribed" and channel not in self.positions:
            self.positions[channel] = [reply["offset"], reply["epoch"]]
        return reply

    def message(self) -> Dict[str, Any]:
        frame = self.ws.recv_json()
        assert "offset" in frame, frame
        self.positions[frame["channel"]] = [frame["offset"], frame["epoch"]]
        return frame


def test_pushes_to_a_user_and_to_a_tab_wait_for_the_tab_that_comes_back(durable_push):
    server = durable_push
    tab = DurableTab(server, "bob")
    assert tab.streams == {"event": "streams", "user": "pgws:user:bob",
                           "tab": f"pgws:tab:bob:{tab.tab}"}
    assert tab.subscribe(tab.streams["user"])["event"] == "subscribed"
    assert tab.subscribe(tab.streams["tab"])["event"] == "subscribed"
    api(server, {"user": "bob", "payload": {"n": 1}})
    assert tab.message()["payload"] == {"n": 1}
    old_tab, streams = tab.tab, dict(tab.streams)
    tab.ws.close()

    api(server, {"user": "bob", "payload": {"n": 2}})  # while the tab is away
    api(server, {"user": "bob", "payload": {"n": 3}, "tab": old_tab})

    back = DurableTab(server, "bob", positions=tab.positions)
    assert back.tab != old_tab and back.streams["user"] == streams["user"]
    assert back.subscribe(streams["user"])["event"] == "subscribed"
    assert back.message()["payload"] == {"n": 2}
    assert back.subscribe(streams["tab"])["event"] == "subscribed"  # its old tab's stream
    frame = back.message()
    assert (frame["channel"], frame["payload"]) == (streams["tab"], {"n": 3})
    back.ws.close()


def test_rooms_resume_with_since_and_join_room_starts_live(durable_push):
    server = durable_push
    tab = DurableTab(server, "ann")
    tab.ws.client.send(json.dumps({"joinRoom": "lobby"}))
    joined = tab.ws.recv_json()
    assert joined == {"event": "joined", "room": "lobby", "offset": 0, "epoch": joined["epoch"]}
    api(server, {"room": "lobby", "payload": "hello"})
    first = tab.ws.recv_json()
    assert first["epoch"] == joined["epoch"]
    assert (first["channel"], first["payload"], first["offset"]) == ("lobby", "hello", 1)
    tab.ws.close()
    api(server, {"room": "lobby", "payload": "while away"})
    server.numbered()  # offsets are given after commit, within milliseconds
    back = DurableTab(server, "ann", positions={"lobby": [1, first["epoch"]]})
    assert back.subscribe("lobby")["offset"] == 2
    assert back.message()["payload"] == "while away"
    back.ws.close()


def test_a_room_resumes_from_its_joined_answer_before_any_message(durable_push):
    """The joined answer names the position the room is live from: a tab that leaves before
    the room's first message resumes from there and misses nothing."""
    server = durable_push
    api(server, {"room": "quiet", "payload": "before anyone came"})
    server.numbered()
    tab = DurableTab(server, "ann")
    tab.ws.client.send(json.dumps({"joinRoom": "quiet"}))
    joined = tab.ws.recv_json()
    assert (joined["event"], joined["room"], joined["offset"]) == ("joined", "quiet", 1)
    tab.ws.close()
    api(server, {"room": "quiet", "payload": "while away 1"})
    api(server, {"room": "quiet", "payload": "while away 2"})
    server.numbered()
    back = DurableTab(server, "ann", positions={"quiet": [joined["offset"], joined["epoch"]]})
    assert back.subscribe("quiet")["offset"] == 3
    assert [back.message()["payload"] for _ in range(2)] == ["while away 1", "while away 2"]
    back.ws.close()


def test_a_client_may_subscribe_to_its_own_streams_only(durable_push):
    tab = DurableTab(durable_push, "eve")
    for channel in ("pgws:user:bob", "pgws:tab:bob:x", "pgws:anything"):
        reply = tab.subscribe(channel)
        assert reply["event"] == "error" and "not allowed" in reply["error"], reply
    tab.ws.client.send(json.dumps({"joinRoom": "pgws:user:bob"}))
    reply = tab.ws.recv_json()
    assert reply["event"] == "error" and "not allowed" in reply["error"], reply
    assert tab.subscribe("pgws:tab:eve:an-old-tab")["event"] == "subscribed"
    tab.ws.close()


def test_a_user_whose_id_prefixes_another_gets_none_of_its_tab_streams(durable_push):
    """User ``a`` and user ``a:b``: ``pgws:tab:a:b:<tab>`` is a tab of ``a:b``, not of ``a``."""
    owner = DurableTab(durable_push, "a:b")
    tab_stream = owner.streams["tab"]
    assert tab_stream == f"pgws:tab:a:b:{owner.tab}"
    prefix = DurableTab(durable_push, "a")
    for channel in (tab_stream, "pgws:user:a:b", "pgws:tab:a:", "pgws:tab:a:b:"):
        reply = prefix.subscribe(channel)
        assert reply["event"] == "error" and "not allowed" in reply["error"], (channel, reply)
    assert prefix.subscribe(prefix.streams["tab"])["event"] == "subscribed"
    assert owner.subscribe(tab_stream)["event"] == "subscribed"  # its owner may
    api(durable_push, {"user": "a:b", "payload": "for a:b's tab", "tab": owner.tab})
    assert owner.message()["payload"] == "for a:b's tab"
    owner.ws.close()
    prefix.ws.close()
