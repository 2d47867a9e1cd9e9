"""Batching: the Batcher on its own (a recording publish function), then end to end under gunicorn."""

import json
import signal
import threading

import pytest

from pgws_sync import Batcher, BatcherStopped, InvalidPayload

from ..helpers import http_get, raw_upgrade, wait_for
from ..pubsub_helpers import Client, post, serve_pubsub, stats, wait_sockets


class Recorder:
    def __init__(self, fail_on=None):
        self.sent = []
        self.lock = threading.Lock()
        self.fail_on = fail_on

    def __call__(self, channel, message, type):
        if channel == self.fail_on:
            raise RuntimeError("database down")
        with self.lock:
            self.sent.append((channel, message, type))

    def take(self):
        with self.lock:
            sent, self.sent = self.sent, []
        return sent


@pytest.fixture
def batcher():
    recorder = Recorder(fail_on="broken")
    b = Batcher(recorder)
    b.recorder = recorder
    yield b
    b.stop(flush=False)


def test_three_messages_in_one_window_leave_as_one(batcher):
    for i in range(3):
        batcher.add("g", "k", {"i": i}, name="moves", window=0.2)
    wait_for(lambda: batcher.recorder.sent, message="the batch")
    assert batcher.recorder.take() == [("g", {"name": "moves", "messages": [{"i": 0}, {"i": 1}, {"i": 2}]},
                                        "json")]
    assert batcher.pending() == 0


def test_identical_messages_count_once_and_keys_stay_apart(batcher):
    for _ in range(5):
        batcher.add("g", "k", {"same": [1, 2], "x": "y"}, name="n", window=0.2)
    batcher.add("g", "k", {"x": "y", "same": [1, 2]}, name="n")  # equal once key order is ignored
    batcher.add("g", "other", {"same": [1, 2], "x": "y"}, name="n")
    batcher.add("h", "k", 1, name="n")
    wait_for(lambda: len(batcher.recorder.sent) == 3, message="three batches")
    sent = {(c, json.dumps(m, sort_keys=True)) for c, m, _ in batcher.recorder.take()}
    one = {"name": "n", "messages": [{"same": [1, 2], "x": "y"}]}
    assert sent == {("g", json.dumps(one, sort_keys=True)), ("g", json.dumps(one, sort_keys=True)),
                    ("h", json.dumps({"name": "n", "messages": [1]}, sort_keys=True))}


def test_text_batches_join_lines_under_the_name(batcher):
    for line in ["a,1", "b,2", "a,1", "c,3"]:
        batcher.add("t", "k", line, name="prices", window=0.2, text=True)
    wait_for(lambda: batcher.recorder.sent, message="the text batch")
    assert batcher.recorder.take() == [("t", "prices\na,1\nb,2\nc,3", "text")]
    with pytest.raises(InvalidPayload):
        batcher.add("t", "k", {"not": "text"}, name="prices", text=True)
    batcher.add("t", "k", "x", name="p", window=30, text=True)
    with pytest.raises(InvalidPayload) as info:
        batcher.add("t", "k", "x", name="p")  # a JSON message into an open text batch
    assert "collects text messages" in str(info.value)


def test_cancel_discards_only_that_batch(batcher):
    batcher.add("g", "gone", 1, name="n", window=0.3)
    batcher.add("g", "kept", 2, name="n", window=0.3)
    assert batcher.cancel("g", "gone") is True
    assert batcher.cancel("g", "gone") is False
    wait_for(lambda: batcher.recorder.sent, message="the kept batch")
    assert batcher.recorder.take() == [("g", {"name": "n", "messages": [2]}, "json")]


def test_a_failing_publish_loses_only_its_batch(batcher, caplog):
    batcher.add("broken", "k", 1, name="n", window=0.05)
    batcher.add("g", "k", 2, name="n", window=0.1)
    wait_for(lambda: batcher.recorder.sent, message="the good batch")
    assert batcher.recorder.take() == [("g", {"name": "n", "messages": [2]}, "json")]
    assert "could not publish the batch for channel 'broken'" in caplog.text


