"""The hub's fan-out with real Connection objects (their queues, no sockets)."""

import json

from pgws_sync import Connection
from pgws_sync._core.hub import Hub


def drain(conn):
    items = []
    while conn.queue_depth:
        items.append(conn._queue.get_nowait())
    return items


def texts(conn):
    return [t for item in drain(conn) for t in item.texts]


def test_one_notification_is_encoded_once_and_shared():
    hub = Hub()
    a, b = Connection(["default"]), Connection(["default"])
    hub.add(a)
    hub.add(b)
    hub.fan_out([("default", '{"n": 1}')])
    item_a, item_b = drain(a), drain(b)
    assert item_a[0] is item_b[0]
    assert item_a[0].texts == ('{"n": 1}',)


def test_audiences_route_and_keep_order_with_one_item_per_poll():
    hub = Hub()
    noosa, coolum, both, nobody = (Connection(["noosa"]), Connection(["coolum"]),
                                   Connection(["noosa", "coolum", "noosa"]), Connection([]))
    for c in (noosa, coolum, both, nobody):
        hub.add(c)
    hub.fan_out([("noosa", "1"), ("coolum", "2"), ("elsewhere", "3"), ("noosa", "4")])
    assert noosa.queue_depth == 2 and both.queue_depth == 3
    assert [i.texts for i in drain(noosa)] == [("1", "4")]  # one item for the whole poll
    assert [i.texts for i in drain(both)] == [("1", "2", "4")]
    assert texts(coolum) == ["2"]
    assert texts(nobody) == []


def test_overflow_unregisters_and_asks_for_1013_without_blocking():
    hub = Hub()
    slow, fast = Connection(["default"], max_queue=2), Connection(["default"], max_queue=100)
    hub.add(slow)
    hub.add(fast)
    for i in range(5):
        hub.fan_out([("default", str(i))])
    assert len(hub) == 1 and hub.connections() == [fast]
    assert (slow.close_code, slow.close_reason) == (1013, "send queue full")
    assert texts(fast) == ["0", "1", "2", "3", "4"]


def test_broadcast_reaches_every_audience_and_remove_leaves_no_residue():
    hub = Hub()
    conns = [Connection([f"a{i % 3}", "x"]) for i in range(9)]
    for c in conns:
        hub.add(c)
    hub.broadcast(json.dumps({"event": "resync"}))
    assert all(texts(c) == ['{"event": "resync"}'] for c in conns)
    for c in conns:
        assert hub.remove(c)
        assert not hub.remove(c)
    assert len(hub) == 0 and hub.key_count() == 0


def test_the_bound_counts_frames_not_polls():
    hub = Hub()
    conn = Connection(["default"], max_queue=5)
    hub.add(conn)
    hub.fan_out([("default", str(i)) for i in range(4)])  # one item, four frames
    assert conn.queue_depth == 4
    hub.fan_out([("default", "4")])
    assert conn.queue_depth == 5 and len(hub) == 1
    hub.fan_out([("default", "5")])  # the sixth frame overflows
    assert len(hub) == 0 and (conn.close_code, conn.close_reason) == (1013, "send queue full")
    assert texts(conn) == ["0", "1", "2", "3", "4"]
