"""The Redis source against real redis-servers: delivery, UNSUBSCRIBE, bad payloads, and faults."""

import logging
import os
import sys
import threading

import pytest
import redis

from pgws_sync import ConfigError, InvalidChannel, RedisSource
from pgws_sync.errors import ListenerStopped, RedisPublishFailed
from pgws_sync.sources import redis as redis_source
from pgws_sync.sources.redis import CLIENT_NAME, redact_url

from ..helpers import Recorder, TcpProxy, wait_for
from ..pgserver import free_port
from ..redisserver import RedisServer


@pytest.fixture
def make_source():
    made = []

    def make(url, **options):
        options.setdefault("min_reconnect", 0.05)
        options.setdefault("max_reconnect", 0.5)
        source = RedisSource(url, **options)
        made.append(source)
        return source

    yield make
    for source in made:
        source.stop()


@pytest.fixture
def rclient(redis_url):
    """A plain redis-py client of the session's server, for publishing and inspecting."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def source_threads():
    return [t for t in threading.enumerate() if t.name == f"pgws-redis-{os.getpid()}"]


def our_clients(client):
    return [c for c in client.client_list() if c.get("name") == CLIENT_NAME]


def test_delivers_in_order_over_channels_and_sinks(redis_url, rclient, channel, make_source):
    source = make_source(redis_url)
    a, b = Recorder(), Recorder()
    source.add_sink(a, [channel])
    source.add_sink(b, [channel, channel + "-b"])
    assert source.wait_connected(10)
    assert source.listening == {channel, channel + "-b"}
    for i in range(50):
        assert source.publish(channel, f"m{i}") == 1  # one connection, however many sinks
        if i % 10 == 0:
            rclient.publish(channel + "-b", f"b{i}")
    wait_for(lambda: len(b.payloads()) == 55, message="55 messages")
    assert a.payloads() == [f"m{i}" for i in range(50)]
    expected = []
    for i in range(50):
        expected.append(f"m{i}")
        if i % 10 == 0:
            expected.append(f"b{i}")
    assert b.payloads() == expected  # arrival order across channels
    assert all(n.channel == channel and n.pid == 0 for n in a.notes)
    wait_for(lambda: len(our_clients(rclient)) == 1, message="one connection of ours")


def test_a_stream_is_handed_on_in_batches(redis_url, rclient, channel, make_source):
    source = make_source(redis_url, coalesce=4.0, heartbeat_interval=20.0)
    sink = Recorder()
    source.add_sink(sink, [channel, channel + "-2"])
    assert source.wait_connected(10)
    rclient.publish(channel, "m0")
    wait_for(lambda: sink.payloads() == ["m0"], message="the first message, not held back")
    for i in range(1, 6):  # five while the window of the first hand-over is open
        rclient.publish(channel if i % 2 else channel + "-2", f"m{i}")
    wait_for(lambda: len(sink.payloads()) == 6, message="the five that followed")
    assert sink.payloads() == [f"m{i}" for i in range(6)]
    assert [n.channel for n in sink.notes[1:]] == [channel, channel + "-2"] * 2 + [channel]
    assert sink.batches == 2  # m0 alone, then m1..m5 together


def test_a_burst_larger_than_one_read_arrives_whole(redis_url, rclient, channel, make_source,
                                                    monkeypatch):
    # The thread reads a few replies at a time, so most of each socket read waits in the
    # parser's buffer, where select() cannot see it; no heartbeat traffic comes to wake it.
    monkeypatch.setattr(redis_source, "_READ_BUDGET", 3)
    source = make_source(redis_url, heartbeat_interval=600.0)
    sink = Recorder()
    source.add_sink(sink, [channel])
    assert source.wait_connected(10)
    pipe = rclient.pipeline(transaction=False)
    for i in range(5000):
        pipe.publish(channel, f"burst {i} " + "x" * (i % 50))
    assert pipe.execute() == [1] * 5000
    wait_for(lambda: len(sink.payloads()) == 5000, message="5000 messages")
    assert sink.payloads() == [f"burst {i} " + "x" * (i % 50) for i in range(5000)]


def test_remove_sink_unsubscribes_channels_nobody_wants(redis_url, rclient, channel, make_source):
    source = make_source(redis_url)
    a, b = Recorder(), Recorder()
    source.add_sink(a, [channel, channel + "-shared"])
    source.add_sink(b, [channel + "-b", channel + "-shared"])
    assert source.wait_connected(10)

    def server_channels():
        return {c.decode() for c in rclient.pubsub_channels(channel + "*")}

    assert server_channels() == {channel, channel + "-b", channel + "-shared"}
    source.remove_sink(b)
    wait_for(lambda: source.listening == {channel, channel + "-shared"}, message="UNSUBSCRIBE")
    assert server_channels() == {channel, channel + "-shared"}
    rclient.publish(channel + "-shared", "still")
    wait_for(lambda: a.payloads() == ["still"], message="delivery on the shared channel")
    source.remove_sink(a)
    wait_for(lambda: not source.listening, message="UNSUBSCRIBE of everything")
    assert server_channels() == set()
    assert source.connected  # connected with nothing to listen to
    assert b.payloads() == []


def test_odd_channel_names_are_literal(redis_url, rclient, make_source):
    names = ["with space", "\u00e9t\u00e9-\u2603", "star*", "q?[x]", "x" * 300]
    source = make_source(redis_url)
    sink = Recorder()
    source.add_sink(sink, names)
    assert source.wait_connected(10)
    rclient.publish("starX", "not a pattern")
    for name in names:
        rclient.publish(name, name)
    wait_for(lambda: len(sink.payloads()) == len(names), message="one message per name")
    assert [(n.channel, n.payload) for n in sink.notes] == [(n, n) for n in names]


def test_invalid_utf8_is_dropped_with_a_warning(redis_url, rclient, channel, make_source, caplog):
    source = make_source(redis_url)
    sink = Recorder()
    source.add_sink(sink, [channel])
    assert source.wait_connected(10)
    caplog.set_level(logging.WARNING, logger="pgws_sync.sources.redis")
    rclient.publish(channel, b"bad \xff\xfe bytes")
    rclient.publish(channel, "caf\u00e9 ok")
    wait_for(lambda: sink.payloads() == ["caf\u00e9 ok"], message="the next message")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and channel in warnings[0] and "UTF-8" in warnings[0]
    assert source.connected and sink.resyncs == []


def test_a_failing_sink_does_not_stop_delivery(redis_url, rclient, channel, make_source, caplog):
    class Broken(Recorder):
        def on_notifications(self, batch):
            super().on_notifications(batch)
            raise RuntimeError("boom")

    source = make_source(redis_url)
    broken, good = Broken(), Recorder()
    source.add_sink(broken, [channel])
    source.add_sink(good, [channel])
    assert source.wait_connected(10)
    rclient.publish(channel, "1")
    wait_for(lambda: good.payloads() == ["1"] and broken.payloads() == ["1"], message="both")
    rclient.publish(channel, "2")
    wait_for(lambda: good.payloads() == ["1", "2"] and broken.payloads() == ["1", "2"],
             message="the next one")
    assert source.connected
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


def test_publish_returns_receivers_and_fails_clearly_when_down(redis_server, channel,
                                                               make_source):
    source = make_source(redis_server.url)
    assert source.publish(channel, "nobody listens") == 0
    sink = Recorder()
    source.add_sink(sink, [channel])
    assert source.wait_connected(10)
    assert source.publish(channel, "one") == 1
    wait_for(lambda: sink.payloads() == ["one"], message="delivery")
    redis_server.stop()
    with pytest.raises(RedisPublishFailed) as info:
        source.publish(channel, "lost")
    message = str(info.value)
    assert info.value.channel == channel and redis_server.url in message
    assert "could not PUBLISH" in message and "redis-server is running" in message
    redis_server.start()
    assert source.wait_connected(10)
    assert source.publish(channel, "two") == 1  # a new connection, no error to the caller
    wait_for(lambda: sink.payloads() == ["one", "two"], message="delivery after the restart")


def test_redis_down_at_start_then_up(make_source, caplog):
    server = RedisServer(port=free_port())
    try:
        source = make_source(server.url, max_reconnect=0.4)
        sink = Recorder()
        source.add_sink(sink, ["late"])
        caplog.set_level(logging.INFO, logger="pgws_sync.sources.redis")
        source.start()
        wait_for(lambda: source.last_error, message="a failed attempt")
        status = source.status()
        assert not source.connected and not status["connected"] and status["error"]
        assert status["url"] == server.url and status["channels"] == []
        wait_for(lambda: sum("reconnecting in" in r.message for r in caplog.records) >= 5,
                 message="several retries")
        assert any(r.levelname == "WARNING" and "cannot connect" in r.message
                   for r in caplog.records)
        server.start()
        assert source.wait_connected(10)  # on its own
        delays = [float(r.message.split()[-1].rstrip("s")) for r in caplog.records
                  if "reconnecting in" in r.message]
        assert delays[0] < 0.1 and max(delays) <= 0.4 and delays[3] >= 0.3
        assert source.status() == {"connected": True, "channels": ["late"], "error": None,
                                   "url": server.url}
        wait_for(lambda: sink.resyncs, message="a resync: messages may have been missed")
        assert len(sink.resyncs) == 1 and "refused" in sink.resyncs[0].lower()
        assert source.publish("late", "arrived") == 1
        wait_for(lambda: sink.payloads() == ["arrived"], message="delivery once up")
    finally:
        server.destroy()


@pytest.mark.parametrize("graceful", [False, True], ids=["kill-9", "sigterm"])
def test_restart_mid_stream_resyncs_once_and_delivers(redis_server, make_source, caplog,
                                                      graceful):
    source = make_source(redis_server.url)
    sink, other = Recorder(), Recorder()
    source.add_sink(sink, ["stream", "stream-2"])
    source.add_sink(other, ["stream-2"])
    assert source.wait_connected(10)
    client = redis_server.client()
    try:
        for i in range(20):
            client.publish("stream", f"before {i}")
        wait_for(lambda: len(sink.payloads()) == 20, message="the messages before the crash")
        assert sink.resyncs == []
        caplog.set_level(logging.WARNING, logger="pgws_sync.sources.redis")
        redis_server.stop(graceful=graceful)
        wait_for(lambda: not source.connected, message="the source to notice")
        assert any("connection lost" in r.message for r in caplog.records)
        client.close()
        redis_server.start()
        wait_for(lambda: sink.resyncs, timeout=15, message="a resync")
        assert source.wait_connected(10)
        assert source.listening == {"stream", "stream-2"}
        client = redis_server.client()
        for i in range(20):
            client.publish("stream" if i % 2 else "stream-2", f"after {i}")
        wait_for(lambda: len(sink.payloads()) == 40, message="the messages after the restart")
        assert sink.payloads() == [f"before {i}" for i in range(20)] + [f"after {i}"
                                                                         for i in range(20)]
        assert len(sink.resyncs) == 1 and sink.resyncs[0]
        assert len(other.resyncs) == 1
        assert other.payloads() == [f"after {i}" for i in range(0, 20, 2)]
        wait_for(lambda: len(our_clients(client)) == 1, message="one connection of ours")
    finally:
        client.close()


def test_silent_connection_is_noticed_by_the_heartbeat(redis_url, rclient, make_source):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    try:
        source = make_source(f"redis://127.0.0.1:{proxy.port}/0", heartbeat_interval=1.0)
        sink = Recorder()
        source.add_sink(sink, ["silent"])
        assert source.wait_connected(10)
        before = {c["id"] for c in our_clients(rclient)}
        proxy.freeze()  # no FIN, no RST: the network just goes quiet
        wait_for(lambda: sink.resyncs, timeout=10, message="a resync after the silent death")
        assert "did not answer a PING" in sink.resyncs[0]
        assert source.wait_connected(10)
        assert {c["id"] for c in our_clients(rclient)} - before  # a new connection
        rclient.publish("silent", "after")
        wait_for(lambda: sink.payloads() == ["after"], message="delivery on the new connection")
    finally:
        proxy.close()


def test_an_idle_healthy_connection_stays(redis_server, make_source):
    source = make_source(redis_server.url, heartbeat_interval=0.4, coalesce=0)
    sink = Recorder()
    source.add_sink(sink, ["idle"])
    assert source.wait_connected(10)
    client = redis_server.client()
    try:
        [first] = [c["id"] for c in our_clients(client)]
        # several heartbeats go by: PINGs are sent and answered (the server counts them)
        wait_for(lambda: int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))
                 >= 5, message="five PINGs")
        assert [c["id"] for c in our_clients(client)] == [first] and sink.resyncs == []
        client.publish("idle", "still here")
        wait_for(lambda: sink.payloads() == ["still here"], message="delivery")
    finally:
        client.close()


def test_unix_socket_url(make_source):
    server = RedisServer(unix_socket=True).start()
    try:
        source = make_source(server.unix_url)
        sink = Recorder()
        source.add_sink(sink, ["unix"])
        assert source.wait_connected(10)
        assert source.publish("unix", "over a unix socket") == 1
        wait_for(lambda: sink.payloads() == ["over a unix socket"], message="delivery")
        assert source.status()["url"] == server.unix_url
    finally:
        server.destroy()


def test_stop_is_prompt_and_the_thread_is_gone(redis_url, make_source, caplog):
    # A heartbeat far longer than stop()'s wait: the thread must be woken, not time out.
    source = make_source(redis_url, heartbeat_interval=600.0)
    source.add_sink(Recorder(), ["stopping"])
    assert source.wait_connected(10)
    assert len(source_threads()) == 1
    thread = source_threads()[0]
    assert thread.daemon
    caplog.set_level(logging.INFO, logger="pgws_sync.sources.redis")
    source.stop(timeout=5)
    assert not thread.is_alive() and source_threads() == []
    assert [r.levelname for r in caplog.records] == ["INFO"]  # "redis source stopped" only
    assert not source.connected and source.status()["channels"] == []
    with pytest.raises(ListenerStopped):
        source.start()
    with pytest.raises(RedisPublishFailed, match="stopped"):
        source.publish("stopping", "x")


def test_stop_during_backoff_is_prompt(make_source):
    source = make_source(f"redis://127.0.0.1:{free_port()}/0", min_reconnect=60.0,
                         max_reconnect=60.0)
    source.start()
    wait_for(lambda: source.last_error, message="a failed attempt, then a long wait")
    thread = source_threads()[0]
    source.stop(timeout=5)
    assert not thread.is_alive()


def test_a_forked_child_gets_its_own_thread_and_connection(redis_url, rclient, channel,
                                                           make_source):
    source = make_source(redis_url)
    sink = Recorder()
    source.add_sink(sink, [channel])
    assert source.wait_connected(10)
    assert source.publish(channel, "parent before") == 1
    wait_for(lambda: sink.payloads() == ["parent before"], message="delivery before the fork")
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            if source.wait_connected(10) and source_threads():
                # the child's sink list is a copy: the parent's recorder lives on here
                if source.publish(channel, "child") == 2:
                    wait_for(lambda: sink.payloads()[-1:] == ["child"], message="child delivery")
                    source.stop()
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: sink.payloads() == ["parent before", "child"], message="the child's message")
    assert source.connected and source.publish(channel, "parent after") == 1
    wait_for(lambda: sink.payloads()[-1:] == ["parent after"], message="the parent still delivers")
    assert sink.resyncs == []
    wait_for(lambda: len(our_clients(rclient)) == 1, message="the child's connection to go")


def test_password_is_redacted():
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://host/0?password=s3cret&db=1") == \
        "redis://host/0?password=%2A%2A%2A&db=1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"


def test_publish_error_and_status_never_show_the_password(make_source):
    source = make_source(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisPublishFailed) as info:
        source.publish("x", "y")
    assert "s3cret" not in str(info.value) and ":***@" in str(info.value)
    source.start()
    wait_for(lambda: source.last_error, message="a failed attempt")
    assert "s3cret" not in repr(source.status())


def test_bad_settings_channels_and_payloads_are_refused():
    with pytest.raises(ConfigError):
        RedisSource(min_reconnect=5, max_reconnect=1)
    with pytest.raises(ConfigError):
        RedisSource(heartbeat_interval=0)
    with pytest.raises(ConfigError):
        RedisSource(coalesce=-1)
    with pytest.raises(ConfigError, match="redis://"):
        RedisSource("http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match="bogus"):
        RedisSource("redis://127.0.0.1:6379/0?bogus=1")
    source = RedisSource()
    for bad in ["", "a\x00b", 5, "\ud800"]:
        with pytest.raises(InvalidChannel):
            source.add_sink(Recorder(), [bad])
        with pytest.raises(InvalidChannel):
            source.publish(bad, "x")
    with pytest.raises(ValueError, match="text"):
        source.publish("ok", b"bytes")  # type: ignore[arg-type]
    source.stop()


def test_missing_redis_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigError, match=r"install pgws_sync with its redis extra"):
        RedisSource()
