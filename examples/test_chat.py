"""Tests of examples/chat.py, written with pgws_sync.testing as an app's own tests are.

Run:  PGWS_DB_URI=postgresql+psycopg://localhost/postgres pytest examples/test_chat.py
(the database needs the log: pgws-sync migrate).
"""

import itertools
import os

import pytest

from pgws_sync.testing import pgws_client, pgws_server  # noqa: F401 (fixtures)

DSN = os.environ.get("PGWS_DB_URI")
pytestmark = pytest.mark.skipif(not DSN, reason="set PGWS_DB_URI to the test database")
_rooms = itertools.count()


@pytest.fixture
def server(pgws_server):
    return pgws_server("examples.chat:app", env={"PGWS_DB_URI": DSN})


@pytest.fixture
def room():
    return f"room-{os.getpid()}-{next(_rooms)}"


def member(server, name, room):
    http = server.http()
    assert http.post(f"/login/{name}")[0] == 204
    assert http.post(f"/rooms/{room}/join")[0] == 204
    return http


def say(client, room, text, id="m"):
    client.send_json({"action": "message", "channel": room, "payload": {"text": text}, "id": id})
    return client.recv_until(lambda f: f.get("reply_to") == id and "event" in f)


def test_members_write_and_every_member_reads_with_the_author_stamped(server, pgws_client,
                                                                      room):
    ann = pgws_client(server, cookies=member(server, "ann", room))
    bob = pgws_client(server, cookies=member(server, "bob", room))
    ann.subscribe(room)
    bob.subscribe(room)
    assert say(ann, room, "hello")["event"] == "received"
    assert bob.next_message(room) == {"from": "ann", "text": "hello"}
    assert ann.next_message(room) == {"from": "ann", "text": "hello"}


def test_strangers_neither_read_nor_write(server, pgws_client, room):
    member(server, "ann", room)
    stranger = server.http()
    stranger.post("/login/eve")
    eve = pgws_client(server, cookies=stranger)
    with pytest.raises(AssertionError, match="refused"):
        eve.subscribe(room)
    assert say(eve, room, "let me in")["event"] == "error"


def test_a_member_who_was_away_reads_what_was_said(server, pgws_client, room):
    ann_http, bob_http = member(server, "ann", room), member(server, "bob", room)
    bob = pgws_client(server, cookies=bob_http)
    left_at = bob.subscribe(room)
    bob.close()
    ann = pgws_client(server, cookies=ann_http)
    say(ann, room, "while you were out")
    back = pgws_client(server, cookies=bob_http)
    back.subscribe(room, since=left_at["offset"], epoch=left_at["epoch"])
    assert back.next_message(room) == {"from": "ann", "text": "while you were out"}
