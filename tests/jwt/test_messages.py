"""postgres-websockets message formats, as pure functions."""

from __future__ import annotations

import json

import pytest

from pgws_sync import PayloadTooLarge
from pgws_sync._formats import error_frame
from pgws_sync.jwt.messages import (
    DEFAULT_LISTEN_CHANNEL,
    event_payload,
    target_channel,
    too_large_reason,
)

LISTEN = DEFAULT_LISTEN_CHANNEL


@pytest.mark.parametrize("payload,expected", [
    ('{"channel": "chat", "x": 1}', "chat"),
    ('  {"channel":"caf\u00e9"}  ', "caf\u00e9"),
    ('{"channel": ""}', ""),
    ('{"channel": 5}', LISTEN),
    ('{"channel": null}', LISTEN),
    ('{"other": "chat"}', LISTEN),
    ('["chat"]', LISTEN),
    ('"chat"', LISTEN),
    ("chat", LISTEN),
    ("", LISTEN),
    ('{"channel": "chat"', LISTEN),
    ('{"channel": "chat", "n": NaN}', LISTEN),  # not JSON, as postgres-websockets reads it
    ('{"channel": "a"} trailing', LISTEN),
])
def test_target_channel(payload: str, expected: str) -> None:
    assert target_channel(payload, LISTEN) == expected


def test_event_payload_is_compact_ordered_utf8() -> None:
    text = event_payload("WebsocketMessage", "chat", "h\u00e9llo \"q\"", {"mode": "rw", "n": 1},
                         1700000000.25)
    assert text == ('{"event":"WebsocketMessage","channel":"chat","payload":"h\u00e9llo \\"q\\"",'
                    '"claims":{"mode":"rw","n":1,"message_delivered_at":1700000000.25}}')
    assert target_channel(text, LISTEN) == "chat"  # a browser's message goes back to its channel


def test_event_payload_refuses_8000_bytes() -> None:
    claims = {"mode": "w"}
    base = len(event_payload("WebsocketMessage", "c", "", claims, 1.5).encode())
    fits = "x" * (7999 - base)
    assert len(event_payload("WebsocketMessage", "c", fits, claims, 1.5).encode()) == 7999
    with pytest.raises(PayloadTooLarge) as caught:
        event_payload("WebsocketMessage", "c", fits + "\u00e9", claims, 1.5)  # 2 more bytes
    assert caught.value.size == 8001 and caught.value.limit == 8000
    assert "7999" in too_large_reason(caught.value)


def test_error_frame() -> None:
    assert error_frame('bad "thing"', compact=True) == '{"event":"error","error":"bad \\"thing\\""}'
    assert json.loads(error_frame("\u00e9", compact=True)) == {"event": "error", "error": "\u00e9"}
