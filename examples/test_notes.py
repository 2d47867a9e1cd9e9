"""Tests of examples/notes.py's sockets, written as an app's own tests are: with
pgws_sync.testing (a real gunicorn serving the app, a client that speaks the protocol).

Run:  PGWS_DB_URI=postgresql+psycopg://localhost/postgres pytest examples/test_notes.py
(the database needs the log: pgws-sync migrate). In a project of your own, load the
fixtures once with ``-p pgws_sync.testing`` (pytest's addopts) or import them as here.
"""

import json
import os

import pytest

from pgws_sync.testing import UpgradeRefused, pgws_client, pgws_server  # noqa: F401 (fixtures)

DSN = os.environ.get("PGWS_DB_URI")
pytestmark = pytest.mark.skipif(not DSN, reason="set PGWS_DB_URI to the test database")


@pytest.fixture
def server(pgws_server):
    return pgws_server("examples.notes:app", env={"PGWS_DB_URI": DSN})


def log_in(server, name):
    """A browser session logged in as ``name``, and the user's channel."""
    http = server.http()
    status, body = http.post(f"/login/{name}")
    assert status == 200, body
    return http, json.loads(body)["channel"]


def test_a_saved_note_reaches_the_users_tab_as_an_object(server, pgws_client):
    ann, channel = log_in(server, "ann")
    tab = pgws_client(server, cookies=ann)
    tab.subscribe(channel)
    status, body = ann.post("/notes", {"text": "buy milk"})
    assert status == 201, body
    assert tab.next_message(channel) == {"id": json.loads(body)["id"], "text": "buy milk"}


def test_a_tab_that_was_away_resumes_where_it_left(server, pgws_client):
    ann, channel = log_in(server, "ann")
    tab = pgws_client(server, cookies=ann)
    subscribed = tab.subscribe(channel)
    tab.close()
    ann.post("/notes", {"text": "while away"})
    back = pgws_client(server, cookies=ann)
    back.subscribe(channel, since=subscribed["offset"], epoch=subscribed["epoch"])
    assert back.next_message(channel)["text"] == "while away"


def test_strangers_and_other_users_channels_are_refused(server, pgws_client):
    with pytest.raises(UpgradeRefused) as refused:
        pgws_client(server)  # not logged in
    assert refused.value.status == 401
    _, anns_channel = log_in(server, "ann")
    bob, _ = log_in(server, "bob")
    tab = pgws_client(server, cookies=bob)
    with pytest.raises(AssertionError, match="refused"):
        tab.subscribe(anns_channel)


def test_after_logout_a_new_socket_is_refused(server, pgws_client):
    ann, channel = log_in(server, "ann")
    tab = pgws_client(server, cookies=ann)
    tab.subscribe(channel)
    ann.post("/logout")
    with pytest.raises(UpgradeRefused):
        pgws_client(server, cookies=ann)


def test_the_page_subscribes_to_its_user_s_channel(server):
    ann, channel = log_in(server, "ann")
    status, body = ann.get("/")
    assert status == 200 and f'sock.subscribe("{channel}")' in body
    assert server.http().get("/")[0] == 401  # not logged in
