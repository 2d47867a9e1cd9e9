"""Three hosts (gunicorn, two workers each) behind a real HAProxy on one PostgreSQL, clients
through the balancer only: a host killed mid-stream, presence, server-side control across
hosts, and a rolling restart (tests/multihost.py, docs/scaling-out.md)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Dict, Iterator, List

import pytest

from . import programs
from .durable_helpers import new_log, wait_numbered
from .helpers import ROOT, Ws, wait_for
from .multihost import Publishers, Rig, Swarm, wait_caught_up
from .pubsub_helpers import post

PRESENCE_TIMEOUT = 3.0
CLIENTS = 30


@pytest.fixture(scope="module")
def rig(pg_dsn: str) -> Iterator[Rig]:
    haproxy = programs.require("haproxy")
    started = Rig(pg_dsn, new_log(pg_dsn), haproxy,
                  options={"presence": True, "presence_timeout": PRESENCE_TIMEOUT})
    yield started
    started.stop()


def through(rig: Rig, user: str = "anonymous") -> Ws:
    """A client through the balancer; its welcome read (``ws.pid`` names its worker)."""
    ws = Ws(f"ws://127.0.0.1:{rig.port}/ws", headers={"X-User": user})
    welcome = ws.recv_json()
    assert welcome["event"] == "welcome", welcome
    ws.pid, ws.id = welcome["pid"], welcome["id"]  # type: ignore[attr-defined]
    return ws


def subscribe(ws: Ws, channel: str) -> Dict[str, Any]:
    ws.client.send(json.dumps({"action": "subscribe", "channel": channel, "id": channel}))
    return ws.recv_until(lambda f: f.get("event") == "subscribed" and f["channel"] == channel)


def on_hosts(rig: Rig, swarm: Swarm) -> List[int]:
    """How many of the swarm's clients each host serves."""
    counts = [0] * len(rig.hosts)
    for c in swarm.clients:
        host = rig.host_of(c.pid) if c.pid else None
        if c.open and host is not None:
            counts[host] += 1
    return counts


def test_the_scaling_out_page_includes_the_configuration():
    page = (ROOT / "docs" / "scaling-out.md").read_text()
    assert '--8<-- "examples/proxy/haproxy-hosts.cfg"' in page  # the file, not a copy


#: The sessions each worker of a durable endpoint with presence holds (counted from the code):
#: and up to ``pool_size`` (4) "pgws_sync publisher" sessions, opened when it publishes.
PER_WORKER = {"pgws_sync listener": 1, "pgws_sync streams": 1, "pgws_sync sequencer": 1,
              "pgws_sync presence": 1, "pgws_sync canary": 1}


def sessions(rig: Rig) -> Dict[int, Counter]:
    """pg_stat_activity's sessions of the rig, per pid (sequencers' names without their pid)."""
    found: Dict[int, Counter] = {}
    for _host, pid, name in rig.backends():
        kind = name.rsplit(" ", 1)[0] if "sequencer" in name else name
        found.setdefault(pid, Counter())[kind] += 1
    return found


def test_each_worker_holds_five_sessions_and_the_masters_none(rig):
    post(rig.hosts[0], "/debug/publish", {"channel": "sessions", "message": {}})
    workers = {pid for host in rig.hosts for pid in host.worker_pids()}

    def as_counted() -> bool:
        found = sessions(rig)
        if set(found) != workers:
            return False
        for counts in found.values():
            publishers = counts.pop("pgws_sync publisher", 0)
            if dict(counts) != PER_WORKER or publishers > 4:
                return False
        return True
    wait_for(as_counted, 15, message=f"each worker's sessions as counted: {PER_WORKER}")
    assert sum(sessions(rig)[pid].get("pgws_sync publisher", 0) for pid in workers) >= 1


def test_the_balancer_spreads_sockets_over_the_three_hosts(rig):
    rig.wait_states(["UP"] * 3)  # a host the checks saw slow under load gets no sockets
    socks = [through(rig) for _ in range(6)]
    try:
        hosts = [rig.host_of(ws.pid) for ws in socks]
        assert sorted(hosts) == [0, 0, 1, 1, 2, 2], hosts  # leastconn: two each
    finally:
        for ws in socks:
            ws.close()


