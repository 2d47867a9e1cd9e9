"""Frames encoded once by pgws_sync decode as the same messages in a real WebSocket client."""

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from pgws_sync._core.wire import encode_text


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200000])
def test_text_frames_decode_in_wsproto(size):
    text = ("\u2603" + "a" * size)[:size]
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(encode_text(text) + encode_text("next"))
    received = []
    for event in client.events():
        assert isinstance(event, TextMessage)
        assert event.message_finished
        received.append(event.data)
    assert received == [text, "next"]
