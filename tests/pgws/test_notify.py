"""notify(): the sending side, inside the caller's transaction, against a real listener."""

import psycopg2
import pytest

from pgws_sync import InvalidChannel, InvalidPayload, Listener, PayloadTooLarge, PgwsError, notify

from ..helpers import Recorder, wait_for


@pytest.fixture
def received(pg_dsn, channel):
    listener = Listener(pg_dsn, min_reconnect=0.05, max_reconnect=0.5)
    sink = Recorder()
    listener.add_sink(sink, [channel])
    assert listener.wait_connected(10)
    yield sink
    listener.stop()


def test_dict_and_text_payloads(sender, channel, received):
    notify(sender, channel, {"message": "hello", "n": 1, "u": "\u2603"})
    notify(sender, channel, ' {"b": 2,  "a": 12345678901234567890123}\n', audience="noosa",
           json_text=True)
    wait_for(lambda: len(received.payloads()) == 2, message="two notifications")
    assert received.payloads() == [
        'default,{"message":"hello","n":1,"u":"\u2603"}',
        'noosa,{"b": 2,  "a": 12345678901234567890123}',
    ]


def test_sent_at_commit_and_never_on_rollback(pg_dsn, sender, channel, received):
    conn = psycopg2.connect(pg_dsn)
    try:
        notify(conn, channel, {"step": "rolled back"})
        conn.rollback()
        notify(conn, channel, {"step": "committed"})  # a new transaction, still open
        notify(sender, channel, {"step": "autocommit"})
        wait_for(lambda: received.payloads(), message="the autocommit notification")
        assert received.payloads() == ['default,{"step":"autocommit"}']
        conn.commit()
        wait_for(lambda: len(received.payloads()) == 2, message="the committed one")
        assert received.payloads()[1] == 'default,{"step":"committed"}'
    finally:
        conn.close()


def test_refusals_happen_before_anything_is_sent(sender, channel, received):
    with pytest.raises(PayloadTooLarge) as info:
        notify(sender, channel, {"pad": "x" * 8000})
    assert isinstance(info.value, PgwsError) and info.value.limit == 8000
    with pytest.raises(PayloadTooLarge):  # 2,720 characters, but 8,120 UTF-8 bytes
        notify(sender, channel, '{"pad": "' + "\u2603" * 2700 + '"}', json_text=True)
    with pytest.raises(InvalidPayload):
        notify(sender, channel, "[1, 2, 3]", json_text=True)
    with pytest.raises(InvalidPayload):
        notify(sender, channel, {"a": 1}, audience="x,{y")
    with pytest.raises(InvalidPayload):
        notify(sender, channel, 42)
    with pytest.raises(InvalidChannel):
        notify(sender, "", {"a": 1})
    biggest = '{"pad": "' + "x" * (7999 - len('default,{"pad": ""}')) + '"}'
    notify(sender, channel, biggest, json_text=True)  # exactly 7999 bytes: accepted by PostgreSQL
    wait_for(lambda: received.payloads(), message="the largest allowed payload")
    assert received.payloads() == ["default," + biggest]
    assert len(received.payloads()[0].encode()) == 7999
