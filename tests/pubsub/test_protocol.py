"""The pub/sub client protocol, as pure functions."""

import json

import pytest

from pgws_sync import PgwsError, ProtocolError
from pgws_sync._formats import error_frame, gap_frame
from pgws_sync._formats import message_frame as json_message_frame
from pgws_sync.pubsub.protocol import (
    Action,
    check_channel,
    parse_action,
    reply_frame,
    text_message_frame,
)


def test_subscribe_unsubscribe_publish_actions():
    assert parse_action('{"action":"subscribe","channel":"g","id":"m1"}') == Action("subscribe", "g", "m1")
    assert parse_action('{"action": "unsubscribe", "channel": "g", "id": 7}') == \
        Action("unsubscribe", "g", 7)
    publish = parse_action('{"action":"publish","channel":"g","payload": {"b": 1,  "a": 2},"id":"m3"}')
    assert publish.payload == '{"b": 1,  "a": 2}' and publish.id == "m3"
    assert parse_action('{"action":"publish","channel":"g","payload":null}').payload == "null"
    sub = parse_action('{"action":"subscribe","channel":"g","backpressure":"drop"}')
    assert sub.backpressure == "drop" and sub.id is None


@pytest.mark.parametrize("frame, reason, reply_to", [
    ("not json", "invalid JSON", None),
    ("[1, 2]", "invalid JSON: not a JSON object", None),
    (b'{"action": "subscribe"}', "binary frames are not understood", None),
    ('{"channel": "g", "id": "m1"}', "missing field 'action'", "m1"),
    ('{"action": "dance", "channel": "g", "id": "m2"}', "unknown action 'dance'", "m2"),
    ('{"action": "subscribe", "id": "m3"}', "missing field 'channel'", "m3"),
    ('{"action": "publish", "channel": "g", "id": "m4"}', "missing field 'payload'", "m4"),
    ('{"action": "subscribe", "channel": "", "id": "m5"}', "invalid channel name: it cannot be empty", "m5"),
    ('{"action": "subscribe", "channel": 5, "id": "m6"}', "invalid channel name: it must be a string", "m6"),
    ('{"action": "subscribe", "channel": "a\\nb", "id": "m7"}', "control characters", "m7"),
    ('{"action": "subscribe", "channel": "' + "x" * 201 + '", "id": 8}', "at most 200", 8),
    ('{"action": "subscribe", "channel": "g", "backpressure": "maybe", "id": 9}', "'backpressure'", 9),
    ('{"action": "subscribe", "channel": "g", "id": {"x": 1}}', "'id' must be a string or a number", None),
    ('{"action": "subscribe", "channel": "g", "id": "' + "i" * 201 + '"}', "'id' is longer", None),
])
def test_bad_actions_name_the_problem(frame, reason, reply_to):
    with pytest.raises(ProtocolError) as info:
        parse_action(frame)
    assert reason in info.value.reason
    assert info.value.reply_to == reply_to
    assert isinstance(info.value, PgwsError)


def test_topic_names():
    assert check_channel("g") == "g"
    assert check_channel("\u00e9 with spaces/and:colons") == "\u00e9 with spaces/and:colons"
    for bad in ("", None, "x" * 201, "tab\there", "del\x7f"):
        with pytest.raises(ProtocolError):
            check_channel(bad)


# ------------------------------------------------------------ frames


def test_reply_and_event_frames():
    assert json.loads(reply_frame("subscribed", "g", "m1")) == \
        {"event": "subscribed", "channel": "g", "reply_to": "m1"}
    assert json.loads(reply_frame("unsubscribed", "g")) == {"event": "unsubscribed", "channel": "g"}
    assert json.loads(reply_frame("published", "g", "m3", id="x")) == \
        {"event": "published", "channel": "g", "id": "x", "reply_to": "m3"}
    assert json.loads(error_frame("nope", reply_to=4)) == {"event": "error", "error": "nope", "reply_to": 4}
    assert json.loads(error_frame("nope")) == {"event": "error", "error": "nope"}
    assert json.loads(gap_frame("g", 12)) == {"event": "gap", "channel": "g", "missed": 12}


def test_message_frames_keep_json_payload_verbatim():
    body = '{"z": 1,  "a": 123456789012345678901234567890}'
    frame = json_message_frame("g\u00e9", body, "id-1")
    assert body in frame
    assert json.loads(frame) == {"channel": "g\u00e9", "payload": json.loads(body), "id": "id-1"}
    assert list(json.loads(frame)) == ["channel", "payload", "id"]
    assert json.loads(json_message_frame(None, "[1]", "id-2")) == {"payload": [1], "id": "id-2"}
    assert json.loads(text_message_frame("g", "line\n\"two\"", "id-3")) == \
        {"channel": "g", "type": "text", "payload": "line\n\"two\"", "id": "id-3"}


def test_since_and_epoch_are_read_only_for_durable_endpoints():
    frame = '{"action": "subscribe", "channel": "g", "since": 4, "epoch": "e", "id": 1}'
    assert parse_action(frame) == Action("subscribe", "g", 1)  # ignored, as any unknown field
    assert parse_action(frame, durable=True) == Action("subscribe", "g", 1, since=4, epoch="e")
    assert parse_action('{"action": "subscribe", "channel": "g", "since": -1}').since is None
    with pytest.raises(ProtocolError, match="invalid 'since'"):
        parse_action('{"action": "subscribe", "channel": "g", "since": -1}', durable=True)
