"""The listener against real PostgreSQL servers: delivery, one connection, and surviving faults."""

import logging

import psycopg2
import pytest

from pgws_sync import ConfigError, Listener
from pgws_sync.errors import ListenerStopped
from pgws_sync.sources.base import MAX_BATCH

from ..helpers import Recorder, pg_notify, proxied, wait_for
from ..pgserver import PgServer, free_port


@pytest.fixture
def make_listener():
    made = []

    def make(dsn, **options):
        options.setdefault("min_reconnect", 0.05)
        options.setdefault("max_reconnect", 0.5)
        listener = Listener(dsn, **options)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop()


def listener_backends(conn, application_name="pgws_sync listener"):
    with conn.cursor() as cur:
        cur.execute("SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
                    (application_name,))
        return cur.fetchall()


def test_delivers_in_order_to_each_sink_of_its_channels(pg_dsn, sender, channel, make_listener):
    listener = make_listener(pg_dsn)
    a, b = Recorder(), Recorder()
    listener.add_sink(a, [channel])
    listener.add_sink(b, [channel, channel + "-b"])
    assert listener.wait_connected(10)
    for i in range(50):
        pg_notify(sender, channel, f"m{i}")
    pg_notify(sender, channel + "-b", "only-b")
    wait_for(lambda: len(b.payloads()) == 51, message="51 notifications")
    assert a.payloads() == [f"m{i}" for i in range(50)]
    assert b.payloads() == [f"m{i}" for i in range(50)] + ["only-b"]
    assert all(n.channel == channel for n in a.notes) and a.notes[0].pid > 0


def test_one_connection_however_many_sinks(pg_dsn, sender, make_listener):
    name = "pgws test one-connection"
    listener = make_listener(pg_dsn, application_name=name)
    sinks = [Recorder() for _ in range(5)]
    for i, sink in enumerate(sinks):
        listener.add_sink(sink, [f"one-{i}", "one-shared"])
    assert listener.wait_connected(10)
    backends = listener_backends(sender, name)
    assert len(backends) == 1
    assert backends[0][1] == "idle"  # autocommit: never "idle in transaction"
    pg_notify(sender, "one-shared", "all")
    wait_for(lambda: all(s.payloads() == ["all"] for s in sinks), message="every sink")


@pytest.mark.parametrize("name", ["MixedCase", "with-dash", "with space", 'a "quoted" name',
                                  "\u00e9t\u00e9-\u2603", "x" * 63])
def test_channel_names_are_quoted_identifiers(pg_dsn, sender, make_listener, name):
    listener = make_listener(pg_dsn)
    sink = Recorder()
    listener.add_sink(sink, [name])
    assert listener.wait_connected(10)
    pg_notify(sender, name.lower() if name != name.lower() else name[:-1] + "-", "wrong")
    pg_notify(sender, name, "right")
    wait_for(lambda: "right" in sink.payloads(), message="the notification")
    assert sink.payloads() == ["right"]


def test_a_stream_is_coalesced_but_the_first_after_a_quiet_spell_is_not(pg_dsn, sender, channel,
                                                                        make_listener):
    listener = make_listener(pg_dsn, coalesce=4.0)
    sink = Recorder()
    listener.add_sink(sink, [channel])
    assert listener.wait_connected(10)
    pg_notify(sender, channel, "m0")
    wait_for(lambda: sink.payloads() == ["m0"], message="the first notification, not held back")
    for i in range(1, 6):  # five commits while the window of the first dispatch is open
        pg_notify(sender, channel, f"m{i}")
    wait_for(lambda: len(sink.payloads()) == 6, message="the five that followed")
    assert sink.payloads() == [f"m{i}" for i in range(6)]
    assert sink.batches == 2  # m0 alone, then m1..m5 handed on together


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        Listener("", min_reconnect=5, max_reconnect=1)
    with pytest.raises(ConfigError):
        Listener("", heartbeat_interval=0)
    with pytest.raises(ConfigError):
        Listener("", coalesce=-1)


