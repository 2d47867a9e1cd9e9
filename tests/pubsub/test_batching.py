"""Batching: the receiving-side Batcher on its own, then end to end under gunicorn (one and two workers)."""

import json
import signal
import threading

import pytest

from pgws_sync.pubsub.batching import Batcher
from pgws_sync.pubsub.publication import BatchField, Publication

from ..helpers import http_get, raw_upgrade, wait_for
from ..pubsub_helpers import Client, post, serve_pubsub, stats, wait_sockets


class Markers:
    """Records the close markers a Batcher sends."""

    def __init__(self):
        self.sent = []
        self.lock = threading.Lock()

    def __call__(self, channel, marker):
        with self.lock:
            self.sent.append((channel, marker.key, marker.close))

    def closes(self, first_id):
        with self.lock:
            return [s for s in self.sent if s[2] == first_id]


def item(channel, key, message, message_id, *, name="n", window=0.05, text=False):
    body = message if text else json.dumps(message, separators=(",", ":"))
    return Publication(channel, "text" if text else "json", body, None, message_id,
                       BatchField(key, name=name, window=window))


def close(channel, key, first_id):
    return Publication(channel, "json", "", None, None, BatchField(key, close=first_id))


def cancel(channel, key):
    return Publication(channel, "json", "", None, None, BatchField(key, cancel=True))


@pytest.fixture
def batcher():
    markers = Markers()
    b = Batcher(markers, grace=60.0)
    b.markers = markers
    yield b
    b.stop()


def test_items_until_the_close_marker_are_one_message_with_the_first_id(batcher):
    for i, message in enumerate([{"i": 0}, {"i": 1}, {"i": 0}, {"i": 2}]):
        batcher.item(item("g", "k", message, f"id-{i}"))
    assert batcher.pending() == 1
    assert batcher.marker(close("g", "k", "not-the-first")) is None  # an earlier batch's marker
    finished = batcher.marker(close("g", "k", "id-0"))
    assert (finished.channel, finished.id, finished.type) == ("g", "id-0", "json")
    assert json.loads(finished.body) == {"name": "n", "messages": [{"i": 0}, {"i": 1}, {"i": 2}]}
    assert batcher.pending() == 0 and batcher.marker(close("g", "k", "id-0")) is None


def test_identical_messages_count_once_whatever_their_key_order(batcher):
    batcher.item(item("g", "k", {"same": [1, 2], "x": "y"}, "a"))
    batcher.item(Publication("g", "json", '{"x": "y", "same": [1, 2]}', None, "b",
                             BatchField("k", name="n", window=0.05)))
    batcher.item(item("g", "other", {"same": [1, 2], "x": "y"}, "c"))
    assert json.loads(batcher.marker(close("g", "k", "a")).body)["messages"] == [{"same": [1, 2], "x": "y"}]
    assert batcher.pending() == 1  # other keys stay apart


def test_text_batches_are_the_name_a_blank_line_then_one_message_per_line(batcher):
    for i, line in enumerate(["a,1", "b,2", "a,1", "c,3"]):
        batcher.item(item("t", "k", line, f"t{i}", name="prices", text=True))
    batcher.item(item("t", "k", {"json": "dropped"}, "j"))  # the open batch collects text
    finished = batcher.marker(close("t", "k", "t0"))
    assert (finished.type, finished.body) == ("text", "prices\n\na,1\nb,2\nc,3")


def test_a_cancel_marker_discards_only_that_batch(batcher):
    batcher.item(item("g", "gone", 1, "g1"))
    batcher.item(item("g", "kept", 2, "k1"))
    assert batcher.kind("g", "gone") == "json"
    assert batcher.marker(cancel("g", "gone")) is None
    assert batcher.kind("g", "gone") is None and batcher.pending() == 1


def test_the_publishing_worker_sends_the_close_marker_after_the_window(batcher):
    batcher.published("mine")
    batcher.item(item("g", "a", 1, "mine", window=0.05))
    batcher.item(item("g", "b", 1, "theirs", window=0.05))  # published by another worker
    wait_for(lambda: batcher.markers.closes("mine"), message="the close marker")
    assert batcher.markers.sent[0] == ("g", "a", "mine")
    assert not batcher.markers.closes("theirs")  # others wait window + grace (60 s here)


def test_a_marker_that_never_comes_back_is_sent_again():
    markers = Markers()
    b = Batcher(markers, grace=0.05)
    try:
        b.published("x")
        b.item(item("g", "k", 1, "x", window=0.01))
        wait_for(lambda: len(markers.closes("x")) >= 2, message="the marker sent again")
    finally:
        b.stop()


def test_stop_finishes_every_open_batch_and_ends_the_thread():
    b = Batcher(Markers(), grace=60.0, thread_name="test-batcher")
    b.item(item("g", "k", 1, "j1", window=60))
    b.item(item("g", "k2", "line", "t1", name="t", window=60, text=True))
    assert any(t.name.startswith("test-batcher-") and t.daemon for t in threading.enumerate())
    finished = b.stop()
    assert [(f.id, f.type, f.body) for f in finished] == [
        ("j1", "json", '{"name":"n","messages":[1]}'), ("t1", "text", "t\n\nline")]
    assert b.stopped and b.pending() == 0
    assert not any(t.name.startswith("test-batcher-") for t in threading.enumerate())
    b.item(item("g", "k", 1, "late"))  # after stop, nothing opens
    assert b.pending() == 0


# ------------------------------------------------------------ end to end


