"""The push protocol, pure: backend messages, room requests and frames."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws_sync import InvalidPayload, ProtocolError
from pgws_sync.push.endpoint import parse_tab_stream
from pgws_sync.push.messages import (
    AuthEvent,
    RoomRequest,
    ToRoom,
    ToUser,
    auth_event_signed,
    format_backend_message,
    parse_backend_message,
    parse_room_request,
    room_error_frame,
    room_frame,
    sign_auth_event,
    tab_window_frame,
)


def test_push_to_user_keeps_the_payload_text_byte_for_byte():
    text = '{"pushToUser": "u1", "payload": {"b": 1.50, "a": [1, 2],  "é": "\\u00e9"}}'
    assert parse_backend_message(text) == ToUser(
        "u1", '{"b": 1.50, "a": [1, 2],  "é": "\\u00e9"}', None)


def test_push_to_one_tab_window():
    text = json.dumps({"pushToUser": "u1", "tabWindowId": "t1", "payload": "hi"})
    assert parse_backend_message(text) == ToUser("u1", '"hi"', "t1")


def test_push_to_room_with_any_json_payload():
    for payload in ("null", "0", "[]", '"x"', '{"deep": {"er": [true]}}'):
        text = '{"pushToRoom": "r1", "payload": ' + payload + "}"
        assert parse_backend_message(text) == ToRoom("r1", payload)


def test_auth_event():
    assert parse_backend_message('{"guestId": "g", "authUserId": "u"}') == AuthEvent("g", "u")


KEY = "a key of at least 16 characters"


def test_an_auth_event_is_signed_for_its_guest_user_and_key_only():
    sig = sign_auth_event(KEY, "g", "u")
    assert auth_event_signed(KEY, AuthEvent("g", "u", sig))
    assert auth_event_signed(KEY.encode(), AuthEvent("g", "u", sig))
    for event in (AuthEvent("g", "u"), AuthEvent("g", "v", sig), AuthEvent("h", "u", sig),
                  AuthEvent("g", "u", sig.upper()), AuthEvent("g\x00u", "", sig)):
        assert not auth_event_signed(KEY, event), event
    assert not auth_event_signed("another key, 16+ long", AuthEvent("g", "u", sig))


@given(sig=st.text(max_size=80))
def test_fuzz_any_forged_sig_is_refused_never_raises(sig):
    """Whatever text a forger puts in ``sig`` (not ASCII included), the check says no."""
    event = parse_backend_message(json.dumps({"guestId": "g", "authUserId": "u", "sig": sig}))
    assert auth_event_signed(KEY, event) == (sig == sign_auth_event(KEY, "g", "u"))


@pytest.mark.parametrize("text, problem", [
    ("not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"pushToUser": "u1"}', "without 'payload'"),
    ('{"pushToRoom": "r1"}', "without 'payload'"),
    ('{"payload": 1}', "exactly one of"),
    ('{"pushToUser": "u", "pushToRoom": "r", "payload": 1}', "exactly one of"),
    ('{"pushToUser": 5, "payload": 1}', "'pushToUser' is not a valid name"),
    ('{"pushToUser": "", "payload": 1}', "'pushToUser' is not a valid name"),
    ('{"pushToRoom": null, "payload": 1}', "'pushToRoom' is not a valid name"),
    ('{"pushToUser": "u", "tabWindowId": 7, "payload": 1}', "'tabWindowId' is not a valid"),
    ('{"guestId": "g"}', "without 'authUserId'"),
    ('{"guestId": "g", "authUserId": ["u"]}', "'authUserId' is not a valid name"),
    ('{"pushToRoom": "r", "payload": NaN}', "not a JSON object"),
    ('{"pushToRoom": "r", "payload": 1} trailing', "not a JSON object"),
])
def test_malformed_backend_messages_name_the_problem(text, problem):
    with pytest.raises(InvalidPayload) as info:
        parse_backend_message(text)
    assert problem in str(info.value)


@pytest.mark.parametrize("message", [
    ToUser("u1", '{"a": 1}'),
    ToUser("ü", "[1,2]", "tab-1"),
    ToRoom("r1", '"x"'),
    AuthEvent("g", "u"),
])
def test_format_round_trips(message):
    assert parse_backend_message(format_backend_message(message)) == message


def test_format_refuses_a_payload_that_is_not_json():
    with pytest.raises(InvalidPayload):
        format_backend_message(ToRoom("r", "{oops"))


def test_room_requests():
    assert parse_room_request('{"joinRoom": "r1"}') == RoomRequest(True, "r1")
    assert parse_room_request('{"leaveRoom":"r 2"}') == RoomRequest(False, "r 2")
    # anything else is left to the pub/sub protocol
    for other in ('{"action": "subscribe", "channel": "joinRoom"}', "joinRoom", b'{"joinRoom":1}',
                  '{"action": "publish", "channel": "c", "payload": {"leaveRoom": "x"}}'):
        assert parse_room_request(other) is None, other


@pytest.mark.parametrize("text, problem", [
    ('{"joinRoom": 5}', "invalid room name: it must be a string"),
    ('{"joinRoom": ""}', "invalid room name: it cannot be empty"),
    ('{"leaveRoom": "' + "x" * 201 + '"}', "201 characters"),
    ('{"joinRoom": "a", "leaveRoom": "b"}', "not both"),
])
def test_bad_room_requests(text, problem):
    with pytest.raises(ProtocolError) as info:
        parse_room_request(text)
    assert problem in info.value.reason


def test_frames():
    assert json.loads(tab_window_frame("t")) == {"tabWindowId": "t"}
    assert json.loads(room_frame(RoomRequest(True, "r"))) == {"event": "joined", "room": "r"}
    assert json.loads(room_frame(RoomRequest(False, "r"))) == {"event": "left", "room": "r"}
    assert json.loads(room_error_frame("no", "r")) == {"event": "error", "error": "no", "room": "r"}
    assert json.loads(room_error_frame("bad")) == {"event": "error", "error": "bad"}


@pytest.mark.parametrize("channel, parsed", [
    ("pgws:tab:bob:Xy_9-z", ("bob", "Xy_9-z")),
    ("pgws:tab:a:b:tok", ("a:b", "tok")),   # user ids may hold ':'; tab ids never do
    ("pgws:tab:a:", None),
    ("pgws:tab::tok", None),
    ("pgws:tab:tok", None),
    ("pgws:user:bob", None),
    ("room", None),
])
def test_tab_streams_parse_into_user_and_tab(channel, parsed):
    assert parse_tab_stream(channel) == parsed


@given(user=st.text(min_size=1, max_size=20), tab=st.text(
    alphabet=st.characters(blacklist_characters=":"), min_size=1, max_size=22))
def test_a_tab_stream_parses_back_into_its_exact_user(user, tab):
    assert parse_tab_stream(f"pgws:tab:{user}:{tab}") == (user, tab)