def test_stop_flushes_pending_batches_and_ends_the_thread():
    recorder = Recorder()
    b = Batcher(recorder, thread_name="test-batcher")
    b.add("g", "k", 1, name="n", window=60)
    b.add("g", "k2", "line", name="t", window=60, text=True)
    assert any(t.name.startswith("test-batcher-") and t.daemon for t in threading.enumerate())
    assert b.stop() == 2
    assert recorder.take() == [("g", {"name": "n", "messages": [1]}, "json"), ("g", "t\nline", "text")]
    assert not any(t.name.startswith("test-batcher-") for t in threading.enumerate())
    with pytest.raises(BatcherStopped):
        b.add("g", "k", 1, name="n")


def test_bad_messages_are_refused_at_once(batcher):
    with pytest.raises(InvalidPayload):
        batcher.add("g", "k", {"x": object()}, name="n")
    with pytest.raises(InvalidPayload):
        batcher.add("g", "k", float("nan"), name="n")
    with pytest.raises(InvalidPayload):
        batcher.add("g", "k", 1, name="n", window=-1)
    assert batcher.pending() == 0


# ------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_pubsub(pg_dsn)
    yield g
    g.stop()


def test_batches_end_to_end(server):
    sub, other = Client(server), Client(server)
    try:
        sub.subscribe("b")
        other.subscribe("b")
        post(server, "/debug/batch", {"channel": "b", "key": "k", "name": "three", "window": 0.3,
                                      "messages": [{"i": 1}, {"i": 2}, {"i": 3}]})
        post(server, "/debug/batch", {"channel": "b", "key": "dup", "name": "five", "window": 0.3,
                                      "messages": [{"same": 1}] * 5})
        post(server, "/debug/batch", {"channel": "b", "key": "txt", "name": "lines", "window": 0.3,
                                      "text": True, "messages": ["x=1", "y=2", "x=1"]})
        post(server, "/debug/batch", {"channel": "b", "key": "cancel", "name": "gone", "window": 30,
                                      "messages": [{"never": 1}]})
        # requests may land in other threads of the worker, but there is one worker: one batcher
        assert post(server, "/debug/cancel", {"channel": "b", "key": "cancel"}) == {"cancelled": True}
        for client in (sub, other):
            frames = [client.recv() for _ in range(3)]
            decoded = sorted((json.loads(f) for f in frames), key=lambda f: str(f["payload"]))
            payloads = [f["payload"] for f in decoded]
            assert {"name": "three", "messages": [{"i": 1}, {"i": 2}, {"i": 3}]} in payloads
            assert {"name": "five", "messages": [{"same": 1}]} in payloads
            text = [f for f in decoded if f.get("type") == "text"]
            assert len(text) == 1 and text[0]["payload"] == "lines\nx=1\ny=2"
        post(server, "/debug/publish", {"channel": "b", "message": "marker"})
        assert sub.recv_json()["payload"] == "marker"  # the cancelled batch never came
        assert stats(server)["batches"] == 0
    finally:
        sub.close()
        other.close()


@pytest.mark.parametrize("how", ["close", "SIGTERM"])
def test_shutdown_flushes_pending_batches_before_closing_sockets(pg_dsn, how):
    g = serve_pubsub(pg_dsn)
    try:
        clients = [Client(g) for _ in range(2)]
        for c in clients:
            c.subscribe("late")
        post(g, "/debug/batch", {"channel": "late", "key": "k", "name": "pending", "window": 60,
                                 "messages": [{"i": 1}, {"i": 2}]})
        assert stats(g)["batches"] == 1  # a 60 s window: only the shutdown flush can send it
        if how == "close":
            threading.Thread(target=http_get, args=(g.url("/debug/close"),), kwargs={"timeout": 30},
                             name="test-close", daemon=True).start()
        else:
            g.proc.send_signal(signal.SIGTERM)
        for c in clients:
            assert c.recv_json()["payload"] == {"name": "pending", "messages": [{"i": 1}, {"i": 2}]}
            assert c.ws.expect_close() == (1001, "server shutdown")
        if how == "close":
            sock, head = raw_upgrade(g.port)
            assert head.startswith(b"HTTP/1.1 503")
            sock.close()
            wait_sockets(g, 0)
        else:
            assert g.proc.wait(30) == 0
    finally:
        g.stop()