# The module's shared servers publish on NOTIFY channels of their own: the tests that start a
# server of their own leave batches with a 60 s window open, and every server on the same
# channel would hold them open too (its workers close a batch a grace after its window).


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_pubsub(pg_dsn, {"pubsub_channel": "pgws_sync_batching_one"})
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
        wait_for(lambda: stats(server)["batches"] == 4, message="four open batches")
        assert post(server, "/debug/cancel", {"channel": "b", "key": "cancel"})["cancelled"] is True
        for client in (sub, other):
            frames = [client.recv() for _ in range(3)]
            decoded = sorted((json.loads(f) for f in frames), key=lambda f: str(f["payload"]))
            payloads = [f["payload"] for f in decoded]
            assert {"name": "three", "messages": [{"i": 1}, {"i": 2}, {"i": 3}]} in payloads
            assert {"name": "five", "messages": [{"same": 1}]} in payloads
            text = [f for f in decoded if f.get("type") == "text"]
            assert len(text) == 1 and text[0]["payload"] == "lines\n\nx=1\ny=2"
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
        settle(g, clients, "late")  # both items are in the open batch now
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


def settle(server, clients, channel):
    """Publish a message after what was sent so far and read it on every client: every
    worker has then handled everything published before it (commit order)."""
    post(server, "/debug/publish", {"channel": channel, "message": "settle"})
    for c in clients:
        assert c.recv_json()["payload"] == "settle"


# ------------------------------------------------------------ two workers


def clients_in_every_worker(server, workers=2, most=40):
    """Clients until every worker holds at least one; returns them all."""
    clients = []
    while len({c.pid for c in clients}) < workers:
        assert len(clients) < most, "gunicorn gave every socket to the same worker"
        c = Client(server)
        c.subscribe("ticks")
        clients.append(c)
    return clients


def post_until_every_worker(server, path, bodies, workers=2):
    """POST each body in turn until requests have reached every worker; returns the pids seen."""
    pids = set()
    for body in bodies:
        pids.add(post(server, path, body)["pid"])
        if len(pids) == workers:
            return pids
    raise AssertionError("every request went to the same worker")


@pytest.fixture(scope="module")
def two_workers(pg_dsn):
    g = serve_pubsub(pg_dsn, {"pubsub_channel": "pgws_sync_batching_two"}, workers=2)
    yield g
    g.stop()


def test_a_batch_is_one_message_whichever_workers_publish_into_it(two_workers):
    clients = clients_in_every_worker(two_workers)
    try:
        bodies = ({"channel": "ticks", "key": "ACME", "name": "prices", "window": 2.0,
                   "messages": [{"p": i}]} for i in range(60))
        post_until_every_worker(two_workers, "/debug/batch", bodies)
        frames = [c.ws.recv_json() for c in clients]
        ids = {f["id"] for f in frames}
        messages = [f["payload"]["messages"] for f in frames]
        assert len(ids) == 1  # the same message, with the same id, in every worker
        assert all(m == messages[0] for m in messages) and len(messages[0]) >= 2
        post(two_workers, "/debug/publish", {"channel": "ticks", "message": "after"})
        for c in clients:  # no second part of the batch came before this
            assert c.ws.recv_json()["payload"] == "after"
    finally:
        for c in clients:
            c.close()


def test_cancel_batch_cancels_in_every_worker(two_workers):
    clients = clients_in_every_worker(two_workers)
    try:
        pids = set()
        for i in range(60):  # open the batch from one worker, cancel it from the other
            opened = post(two_workers, "/debug/batch", {"channel": "ticks", "key": "gone",
                                                        "name": "n", "window": 30,
                                                        "messages": [{"i": i}]})
            wait_for(lambda: all(s["batches"] for s in worker_stats(two_workers)),
                     message="the batch open in both workers")
            cancelled = post(two_workers, "/debug/cancel", {"channel": "ticks", "key": "gone"})
            pids = {opened["pid"], cancelled["pid"]}
            if len(pids) == 2:
                break
        assert len(pids) == 2, "every request went to the same worker"
        wait_for(lambda: not any(s["batches"] for s in worker_stats(two_workers)),
                 message="the batch gone from both workers")
        post(two_workers, "/debug/publish", {"channel": "ticks", "message": "marker"})
        for c in clients:
            assert c.ws.recv_json()["payload"] == "marker"  # the cancelled batch never came
    finally:
        for c in clients:
            c.close()


def worker_stats(server, workers=2, most=50):
    """The /debug/stats of every worker (asking until each has answered)."""
    seen = {}
    for _ in range(most):
        s = stats(server)
        seen[s["pid"]] = s
        if len(seen) == workers:
            return list(seen.values())
    raise AssertionError("every request went to the same worker")


def test_sigterm_hands_the_batch_to_the_sockets_of_every_worker_before_1001(pg_dsn):
    g = serve_pubsub(pg_dsn, workers=2)
    try:
        clients = clients_in_every_worker(g)
        post(g, "/debug/batch", {"channel": "ticks", "key": "k", "name": "pending", "window": 60,
                                 "messages": [{"i": 1}, {"i": 2}]})
        settle(g, clients, "ticks")
        assert all(s["batches"] == 1 for s in worker_stats(g))
        g.proc.send_signal(signal.SIGTERM)
        for c in clients:
            frame = c.ws.recv_json()
            assert frame["payload"] == {"name": "pending", "messages": [{"i": 1}, {"i": 2}]}
            assert c.ws.expect_close() == (1001, "server shutdown")
        assert g.proc.wait(30) == 0
    finally:
        g.stop()
