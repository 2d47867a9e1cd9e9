"""Pure tests of the pgws payload format and the frames built from it."""

import json
import random
import uuid

import pytest

from pgws_sync import InvalidPayload, PayloadTooLarge, PgwsError
from pgws_sync._formats import NOTIFY_PAYLOAD_LIMIT, new_message_id, resync_frame
from pgws_sync.pgws.messages import format_pgws, parse_pgws
from pgws_sync.pgws.messages import pgws_frame as message_frame


def test_parse_splits_at_first_separator_and_keeps_body_verbatim():
    body = '{"b": 1,  "a": [1.50, 12345678901234567890123], "é": "\\u00e9 ☃"}'
    assert parse_pgws("noosa," + body) == ("noosa", body)
    assert parse_pgws('a,b,{"x": {"y": 1}}') == ("a,b", '{"x": {"y": 1}}')
    assert parse_pgws(',{"x":1}') == ("", '{"x":1}')


@pytest.mark.parametrize("payload", [
    "no separator at all",
    '{"x": 1}',                      # no audience separator before the object
    "default,{not json}",
    'default,{"x": 1} trailing',     # junk after the object
    'default,{"x": 1}{"y": 2}',
    'default,{"x": NaN}',            # not JSON, though Python would accept it
    'default,{"x": 1',
    "",
])
def test_parse_rejects_with_invalid_payload(payload):
    with pytest.raises(InvalidPayload) as info:
        parse_pgws(payload)
    assert isinstance(info.value, PgwsError)


def test_parse_allows_trailing_whitespace():
    assert parse_pgws('d,{"x": 1}\n ') == ("d", '{"x": 1}\n ')


def test_parse_never_raises_anything_else_on_random_input():
    rng = random.Random(1234)
    alphabet = 'ab,{}[]":\\ 0123456789.-eE\u00e9\u2603\x00\ttrue'
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            audience, body = parse_pgws(text)
        except InvalidPayload:
            continue
        assert isinstance(json.loads(body), dict)
        assert text == f"{audience},{body}"


def test_message_frame_embeds_body_exactly():
    body = '{"z": 1, "a": 123456789012345678901234567890, "s": "\u2603"}'
    frame = message_frame('we"ird', body, "id-1")
    assert frame == ('{"payload": ' + body + ', "channel": "we\\"ird", "id": "id-1"}')
    decoded = json.loads(frame)
    assert list(decoded) == ["payload", "channel", "id"]
    assert decoded["payload"]["a"] == 123456789012345678901234567890
    assert list(decoded["payload"]) == ["z", "a", "s"]


def test_message_ids_are_uuid4():
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_resync_frame_has_no_payload():
    frame = json.loads(resync_frame(["a", "B"], "listener reconnected"))
    assert frame == {"event": "resync", "channels": ["a", "B"], "reason": "listener reconnected"}


def test_format_checks_the_8000_byte_limit_in_utf8_bytes():
    prefix = 'default,{"p":"'
    room = NOTIFY_PAYLOAD_LIMIT - 1 - len(prefix) - 2
    ok = format_pgws("default", '{"p":"' + "x" * room + '"}')
    assert len(ok.encode()) == NOTIFY_PAYLOAD_LIMIT - 1
    with pytest.raises(PayloadTooLarge) as info:
        format_pgws("default", '{"p":"' + "x" * (room + 1) + '"}', channel="c")
    assert info.value.size == NOTIFY_PAYLOAD_LIMIT
    assert "7999" in str(info.value) and "'c'" in str(info.value)
    # characters are not bytes: 3000 snowmen are 9000 bytes
    with pytest.raises(PayloadTooLarge):
        format_pgws("default", '{"p":"' + "\u2603" * 3000 + '"}')


def test_format_rejects_bad_audience_and_body():
    with pytest.raises(InvalidPayload):
        format_pgws("a,{b", '{"x": 1}')
    with pytest.raises(InvalidPayload):
        format_pgws("a", "[1, 2]")
