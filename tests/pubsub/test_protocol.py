"""The pub/sub client protocol and the internal publish format, as pure functions."""

import base64
import json
import random

import pytest

from pgws_sync import InvalidChannel, InvalidPayload, PayloadTooLarge, PgwsError, ProtocolError
from pgws_sync._formats import error_frame, gap_frame, json_fields
from pgws_sync._formats import message_frame as json_message_frame
from pgws_sync.pubsub.protocol import (
    Action,
    check_channel,
    parse_action,
    reply_frame,
    text_message_frame,
)
from pgws_sync.pubsub.publication import Publication, format_publication, message_body, parse_publication
from pgws_sync.pubsub.publisher import build_publication


# ------------------------------------------------------------ json_fields


def test_json_fields_keep_each_value_as_written():
    text = ' { "a" : {"z": 1,  "b": [1, 2.50, 1e3]} , "n": 123456789012345678901234567890,"s":"\\u00e9"}  '
    fields = json_fields(text)
    assert fields["a"] == ({"z": 1, "b": [1, 2.5, 1000.0]}, '{"z": 1,  "b": [1, 2.50, 1e3]}')
    assert fields["n"][1] == "123456789012345678901234567890"
    assert fields["s"] == ("\u00e9", '"\\u00e9"')
    assert json_fields("{}") == {}
    assert json_fields('{"a": 1, "a": 2}')["a"] == (2, "2")


@pytest.mark.parametrize("bad", [
    "", "[]", '"x"', "{", '{"a"}', '{"a": }', '{"a": 1,}', '{"a": 1} x', '{a: 1}',
    '{"a": NaN}', '{"a": 1 "b": 2}', "{" * 100000,
])
def test_json_fields_refuse_anything_but_one_object(bad):
    with pytest.raises(ValueError):
        json_fields(bad)


def test_json_fields_agree_with_json_loads_on_random_objects():
    rng = random.Random(4)

    def value(depth):
        kinds = [lambda: None, lambda: rng.random() * 1e6, lambda: rng.randrange(-10**20, 10**20),
                 lambda: "s\u2603\n\"" * rng.randrange(3), lambda: True,
                 lambda: [value(depth + 1) for _ in range(rng.randrange(3))],
                 lambda: {str(i): value(depth + 1) for i in range(rng.randrange(3))}]
        return kinds[rng.randrange(7 if depth < 3 else 5)]()

    for _ in range(300):
        obj = {f"k{i}": value(0) for i in range(rng.randrange(5))}
        text = json.dumps(obj, indent=rng.choice([None, 1]), separators=rng.choice([None, (",", ":")]))
        fields = json_fields(text)
        assert {k: v for k, (v, _) in fields.items()} == obj
        assert all(json.loads(raw) == v for v, raw in fields.values())


# ------------------------------------------------------------ client actions


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


# ------------------------------------------------------------ internal publish format


@pytest.mark.parametrize("message, kind", [
    ({"b": 1, "a": [1, 2], "u": "\u2603"}, "json"),
    ([1, "two", None], "json"),
    ("a JSON string", "json"),
    (42, "json"),
    ("plain text\nwith \"quotes\" and \u00e9", "text"),
    (bytes(range(256)), "binary"),
    (b"", "binary"),
])
def test_publications_round_trip(message, kind):
    text = format_publication("g", message_body(message, kind), type=kind, message_id="i1")
    pub = parse_publication(text)
    assert pub.channel == "g" and pub.type == kind and pub.id == "i1" and pub.target is None
    if kind == "json":
        assert json.loads(pub.body) == message
    else:
        assert pub.body == message


def test_targeted_publication_and_sql_built_one():
    pub = parse_publication(build_publication(None, {"hi": 1}, to="conn-1"))
    assert pub.channel is None and pub.target == "conn-1" and json.loads(pub.body) == {"hi": 1}
    assert pub.id  # a fresh id, shared by every process that reads this NOTIFY
    # what json_build_object(...)::text produces: spaces around colons, any key order
    sql_text = '{"payload" : {"x" : 1.50}, "channel" : "g", "type" : "json"}'
    assert parse_publication(sql_text) == Publication("g", "json", '{"x" : 1.50}', None, None)
    binary = '{"channel": "g", "type": "binary", "payload": "%s"}' % base64.b64encode(b"\x00\xff").decode()
    assert parse_publication(binary).body == b"\x00\xff"


@pytest.mark.parametrize("payload, reason", [
    ("not json", "not a JSON object"),
    ('{"payload": 1}', "no 'channel' (or 'to') field"),
    ('{"channel": "g"}', "no 'payload' field"),
    ('{"channel": 1, "payload": 1}', "'channel' must be a string"),
    ('{"channel": "", "payload": 1}', "invalid channel name"),
    ('{"channel": "g", "type": "xml", "payload": 1}', "unknown message type 'xml'"),
    ('{"channel": "g", "type": "text", "payload": 1}', "payload must be a string"),
    ('{"channel": "g", "type": "binary", "payload": "not base64!"}', "not valid base64"),
    ('{"channel": "g", "type": "binary", "payload": 5}', "must be base64 text"),
])
def test_bad_publications_are_refused_with_a_reason(payload, reason):
    with pytest.raises(InvalidPayload) as info:
        parse_publication(payload)
    assert reason in str(info.value)


def test_publication_limits_and_bad_input():
    # 7,000 characters fit, 8,000 bytes do not (UTF-8 bytes, not characters)
    format_publication("g", message_body("x" * 7000, "text"), type="text")
    with pytest.raises(PayloadTooLarge) as info:
        format_publication("g", message_body("\u00e9" * 4000, "text"), type="text")
    assert info.value.size >= 8000 and info.value.channel == "g"
    assert "at most 7999" in str(info.value)
    with pytest.raises(PayloadTooLarge):  # base64 makes binary a third larger
        format_publication("g", message_body(b"x" * 6000, "binary"), type="binary")
    format_publication("g", message_body(b"x" * 5800, "binary"), type="binary")
    with pytest.raises(InvalidChannel):
        format_publication("", "1")
    with pytest.raises(InvalidPayload):
        format_publication(None, "1")
    with pytest.raises(InvalidPayload):
        format_publication("g", "{broken")
    with pytest.raises(InvalidPayload):
        message_body({"x": float("nan")}, "json")
    with pytest.raises(InvalidPayload):
        message_body({"x": object()}, "json")
    with pytest.raises(InvalidPayload):
        message_body(b"bytes", "text")
    with pytest.raises(InvalidPayload):
        message_body("text", "binary")
    with pytest.raises(InvalidPayload):
        message_body("x", "yaml")
