"""The rules every product shares: names, sizes, strict JSON and control frames."""

import json
import random

import pytest

from pgws_sync import InvalidChannel, InvalidPayload, PayloadTooLarge, PgwsError
from pgws_sync._formats import (
    check_notify_size,
    envelope,
    error_frame,
    gap_frame,
    json_fields,
    name_problem,
    parse_ping,
    pong_frame,
    resync_frame,
    validate_channel,
)


@pytest.mark.parametrize("name", ["pgws", "MixedCase", "with-dash", "with space", 'quo"te', "x" * 63,
                                  "\u00e9" * 31])
def test_valid_names_are_kept_as_written(name):
    assert validate_channel(name) == name


@pytest.mark.parametrize("name,why", [
    ("", "empty"),
    ("x" * 64, "64 bytes"),
    ("\u00e9" * 32, "64 bytes"),
    ("a\x00b", "NUL"),
    (None, "string"),
    (42, "string"),
])
def test_invalid_names_are_refused_with_a_reason(name, why):
    with pytest.raises(InvalidChannel) as info:
        validate_channel(name)
    assert isinstance(info.value, PgwsError) and isinstance(info.value, ValueError)
    assert why in str(info.value)


def test_a_lone_surrogate_is_a_clear_invalid_channel():
    with pytest.raises(InvalidChannel, match="encodable as UTF-8"):
        validate_channel("bad\ud800")


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


# ------------------------------------------------------------ names and sizes


@pytest.mark.parametrize("name, problem", [
    (None, "must be a string"),
    ("", "cannot be empty"),
    ("x" * 201, "201 characters, at most 200"),
    ("tab\there", "control characters"),
    ("nul\x00", "control characters"),
    ("del\x7f", "control characters"),
    ("lone \ud800", "lone surrogate"),
])
def test_client_names_are_checked_once_for_every_product(name, problem):
    assert problem in name_problem(name)


def test_names_within_the_limits_pass():
    assert name_problem("x" * 200) is None
    assert name_problem("\u00e9 with spaces/and:colons") is None
    assert name_problem("a\tb", controls=True) is None
    assert "NUL" in name_problem("a\x00b", controls=True)
    assert "64 bytes" in name_problem("\u00e9" * 32, max_chars=None, max_bytes=63)


def test_notify_size_is_counted_in_utf8_bytes():
    assert check_notify_size("x" * 7999) == "x" * 7999
    with pytest.raises(PayloadTooLarge) as info:
        check_notify_size("\u00e9" * 4000, "chan")
    assert info.value.size == 8000 and info.value.channel == "chan"
    with pytest.raises(InvalidPayload, match="lone surrogate"):
        check_notify_size("bad \udc80")


# ------------------------------------------------------------ control frames


def test_control_frames_have_one_builder_and_two_spellings():
    assert error_frame("no", reply_to=1) == '{"event": "error", "error": "no", "reply_to": 1}'
    assert error_frame("no", compact=True, room="r") == '{"event":"error","error":"no","room":"r"}'
    assert error_frame("no", reply_to=None) == '{"event": "error", "error": "no"}'
    assert json.loads(resync_frame(["a", "\u00e9"], "why")) == \
        {"event": "resync", "channels": ["a", "\u00e9"], "reason": "why"}
    assert json.loads(gap_frame("g", 3)) == {"event": "gap", "channel": "g", "missed": 3}


@pytest.mark.parametrize("text, ident", [
    ('{"action": "ping", "id": "hb-1"}', "hb-1"),
    ('{"id": 7, "action":"ping"}', 7),
    ('{"action": "ping"}', None),  # no id
    ('{"action": "ping", "id": "x", "channel": "c"}', None),  # not exactly a ping
    ('{"action": "ping", "id": true}', None),
    ('{"action": "ping", "id": "%s"}' % ("x" * 201), None),
    ('{"action": "pong", "id": "ping"}', None),
    ('["ping"]', None),
    ('not json "ping"', None),
])
def test_parse_ping_takes_exactly_a_ping(text: str, ident: object) -> None:
    assert parse_ping(text) == ident


def test_pong_and_envelope_frames() -> None:
    assert pong_frame("hb-1") == '{"event":"pong","reply_to":"hb-1"}'
    assert pong_frame(7) == '{"event":"pong","reply_to":7}'
    frame = '{"channel": "c", "payload": {"n": 123456789012345678901}, "id": "x"}'
    assert envelope(frame) == '{"message":' + frame + "}"  # verbatim, big numbers included
    assert json.loads(envelope("not json", json_text=False)) == {"text": "not json"}
    assert json.loads(envelope('{"é": "\u2028"}', json_text=False)) == {"text": '{"é": "\u2028"}'}
