"""The publish format: one NOTIFY per message, for each message type (pure functions)."""

import base64
import json

import pytest

from pgws_sync import InvalidChannel, InvalidPayload, PayloadTooLarge
from pgws_sync.pubsub.publication import Publication, format_publication, message_body, parse_publication
from pgws_sync.pubsub.publisher import build_publication


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