def test_connection_settings_survive_idle_session_timeout(pg_server, make_listener):
    admin = psycopg2.connect(pg_server.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("ALTER DATABASE postgres SET idle_session_timeout = '200ms'")
    admin.close()
    listener = make_listener(pg_server.dsn, heartbeat_interval=60)
    sink = Recorder()
    listener.add_sink(sink, ["idle"])
    assert listener.wait_connected(10)
    params = listener._conn.get_dsn_parameters()
    assert params["keepalives"] == "1" and "idle_session_timeout=0" in params["options"]
    pid = listener.status()["backend_pid"]
    # an ordinary idle session is ended by the server...
    idle = psycopg2.connect(pg_server.dsn)
    idle.autocommit = True
    with idle.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        idle_pid = cur.fetchone()[0]
    watcher = psycopg2.connect(pg_server.dsn, options="-c idle_session_timeout=0")
    watcher.autocommit = True

    def alive(p):
        with watcher.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (p,))
            return cur.fetchone()[0] == 1

    wait_for(lambda: not alive(idle_pid), message="the plain idle session to be ended")
    # ...while the listener's session is still the same one, and delivers
    assert alive(pid) and listener.status()["backend_pid"] == pid
    with watcher.cursor() as cur:
        cur.execute("SELECT pg_notify('idle', 'still here')")
    wait_for(lambda: sink.payloads() == ["still here"], message="delivery")
    assert sink.resyncs == []
    watcher.close()
    idle.close()


def test_killed_backend_reconnects_relistens_and_resyncs(pg_dsn, sender, channel, make_listener):
    name = "pgws test kill"
    listener = make_listener(pg_dsn, application_name=name)
    sink = Recorder()
    listener.add_sink(sink, [channel, channel + "-2"])
    assert listener.wait_connected(10)
    old_pid = listener.status()["backend_pid"]
    pg_notify(sender, channel, "before")
    wait_for(lambda: sink.payloads() == ["before"], message="first delivery")
    with sender.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    wait_for(lambda: sink.resyncs, message="a resync after reconnecting")
    assert "terminat" in sink.resyncs[0]
    assert listener.connected and listener.status()["backend_pid"] != old_pid
    assert listener.listening == {channel, channel + "-2"}
    assert len(listener_backends(sender, name)) == 1
    pg_notify(sender, channel + "-2", "after")
    wait_for(lambda: sink.payloads() == ["before", "after"], message="delivery after reconnect")
    assert len(sink.resyncs) == 1


def test_database_down_at_start_then_up(tmp_path, make_listener, caplog):
    server = PgServer(tmp_path / "pg", port=free_port())
    listener = make_listener(server.dsn, min_reconnect=0.05, max_reconnect=0.4)
    sink = Recorder()
    listener.add_sink(sink, ["late"])
    caplog.set_level(logging.INFO, logger="pgws_sync.sources.postgres")
    listener.start()
    wait_for(lambda: listener.last_error, message="a failed attempt")
    assert not listener.connected and listener.status()["error"]
    wait_for(lambda: sum("reconnecting in" in r.message for r in caplog.records) >= 5,
             message="several retries")
    try:
        server.start()
        assert listener.wait_connected(10)
        # backoff doubled from min_reconnect and never exceeded max_reconnect
        delays = [float(r.message.split()[-1].rstrip("s")) for r in caplog.records
                  if "reconnecting in" in r.message]
        assert delays[0] < 0.1 and max(delays) <= 0.4 and delays[3] >= 0.3
        assert all(b >= a * 0.9 or b >= 0.36 for a, b in zip(delays, delays[1:]))
        conn = psycopg2.connect(server.dsn)
        conn.autocommit = True
        pg_notify(conn, "late", "arrived")
        wait_for(lambda: sink.payloads() == ["arrived"], message="delivery once up")
        conn.close()
    finally:
        server.destroy()


