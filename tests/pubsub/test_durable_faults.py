"""Durable channels under load and faults: concurrent publishers, kills, restarts, slow readers.

Every test publishes through real transactions, runs the real app under gunicorn
with two workers and checks, per channel, that each committed message arrived
exactly once, offsets gap-free and increasing, and nothing rolled back arrived.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from typing import Dict, List, Set, Tuple
import signal

import psycopg2
import pytest
import simple_websocket

from pgws_sync import publish_durable

from ..durable_helpers import Resumer, new_log, serve_durable
from ..helpers import raw_upgrade, read_frame, wait_for
from ..pubsub_helpers import stats
from ..test_faults import masked_frame


class Publishers:
    """``threads`` publishers, each in its own transactions (1-3 messages, a random pause
    before COMMIT, one in ten rolled back), recording what committed."""

    def __init__(self, dsn: str, schema: str, channels: List[str], *, threads: int,
                 total: int, pause: float = 0.002) -> None:
        self.pause = pause
        self.dsn, self.schema, self.channels = dsn, schema, channels
        self.committed: Dict[str, Set[str]] = {c: set() for c in channels}
        self.rolled_back: Set[str] = set()
        self.failed = 0
        self._lock = threading.Lock()
        self._left = total
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"publisher-{i}",
                                          daemon=True) for i in range(threads)]

    def start(self) -> "Publishers":
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 300) -> None:
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive()

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.committed.values())

    def _take(self, n: int) -> int:
        with self._lock:
            n = min(n, self._left)
            self._left -= n
            return n

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        conn = None
        seq = 0
        while True:
            n = self._take(rng.randint(1, 3))
            if not n:
                break
            batch: List[Tuple[str, str]] = []
            for _ in range(n):
                seq += 1
                batch.append((rng.choice(self.channels), f"{index}-{seq}"))
            # channels in one order in every transaction, as docs/guides/durable.md says (else two
            # transactions can each hold the other's channel and the database aborts one)
            batch.sort(key=lambda item: item[0])
            rollback = rng.random() < 0.1
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.dsn)
                for channel, tag in batch:
                    publish_durable(conn, channel, {"tag": tag}, schema=self.schema)
                time.sleep(rng.random() * self.pause)  # hold the transaction open a moment
                if rollback:
                    conn.rollback()
                    with self._lock:
                        self.rolled_back.update(tag for _, tag in batch)
                    continue
                conn.commit()
            except psycopg2.Error:  # the database went away: this transaction did not commit
                with self._lock:
                    self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                wait_for(lambda: reachable(self.dsn), timeout=60, message="the database back")
                with self._lock:
                    self._left += n  # publish as many again
                continue
            with self._lock:
                for channel, tag in batch:
                    self.committed[channel].add(tag)
        if conn is not None:
            conn.close()


def got_everything_once(reader: Resumer, publishers: Publishers) -> None:
    """Read until ``reader`` has as many messages as committed, then check they are those."""
    reader.read_all({c: len(publishers.committed[c]) for c in publishers.channels}, timeout=60)
    check_exactly_once(reader.received, publishers)


def reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn).close()
    except psycopg2.Error:
        return False
    return True


def check_exactly_once(received: Dict[str, List[dict]], publishers: Publishers) -> None:
    for channel in publishers.channels:
        tags = [p["tag"] for p in received.get(channel, [])]
        assert len(tags) == len(set(tags)), f"{channel}: duplicates"
        assert set(tags) == publishers.committed[channel], (
            f"{channel}: missing {len(publishers.committed[channel] - set(tags))}, "
            f"extra {len(set(tags) - publishers.committed[channel])}")
        assert not set(tags) & publishers.rolled_back


def test_8_publishers_20000_messages_a_client_resuming_every_second(pg_dsn):
    schema = new_log(pg_dsn)
    channels = [f"ch{i}" for i in range(4)]
    server = serve_durable(pg_dsn, schema, workers=2)
    try:
        reader = Resumer(server)  # checks offsets are consecutive on every frame
        reader.connect(channels)
        publishers = Publishers(pg_dsn, schema, channels, threads=8, total=20_000).start()
        reconnects = 0
        while any(t.is_alive() for t in publishers._threads) or reconnects < 3:
            deadline = time.monotonic() + random.uniform(0.2, 0.8)
            while time.monotonic() < deadline:
                reader._read_some()
            reader.close()
            replies = reader.connect(channels)  # since + epoch of what it has
            assert all(r["event"] == "subscribed" for r in replies), replies
            reconnects += 1
        publishers.join()
        got_everything_once(reader, publishers)
        assert publishers.count + len(publishers.rolled_back) == 20_000 and reconnects >= 3
        print(f"\n20000 committed, {len(publishers.rolled_back)} rolled back, "
              f"{reconnects} resumes")
        reader.close()
    finally:
        server.stop()


def backends(admin) -> List[int]:
    with admin.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name IN "
                    "('pgws_sync listener', 'pgws_sync streams')")
        return [pid for pid, in cur.fetchall()]


def test_killed_backends_and_a_database_restart_lose_nothing_for_100_clients(pg_server):
    dsn = pg_server.dsn
    schema = new_log(dsn)
    channels = ["a", "b"]
    server = serve_durable(dsn, schema, workers=2)
    readers = []
    try:
        for _ in range(100):
            reader = Resumer(server)
            reader.connect(channels)
            readers.append(reader)
        # slow enough to be still publishing through five kills (publishers never wait)
        publishers = Publishers(dsn, schema, channels, threads=4, total=6000,
                                pause=0.02).start()
        admin = psycopg2.connect(dsn)
        admin.autocommit = True
        for _ in range(5):
            wait_for(lambda: publishers.count > 0, message="publishing")
            wait_for(lambda: len(backends(admin)) == 4,
                     message="both workers' listener and log reader connected")
            before = publishers.count
            with admin.cursor() as cur:  # the listeners and the log readers of both workers
                cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                            (backends(admin),))
            wait_for(lambda: publishers.count > before + 200, timeout=30,
                     message="publishing goes on")
        admin.close()
        pg_server.restart()
        publishers.join()
        assert publishers.failed > 0  # the restart really broke transactions
        for reader in readers:
            got_everything_once(reader, publishers)
        print(f"\n{publishers.count} committed; {publishers.failed} transactions failed with "
              f"the restart; 100 clients got each committed message once")
    finally:
        for reader in readers:
            reader.close()
        server.stop()


def test_a_client_offline_for_100000_messages_resumes_with_all_in_pages(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"max_queue": 256})
    try:
        reader = Resumer(server)
        reader.connect(["big"])
        reader.close()
        conn = psycopg2.connect(pg_dsn)
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count({schema}.publish('big', json_build_object('n', i)::text)) "
                        f"FROM generate_series(1, 100000) AS i")
        conn.close()
        rss_before = stats(server)["rss_kb"]
        started = time.monotonic()
        reader.connect(["big"])
        peak = [rss_before]

        def sample() -> bool:
            peak[0] = max(peak[0], stats(server)["rss_kb"])
            return False

        wait_for(lambda: sample() or any(reader._read_some() for _ in range(200)) or
                 len(reader.received.get("big", [])) >= 100_000, timeout=120,
                 message="100000 messages")
        took = time.monotonic() - started
        assert [p["n"] for p in reader.received["big"]] == list(range(1, 100_001))
        print(f"\nreplayed 100000 messages in {took:.1f}s ({100000 / took:.0f}/s); worker RSS "
              f"{rss_before} KB before, at most {peak[0]} KB while replaying")
        assert peak[0] - rss_before < 64 * 1024  # bounded: far below what 100000 frames take
        reader.close()
    finally:
        server.stop()


def read_messages(sock: socket.socket, want: int, timeout: float = 60.0) -> List[dict]:
    frames: List[dict] = []
    deadline = time.monotonic() + timeout
    while len(frames) < want:
        opcode, data = read_frame(sock, timeout=max(0.1, deadline - time.monotonic()))
        assert opcode == 1, (opcode, data[:100])
        frame = json.loads(data)
        if "offset" in frame:
            frames.append(frame)
    return frames


def stalled_client(server, channel: str) -> socket.socket:
    sock, head = raw_upgrade(server.port, rcvbuf=4096)
    assert b" 101 " in head
    read_frame(sock)  # welcome

    sock.sendall(masked_frame(1, json.dumps({"action": "subscribe", "channel": channel,
                                             "id": 1}).encode()))
    assert json.loads(read_frame(sock)[1])["event"] == "subscribed"
    return sock


def publish_16_mb(dsn: str, schema: str, channel: str) -> int:
    body = "x" * 16_000
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT count({schema}.publish(%s, %s, 'text')) FROM generate_series(1, 1000)",
                    (channel, body))
    conn.close()
    return 1000


def test_a_client_that_stops_reading_loses_nothing_and_is_paged_from_the_log(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"max_queue": 64, "write_timeout": 120})
    try:
        sock = stalled_client(server, "slow")
        n = publish_16_mb(pg_dsn, schema, "slow")
        wait_for(lambda: stats(server)["connections"][0]["queue_depth"] > 0, timeout=30,
                 message="its queue holds frames")  # 16 MB numbered and read on a busy machine
        frames = read_messages(sock, n)
        assert [f["offset"] for f in frames] == list(range(1, n + 1))
        assert stats(server)["sockets"] == 1  # never closed with 1013
        sock.close()
    finally:
        server.stop()


def test_a_client_dropped_after_write_timeout_resumes_with_nothing_lost(pg_dsn):
    schema = new_log(pg_dsn)
    server = serve_durable(pg_dsn, schema, {"max_queue": 64, "write_timeout": 1})
    try:
        sock = stalled_client(server, "slow")
        n = publish_16_mb(pg_dsn, schema, "slow")
        wait_for(lambda: stats(server)["sockets"] == 0, message="the blocked socket dropped")
        got: List[dict] = []
        try:
            while True:
                opcode, data = read_frame(sock, timeout=5)
                if opcode != 1:
                    break
                frame = json.loads(data)
                if "offset" in frame:
                    got.append(frame)
        except (AssertionError, OSError, ValueError):
            pass  # the connection ended mid-frame
        sock.close()
        assert len(got) < n
        reader = Resumer(server)
        if got:
            reader.positions["slow"] = (got[-1]["offset"], got[-1]["epoch"])
        reader.connect(["slow"])
        reader.read_all({"slow": n - len(got)})
        offsets = [f["offset"] for f in got] + list(range(len(got) + 1, n + 1))
        assert offsets == list(range(1, n + 1))
        assert len(reader.received["slow"]) == n - len(got)
        reader.close()
    finally:
        server.stop()


def test_a_drained_deploy_loses_nothing_on_durable_channels(pg_dsn):
    """SIGTERM drains the sockets (1012, spread over 2 s) while publishing goes on; a new
    server takes the port; every client resumes with since and ends with every message once."""
    clients = int(os.environ.get("PGWS_DRAIN_CLIENTS", "200"))  # 1000 for the figure in docs
    schema = new_log(pg_dsn)
    channels = ["a", "b"]
    drain = {"extra_env": {"PGWS_DRAIN_SECONDS": "2"}, "threads": clients * 7 // 10 + 50}
    server = serve_durable(pg_dsn, schema, workers=2, **drain)
    readers = []
    try:
        for _ in range(clients):
            reader = Resumer(server)
            reader.connect(channels)
            readers.append(reader)
        total = 800_000 // clients  # what the test's own client threads can read in time
        publishers = Publishers(pg_dsn, schema, channels, threads=4, total=total).start()
        wait_for(lambda: publishers.count > total // 8, timeout=60, message="publishing")
        port = server.port
        server.stop()  # the drain: 1012 "restart: reconnect after 1.0s", spread over 2 s
        codes = set()
        for reader in readers:
            with pytest.raises(simple_websocket.ConnectionClosed) as closed:
                while True:
                    reader.next(timeout=30)
            codes.add(closed.value.reason)
        assert codes == {1012}
        server = serve_durable(pg_dsn, schema, workers=2, port=port, **drain)
        for reader in readers:
            reader.close()
            assert all(r["event"] == "subscribed" for r in reader.connect(channels))
        publishers.join()
        for reader in readers:
            got_everything_once(reader, publishers)
        print(f"\n{clients} clients drained with 1012 and resumed: {publishers.count} committed "
              f"messages, each received once by every client")
    finally:
        for reader in readers:
            reader.close()
        server.stop()


def sequencer_backend(admin, schema: str) -> Tuple[int, int]:
    """(backend pid, worker pid) of the elected sequencer: the session holding its lock."""
    with admin.cursor() as cur:
        cur.execute("SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                    "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.objid::int = hashtext(%s)", (schema + ".sequencer",))
        rows = cur.fetchall()
    assert len(rows) <= 1, rows
    if not rows:
        return 0, 0
    return rows[0][0], int(rows[0][1].rsplit(" ", 1)[1])


def test_the_sequencer_killed_5_times_and_its_worker_once_loses_nothing(pg_dsn):
    """8 publishers, 20000 messages, a client resuming every second, while the elected
    sequencer's backend is terminated five times and its worker SIGKILLed once."""
    schema = new_log(pg_dsn)
    channels = [f"ch{i}" for i in range(4)]
    server = serve_durable(pg_dsn, schema, workers=2)
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    kills: List[str] = []

    def killer() -> None:
        for round_ in range(6):
            wait_for(lambda: sequencer_backend(admin, schema)[0], timeout=30,
                     message="an elected sequencer")
            before = publishers.count
            wait_for(lambda: publishers.count > before + 500 or not publishing(), timeout=60,
                     message="publishing goes on")
            backend, worker = wait_for(lambda: sequencer_backend(admin, schema)[0]
                                       and sequencer_backend(admin, schema), timeout=30,
                                       message="an elected sequencer")
            if round_ == 3:
                # never a pid of 0 or of anything but this server's workers: os.kill(0, ...)
                # would kill this test's whole process group
                assert worker in server.worker_pids(), (worker, server.worker_pids())
                os.kill(worker, signal.SIGKILL)
                kills.append(f"worker {worker}")
            else:
                with admin.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
                kills.append(f"backend {backend}")

    def publishing() -> bool:
        return any(t.is_alive() for t in publishers._threads)

    try:
        reader = Resumer(server)
        reader.connect(channels)
        publishers = Publishers(pg_dsn, schema, channels, threads=8, total=20_000).start()
        kill_thread = threading.Thread(target=killer, name="killer", daemon=True)
        kill_thread.start()
        while publishing() or kill_thread.is_alive():
            deadline = time.monotonic() + random.uniform(0.5, 1.5)
            try:
                while time.monotonic() < deadline:
                    reader._read_some()
            except (simple_websocket.ConnectionClosed, OSError):
                pass  # its worker was killed: resume on the other (or the new) one
            reader.close()
            wait_for(lambda: _reconnected(reader, channels), timeout=30,
                     message="the client resumed")
        publishers.join()
        kill_thread.join(60)
        assert len(kills) == 6, kills
        reader.read_all({c: len(publishers.committed[c]) for c in channels}, timeout=120)
        check_exactly_once(reader.received, publishers)
        print(f"\n{publishers.count} committed while killing {', '.join(kills)}: every one "
              f"received once, offsets consecutive")
        reader.close()
    finally:
        admin.close()
        server.stop()


def _reconnected(reader: Resumer, channels: List[str]) -> bool:
    try:
        replies = reader.connect(channels)
    except (simple_websocket.ConnectionError, simple_websocket.ConnectionClosed, OSError,
            AssertionError):  # its worker died mid-handshake (a gap would still show at the end)
        reader.close()
        return False
    assert all(r["event"] == "subscribed" for r in replies), replies
    return True
