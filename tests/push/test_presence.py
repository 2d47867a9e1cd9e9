"""Presence in Push rooms: members are the room's sockets, their info the user id."""

from __future__ import annotations

import pytest

from ..helpers import wait_for
from ..push_helpers import Tab, serve_push


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_push(pg_dsn, options={"presence": True, "presence_timeout": 3.0}, workers=2)
    yield g
    g.stop()


def ask(tab: Tab, room: str, rid: str) -> dict:
    tab.send({"action": "presence", "channel": room, "id": rid})
    return tab.recv_until(lambda f: f.get("reply_to") == rid)


def test_room_members_in_both_workers_with_their_user_ids(server) -> None:
    tabs = []
    try:
        while len({t.pid for t in tabs}) < 2:
            assert len(tabs) < 40
            tabs.append(Tab(server, user=f"user{len(tabs)}", hello=True))
        guest = Tab(server, guest="g1", hello=True)
        tabs.append(guest)
        for t in tabs:  # a join event of an earlier tab may come before the reply
            t.send({"joinRoom": "lobby"})
            t.recv_until(lambda f: f == {"event": "joined", "room": "lobby"})
        users = {f"user{i}" for i in range(len(tabs) - 1)}
        reply = wait_for(lambda: (lambda r: r if r["count"] == len(tabs) else None)(
            ask(tabs[0], "lobby", "q")), 5.0, "every member")
        infos = [m["info"] for m in reply["members"]]
        assert {i["user"] for i in infos if "user" in i} == users and {} in infos
        # a leave reaches a tab of the other worker
        other = next(t for t in tabs if t.pid != tabs[0].pid)
        tabs[0].send({"leaveRoom": "lobby"})
        frame = other.recv_until(lambda f: f.get("event") == "leave")
        assert frame["channel"] == "lobby" and frame["member"]["info"] == {"user": "user0"}
    finally:
        for t in tabs:
            t.close()