def test_database_restart_reconnects_and_resyncs(pg_server, make_listener):
    listener = make_listener(pg_server.dsn)
    sink = Recorder()
    listener.add_sink(sink, ["restart"])
    assert listener.wait_connected(10)
    pg_server.stop()
    wait_for(lambda: not listener.connected, message="the listener to notice")
    pg_server.start()
    wait_for(lambda: sink.resyncs, timeout=15, message="a resync")
    assert listener.wait_connected(10)
    conn = psycopg2.connect(pg_server.dsn)
    conn.autocommit = True
    pg_notify(conn, "restart", "after restart")
    wait_for(lambda: sink.payloads() == ["after restart"], message="delivery after restart")
    conn.close()


def test_silent_death_is_noticed_within_a_heartbeat(pg_dsn, sender, make_listener):
    proxy, dsn = proxied(pg_dsn)
    try:
        listener = make_listener(dsn, heartbeat_interval=1.0)
        sink = Recorder()
        listener.add_sink(sink, ["silent"])
        assert listener.wait_connected(10)
        old_pid = listener.status()["backend_pid"]
        proxy.freeze()  # no FIN, no RST: the network just goes quiet
        wait_for(lambda: sink.resyncs, timeout=10, message="a resync after the silent death")
        assert "did not answer" in sink.resyncs[0]
        assert listener.status()["backend_pid"] != old_pid
        pg_notify(sender, "silent", "after")
        wait_for(lambda: sink.payloads() == ["after"], message="delivery on the new connection")
    finally:
        proxy.close()


def test_what_arrives_together_is_handed_on_in_slices_of_max_batch(pg_dsn, sender, channel,
                                                                   make_listener):
    class Sizes(Recorder):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def on_notifications(self, batch):
            self.sizes.append(len(batch))
            super().on_notifications(batch)

    listener = make_listener(pg_dsn)
    sink = Sizes()
    listener.add_sink(sink, [channel])
    assert listener.wait_connected(10)
    count = 2 * MAX_BATCH + 22
    with sender.cursor() as cur:  # one statement, one commit: they arrive together
        cur.execute("SELECT pg_notify(%s, i::text) FROM generate_series(1, %s) AS i", (channel, count))
    wait_for(lambda: len(sink.payloads()) == count, message="every notification")
    assert sink.payloads() == [str(i) for i in range(1, count + 1)]
    assert max(sink.sizes) == MAX_BATCH  # at least one full slice: they did arrive together
    assert sum(sink.sizes) == count


def test_a_failing_sink_does_not_stop_the_listener(pg_dsn, sender, channel, make_listener):
    class Broken(Recorder):
        def on_notifications(self, batch):
            super().on_notifications(batch)
            raise RuntimeError("boom")

    listener = make_listener(pg_dsn)
    broken, good = Broken(), Recorder()
    listener.add_sink(broken, [channel])
    listener.add_sink(good, [channel])
    assert listener.wait_connected(10)
    pg_notify(sender, channel, "1")
    wait_for(lambda: good.payloads() == ["1"] and broken.payloads() == ["1"], message="both")
    pg_notify(sender, channel, "2")
    wait_for(lambda: good.payloads() == ["1", "2"], message="the next one")


def test_unlisten_and_stop_close_the_connection(pg_dsn, sender, channel, make_listener, caplog):
    name = "pgws test stop"
    listener = make_listener(pg_dsn, application_name=name)
    a, b = Recorder(), Recorder()
    listener.add_sink(a, [channel])
    listener.add_sink(b, [channel + "-b"])
    assert listener.wait_connected(10)
    listener.remove_sink(b)
    wait_for(lambda: listener.listening == {channel}, message="UNLISTEN")
    thread = listener._thread
    caplog.set_level(logging.INFO, logger="pgws_sync.sources.postgres")
    listener.stop()
    assert not thread.is_alive()
    assert [r.levelname for r in caplog.records] == ["INFO"]  # "listener stopped", nothing else
    wait_for(lambda: not listener_backends(sender, name), message="the backend to go away")
    with pytest.raises(ListenerStopped):
        listener.start()