def test_disconnect_issued_on_one_host_closes_a_users_sockets_on_all(rig):
    rig.wait_states(["UP"] * 3)
    alice = [through(rig, "alice") for _ in range(3)]
    bob = through(rig, "bob")
    try:
        assert {rig.host_of(ws.pid) for ws in alice} == {0, 1, 2}
        post(rig.hosts[0], "/debug/control", {"op": "disconnect", "match": {"user": "alice"},
                                              "code": 4001, "reason": "logged out"})
        for ws in alice:
            assert ws.expect_close() == (4001, "logged out")
        assert subscribe(bob, "still-here")["channel"] == "still-here"
    finally:
        for ws in (*alice, bob):
            ws.close()


def test_a_host_killed_mid_stream_loses_nothing(rig, pg_dsn):
    channels = [f"kill-{i}" for i in range(3)]
    watcher = through(rig)
    subscribe(watcher, channels[0])
    swarm = Swarm(rig.port, CLIENTS, channels)
    publishers, victim = None, None
    try:
        wait_for(lambda: swarm.check() or swarm.subscribed() == CLIENTS, 30,
                 message="every client subscribed")
        counts = on_hosts(rig, swarm)
        victim = max((i for i in range(3) if i != rig.host_of(watcher.pid)),
                     key=lambda i: counts[i])
        moved = [c for c in swarm.clients if rig.host_of(c.pid) == victim]
        members = {c.ids[-1] for c in moved if channels[0] in c.channels}
        assert moved and members, counts

        publishers = Publishers(pg_dsn, rig.schema, channels, rate=40)
        wait_for(lambda: publishers.total() >= 40, 10, message="publishing under way")
        killed_at = time.monotonic()
        dead = rig.kill(victim)

        # presence: every member the killed host held leaves, announced by the others
        left = set()

        def all_left() -> bool:
            frame = watcher.recv_json(timeout=PRESENCE_TIMEOUT * 3)
            if frame.get("event") == "leave":
                left.add(frame["member"]["client"])
            return members <= left
        wait_for(all_left, PRESENCE_TIMEOUT * 4 / 3 + 3, message="the dead host's members to leave")
        print(f"presence: the killed host's {len(members)} members left "
              f"{time.monotonic() - killed_at:.1f} s after the kill")

        # its clients came back through the balancer to the other hosts, and resumed
        wait_for(lambda: swarm.check() or all(c.open and c.pid not in dead and len(c.ids) > 1
                                              for c in moved), 30,
                 message="the killed host's clients back on the others")
        assert {rig.host_of(c.pid) for c in moved} <= {0, 1, 2} - {victim}
        goal = publishers.total() + 40
        wait_for(lambda: publishers.total() >= goal, 10, message="publishing after the kill")
        published = publishers.stop()
        wait_numbered(pg_dsn, rig.schema)
        wait_caught_up(swarm, published)
        assert swarm.problems() == []
        assert all(c.first == {ch: 0 for ch in c.channels} for c in swarm.clients)
    finally:
        if publishers is not None:
            publishers.stop()
        swarm.stop()
        watcher.close()
        if victim is not None and rig.hosts[victim].proc.poll() is not None:
            rig.start(victim)
            rig.wait_states(["UP"] * 3)


def test_a_rolling_restart_of_every_host_loses_nothing(rig, pg_dsn):
    channels = [f"roll-{i}" for i in range(3)]
    swarm = Swarm(rig.port, CLIENTS, channels)
    publishers = None
    try:
        wait_for(lambda: swarm.check() or swarm.subscribed() == CLIENTS, 30,
                 message="every client subscribed")
        publishers = Publishers(pg_dsn, rig.schema, channels, rate=40)
        for i in range(3):
            rig.restart(i)
        wait_for(lambda: swarm.check() or swarm.subscribed() == CLIENTS, 30,
                 message="every client back")
        published = publishers.stop()
        wait_numbered(pg_dsn, rig.schema)
        wait_caught_up(swarm, published)
        assert swarm.problems() == []
        assert all(len(c.ids) >= 2 for c in swarm.clients)  # each host drained its own
        assert all(c.first == {ch: 0 for ch in c.channels} for c in swarm.clients)
        print(f"rolling restart: {sum(published.values())} messages, "
              f"{len(swarm.connects) - CLIENTS} reconnects, closes {swarm.closes}")
    finally:
        if publishers is not None:
            publishers.stop()
        swarm.stop()
