"""pgws_sync.testing on its own: the server it runs, the client's reads and protocol calls,
a refused upgrade, a close, and wait_for's deadline."""

from __future__ import annotations

import pytest

from pgws_sync.testing import Client, Server, UpgradeRefused, wait_for

from .helpers import ROOT


@pytest.fixture(scope="module")
def server(pg_dsn):
    with Server("tests.apps.pubsub_app:app", env={"PGWS_DB_URI": pg_dsn}, cwd=ROOT) as started:
        yield started


def test_the_client_speaks_the_protocol_and_keeps_what_it_skipped(server):
    with Client(server, headers={"X-User": "ann"}) as ann, Client(server) as bob:
        assert ann.recv_json()["event"] == "welcome"
        assert bob.recv_json()["event"] == "welcome"
        assert ann.subscribe("news")["event"] == "subscribed"
        assert bob.subscribe("news")["channel"] == "news"
        assert ann.publish("news", {"n": 1})["event"] == "published"
        assert ann.publish("other", {"n": 0})["event"] == "published"  # nobody subscribed
        ann.publish("news", {"n": 2})
        assert bob.next_message("news") == {"n": 1}
        assert bob.next_message("news") == {"n": 2}
        assert bob.nothing_within(0.3)
        with pytest.raises(AssertionError, match="refused"):
            bob.subscribe("forbidden-channel")
        ann.send_json({"action": "message", "payload": {"echo": 5}, "id": "m"})
        reply = ann.recv_until(lambda f: f.get("reply_to") == "m")
        assert reply["payload"]["echoed"] == 5


def test_a_refused_upgrade_raises_with_its_status(server):
    with pytest.raises(UpgradeRefused) as refused:
        Client(server, headers={"X-Refuse": "no"})
    assert refused.value.status == 401


def test_a_stopped_server_closes_its_sockets_with_1001(pg_dsn):
    started = Server("tests.apps.pubsub_app:app", env={"PGWS_DB_URI": pg_dsn},
                     cwd=ROOT).start()
    client = Client(started)
    client.recv_json()
    started.stop()
    assert client.expect_close()[0] == 1001
    client.close()
    assert "Booting worker" in started.log()


def test_wait_for_returns_the_value_or_names_what_it_waited_for():
    assert wait_for(lambda: 42) == 42
    with pytest.raises(AssertionError, match="timed out after 0.1s waiting for the moon"):
        wait_for(lambda: None, 0.1, "the moon")
