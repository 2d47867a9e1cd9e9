"""Presence across two workers (and a second server as another host): the presence reply,
join and leave, a SIGKILLed worker's members leaving, a drained deploy, counts only above
presence_events_max."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Dict, List

import psycopg2
import pytest

from ..helpers import wait_for
from ..pubsub_helpers import Client, serve_pubsub

TIMEOUT = 3.0  # presence_timeout of these servers: heartbeats every second
OPTIONS = {"presence": True, "presence_timeout": TIMEOUT, "presence_events_max": 20}


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_pubsub(pg_dsn, OPTIONS, workers=2)
    yield g
    g.stop()


def in_both_workers(server, user: str, at_least: int = 2) -> List[Client]:
    clients: List[Client] = []
    while len({c.pid for c in clients}) < 2 or len(clients) < at_least:
        assert len(clients) < 40, "the second worker took no socket"
        clients.append(Client(server, headers={"X-User": user}))
    return clients


def ask(client: Client, channel: str, rid: str = "p1") -> Dict[str, Any]:
    client.send(action="presence", channel=channel, id=rid)
    return client.ws.recv_until(lambda f: f.get("reply_to") == rid, 10.0)


def subscribe(client: Client, channel: str) -> None:
    client.send(action="subscribe", channel=channel, id="s-" + channel)
    client.ws.recv_until(lambda f: f.get("reply_to") == "s-" + channel, 10.0)


def events(client: Client, kind: str, n: int, timeout: float = 10.0) -> List[Dict[str, Any]]:
    """The next ``n`` frames of event ``kind`` (others skipped)."""
    got: List[Dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        got.append(client.ws.recv_until(lambda f: f.get("event") == kind,
                                        max(0.1, deadline - time.monotonic())))
    return got


def close_code(client: Client, timeout: float = 10.0) -> int:
    """Read (and skip) frames until the server closes; the close code."""
    import simple_websocket

    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ws.client.receive(timeout=max(0.1, deadline - time.monotonic())) is None:
                raise AssertionError(f"no close within {timeout}s")
        except simple_websocket.ConnectionClosed as exc:
            return int(exc.reason)


def rows(pg_dsn: str, channel: str) -> List[tuple]:
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT client, worker FROM pgws_sync.presence WHERE channel = %s",
                        (channel,))
            return cur.fetchall()
    finally:
        conn.close()


def joined(client: Client, wanted: set, timeout: float = 10.0) -> set:
    """The clients ``client`` saw join until it saw all of ``wanted``."""
    seen: set = set()
    while not wanted <= seen:
        frame = client.ws.recv_until(lambda f: f.get("event") == "join", timeout)
        seen.add(frame["member"]["client"])
    return seen


def test_presence_lists_every_worker_s_members_and_join_and_leave_cross_workers(
        server, pg_dsn, channel) -> None:
    watchers = in_both_workers(server, "watcher")
    members = in_both_workers(server, "member", at_least=4)
    try:
        for w in watchers:
            subscribe(w, channel)
        wait_for(lambda: ask(watchers[0], channel, f"w{time.monotonic()}")["count"] == len(watchers), 5.0)
        for m in members:
            subscribe(m, channel)
        expected = {c.id for c in watchers + members}
        for w in watchers:  # each watcher sees every member join, whichever worker it is in
            seen = joined(w, {m.id for m in members})
            assert seen <= expected - {w.id}
        reply = ask(members[0], channel)
        assert reply["event"] == "presence" and reply["channel"] == channel
        assert reply["count"] == len(expected)
        assert {m["client"] for m in reply["members"]} == expected
        assert {m["client"]: m["info"] for m in reply["members"]}[members[0].id] == \
            {"user": "member"}
        # a leave by unsubscribe, and one by close, reach watchers in both workers
        members[0].send(action="unsubscribe", channel=channel, id="u")
        gone = members.pop(1)
        gone.close()
        for w in watchers:
            left = {e["member"]["client"] for e in events(w, "leave", 2, timeout=5.0)}
            assert left == {members[0].id, gone.id}
        assert ask(watchers[0], channel, "p2")["count"] == len(expected) - 2
    finally:
        for c in watchers + members:
            c.close()
    wait_for(lambda: not rows(pg_dsn, channel), 5.0, "no rows left")


def test_a_sigkilled_worker_s_members_leave_within_the_timeout(server, pg_dsn, channel) -> None:
    clients = in_both_workers(server, "k", at_least=4)
    try:
        for c in clients:
            subscribe(c, channel)
        victim = clients[0].pid
        doomed = [c for c in clients if c.pid == victim]
        alive = [c for c in clients if c.pid != victim]
        watcher = alive[0]
        wait_for(lambda: len(rows(pg_dsn, channel)) == len(clients), 5.0, "every member written")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        left = set()
        while left != {c.id for c in doomed}:
            frame = watcher.ws.recv_until(lambda f: f.get("event") == "leave",
                                          TIMEOUT + 5.0)
            left.add(frame["member"]["client"])
        took = time.monotonic() - killed
        assert took < TIMEOUT + 5.0
        assert ask(watcher, channel)["count"] == len(alive)
        assert {r[0] for r in rows(pg_dsn, channel)} == {c.id for c in alive}
        print(f"SIGKILL: {len(doomed)} members left everywhere {took:.1f}s after the kill")
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: not rows(pg_dsn, channel), 5.0, "no rows left")
    wait_for(lambda: len(server.worker_pids()) == 2, 20.0, "gunicorn to replace the worker")


def test_a_large_channel_sends_counts_only(server, channel) -> None:
    watcher = Client(server, headers={"X-User": "big"})
    clients: List[Client] = []
    try:
        subscribe(watcher, channel)
        for _ in range(OPTIONS["presence_events_max"] + 3):
            c = Client(server, headers={"X-User": "crowd"})
            subscribe(c, channel)
            clients.append(c)
        frame = watcher.ws.recv_until(lambda f: f.get("event") == "presence_count", 10.0)
        assert set(frame) == {"event", "channel", "count"} and frame["count"] > 20
        wait_for(lambda: ask(watcher, channel, f"p{time.monotonic()}")["count"] == 24, 5.0)
    finally:
        for c in clients + [watcher]:
            c.close()


def test_presence_is_answered_only_to_who_may_subscribe(server) -> None:
    c = Client(server)
    try:
        reply = ask(c, "forbidden-room")
        assert reply == {"event": "error", "error": "not allowed to see who is in "
                         "'forbidden-room'", "reply_to": "p1"}
    finally:
        c.close()


def test_a_drained_deploy_leaves_no_ghosts_and_no_leave_join_pairs(pg_dsn, channel) -> None:
    """Host A drains (SIGTERM, 1012 closes spread over a second); its clients come back on
    host B as the same users. Their returns take the drained members' places: subscribers
    see one ``join`` naming the member it ``replaces`` each, no ``leave``; afterwards every
    member is listed once, and nobody who is gone."""
    old = serve_pubsub(pg_dsn, OPTIONS, workers=2, extra_env={"PGWS_DRAIN_SECONDS": "1"})
    new = serve_pubsub(pg_dsn, OPTIONS, workers=2)
    watcher = Client(new, headers={"X-User": "watcher"})
    observer = Client(new, headers={"X-User": "observer"})  # reads frames, asks nothing
    clients = [Client(old, headers={"X-User": f"u{i}"}) for i in range(10)]
    back: List[Client] = []
    try:
        subscribe(watcher, channel)
        subscribe(observer, channel)
        for c in clients:
            subscribe(c, channel)
        joined(observer, {c.id for c in clients})
        old.proc.send_signal(signal.SIGTERM)
        for i, c in enumerate(clients):  # each comes back on the new host once it is closed
            assert close_code(c) == 1012
            again = Client(new, headers={"X-User": f"u{i}"})
            subscribe(again, channel)
            back.append(again)
        assert old.proc.wait(20) is not None
        expected = {c.id for c in back} | {watcher.id, observer.id}
        wait_for(lambda: {m["client"] for m in ask(watcher, channel, f"d{time.monotonic()}")
                          ["members"]} == expected, 5.0, "the members to settle")
        reply = ask(watcher, channel, "final")
        assert reply["count"] == len(expected) == len(reply["members"])
        assert {r[0] for r in rows(pg_dsn, channel)} == expected
        seen: Dict[str, List[Dict[str, Any]]] = {"join": [], "leave": []}
        while True:  # everything the observer got since the deploy began, until 1 s of quiet
            frame = observer.ws.client.receive(timeout=1.0)
            if frame is None:
                break
            decoded = json.loads(frame)
            if decoded.get("event") in seen:
                seen[decoded["event"]].append(decoded)
        print(f"drained deploy of {len(clients)} members: the observer saw "
              f"{len(seen['leave'])} leaves and {len(seen['join'])} joins, "
              f"{sum('replaces' in j for j in seen['join'])} of them replacing a drained member")
        assert seen["leave"] == []
        assert sorted(j["replaces"] for j in seen["join"]) == sorted(c.id for c in clients)
        assert {j["member"]["client"] for j in seen["join"]} == {c.id for c in back}
    finally:
        for c in clients + back + [watcher, observer]:
            c.close()
        old.stop()
        new.stop()


def test_a_clean_close_leaves_within_a_second(server, channel) -> None:
    clients = in_both_workers(server, "quick")
    watcher = clients[0]
    leaving = next(c for c in clients if c.pid != watcher.pid)  # in the other worker
    try:
        for c in clients:
            subscribe(c, channel)
        joined(watcher, {leaving.id})
        started = time.monotonic()
        leaving.close()
        frame = watcher.ws.recv_until(lambda f: f.get("event") == "leave", 5.0)
        took = time.monotonic() - started
        assert frame["member"]["client"] == leaving.id
        print(f"clean close: the leave reached the other worker's subscriber in "
              f"{took * 1000:.0f} ms")
        assert took < 1.0
    finally:
        for c in clients:
            c.close()
