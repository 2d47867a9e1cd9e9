"""Identity comes from the app: a Push endpoint that keeps every default trusts no header,
and guests never share a key with users. Tried as an attacker with a script would."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from ..durable_helpers import new_log
from ..push_helpers import Tab, api, push, serve_push, stats


@pytest.fixture(scope="module")
def defaults(pg_dsn: str) -> Iterator[Any]:
    """The test app with Push's own defaults for identity (no trusted header), durable."""
    schema = new_log(pg_dsn)
    server = serve_push(pg_dsn, options={"user_header": None, "guest_header": None,
                                         "durable": True, "log_schema": schema})
    yield server
    server.stop()


def test_a_socket_sending_x_auth_user_is_not_that_user(defaults):
    attacker = Tab(defaults, user="alice", guest="alice")  # both headers, as any script can
    victim = Tab(defaults, headers={})  # an anonymous socket to compare with
    (conn,) = [c for c in stats(defaults)["connections"]
               if c["metadata"].get("tabWindowId") == attacker.tab]
    assert "user" not in conn["metadata"] and "guest" not in conn["metadata"]
    api(defaults, {"user": "alice", "payload": {"secret": "2fa 123456"}})
    push(defaults, {"pushToUser": "alice", "payload": {"secret": "invoice"}})
    # what reaches the attacker before its own request's answer: nothing of alice's
    attacker.send({"action": "subscribe", "channel": "pgws:user:alice", "id": "s", "since": 0})
    frames = []
    while not frames or frames[-1].get("reply_to") != "s":
        frames.append(attacker.recv_json())
    assert len(frames) == 1, frames  # no streams event, no push
    assert frames[0]["event"] == "error" and "not allowed" in frames[0]["error"], frames
    attacker.close()
    victim.close()
