"""Server-side control in every worker: disconnect, subscribe_matching, unsubscribe_matching."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import pytest
from hypothesis import given, strategies as st

from pgws_sync import PubSub
from pgws_sync.errors import ConfigError, InvalidChannel, InvalidPayload, PayloadTooLarge
from pgws_sync.pubsub.control import (Control, change_frames, close_code, format_control,
                                      matches, parse_control, presence_frame)

from ..fuzzing import FUZZ
from ..helpers import wait_for
from ..pubsub_helpers import Client, post, serve_pubsub

# ------------------------------------------------------------------ the format, pure


def test_a_disconnect_reads_back_as_written() -> None:
    text = format_control("disconnect", {"user": "alice", "n": 1}, code=4403, reason="logged out")
    assert parse_control(text) == Control("disconnect", {"user": "alice", "n": 1}, code=4403,
                                          reason="logged out")


def test_a_subscribe_names_its_channel() -> None:
    text = format_control("subscribe", {"team": "red"}, channel="alerts")
    assert parse_control(text) == Control("subscribe", {"team": "red"}, channel="alerts")
    assert parse_control(format_control("unsubscribe", {}, channel="x")).op == "unsubscribe"


@pytest.mark.parametrize("code", [999, 1001, 1006, 2999, 5000, True, "4403", None, 4403.0])
def test_close_codes_an_app_may_not_send_are_refused(code: object) -> None:
    with pytest.raises(InvalidPayload):
        format_control("disconnect", {}, code=code)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [1000, 3000, 4000, 4403, 4499, 4999])
def test_close_codes_an_app_may_send(code: int) -> None:
    assert close_code(code) == code


def test_bad_reasons_metadata_channels_and_sizes_are_refused() -> None:
    with pytest.raises(InvalidPayload):
        format_control("disconnect", {}, reason="é" * 62)  # 124 bytes
    with pytest.raises(InvalidPayload):
        format_control("disconnect", {"user": object()})
    with pytest.raises(InvalidPayload):
        format_control("disconnect", {"n": float("nan")})
    with pytest.raises(InvalidChannel):
        format_control("subscribe", {}, channel="")
    with pytest.raises(PayloadTooLarge):
        format_control("disconnect", {"user": "a" * 9000})
    with pytest.raises(InvalidPayload):
        format_control("reboot", {})


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"op": "disconnect", "match": []}',
                                  '{"op": "disconnect", "code": 1001}',
                                  '{"op": "subscribe", "match": {}}',
                                  '{"op": "kick", "match": {}}', "not json"])
def test_anything_else_on_the_control_channel_is_refused(text: str) -> None:
    with pytest.raises(InvalidPayload):
        parse_control(text)


def test_matching_needs_every_key_with_an_equal_value() -> None:
    assert matches({"user": "alice", "team": "red"}, {"user": "alice"})
    assert matches({"user": "alice"}, {})
    assert not matches({"user": "alice"}, {"user": "bob"})
    assert not matches({"user": "alice"}, {"user": "alice", "team": "red"})
    assert not matches({"admin": 1}, {"admin": True})  # True is not 1
    assert not matches({}, {"user": None})  # absent is not null
    assert matches({"user": None}, {"user": None})


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@FUZZ
@given(op=st.sampled_from(["disconnect", "subscribe", "unsubscribe"]),
       match=st.dictionaries(st.text(min_size=1, max_size=10), JSON, max_size=4),
       code=st.sampled_from([1000, 3000, 4000, 4403, 4999]), reason=st.text(max_size=30),
       channel=st.text(min_size=1, max_size=30).filter(lambda c: c.isprintable()))
def test_control_messages_read_back_as_written(op: str, match: Dict[str, object], code: int,
                                               reason: str, channel: str) -> None:
    try:
        text = format_control(op, match, code=code, reason=reason, channel=channel)
    except (InvalidPayload, InvalidChannel):
        return  # a lone surrogate, a reason too long: refused when sent, never half-sent
    control = parse_control(text)
    assert control.op == op and control.match == match
    assert matches(match, control.match)
    if op == "disconnect":
        assert (control.code, control.reason) == (code, reason)
    else:
        assert control.channel == channel


def test_a_control_channel_too_long_is_a_config_error(pg_dsn: str) -> None:
    from pgws_sync import Listener

    with pytest.raises(ConfigError, match="control_channel"):
        PubSub(Listener(pg_dsn), pubsub_channel="p" * 60)
    endpoint = PubSub(Listener(pg_dsn), pubsub_channel="p" * 60, control_channel="ctl")
    assert endpoint.control_channel == "ctl" and "ctl" in endpoint.listen_channels


# --------------------------------------------------- two workers, real clients


@pytest.fixture(scope="module")
def server(pg_dsn):
    g = serve_pubsub(pg_dsn, workers=2)
    yield g
    g.stop()


def in_both_workers(server, user: str, at_least: int = 2) -> List[Client]:
    """Clients of ``user`` until both workers hold at least one (and ``at_least`` in all)."""
    clients: List[Client] = []
    while len({c.pid for c in clients}) < 2 or len(clients) < at_least:
        assert len(clients) < 40, "the second worker took no socket"
        clients.append(Client(server, headers={"X-User": user}))
    return clients


def closed_with(client: Client, timeout: float) -> tuple:
    return client.ws.expect_close(timeout=timeout)


def test_disconnect_closes_the_users_sockets_in_every_worker_and_nobody_elses(server) -> None:
    alice = in_both_workers(server, "alice-d")
    bob = in_both_workers(server, "bob-d")
    try:
        started = time.monotonic()
        post(server, "/debug/control", {"op": "disconnect", "code": 4403,
                                        "reason": "logged out", "match": {"user": "alice-d"}})
        for client in alice:
            assert closed_with(client, 5.0) == (4403, "logged out")
        took = time.monotonic() - started
        print(f"disconnect: {len(alice)} sockets in 2 workers closed with 4403 in "
              f"{took * 1000:.0f} ms")
        assert took < 5.0
        # bob's sockets are open: each still answers a subscribe
        for client in bob:
            client.subscribe("still-here")
    finally:
        for client in alice + bob:
            client.close()


def test_subscribe_and_unsubscribe_matching_reach_every_worker(server) -> None:
    carol = in_both_workers(server, "carol-s")
    dave = Client(server, headers={"X-User": "dave-s"})
    try:
        post(server, "/debug/control", {"op": "subscribe", "channel": "news-s",
                                        "match": {"user": "carol-s"}})
        for client in carol:
            assert client.recv_json(5.0) == {"event": "subscribed", "channel": "news-s",
                                             "server": True}
        post(server, "/debug/publish", {"channel": "news-s", "message": {"n": 1}})
        for client in carol:
            frame = client.recv_json(5.0)
            assert frame["channel"] == "news-s" and frame["payload"] == {"n": 1}
        post(server, "/debug/control", {"op": "unsubscribe", "channel": "news-s",
                                        "match": {"user": "carol-s"}})
        for client in carol:
            assert client.recv_json(5.0) == {"event": "unsubscribed", "channel": "news-s",
                                             "server": True}
        post(server, "/debug/publish", {"channel": "news-s", "message": {"n": 2}})
        dave.subscribe("after-s")  # a round trip: dave got nothing of news-s before it
        post(server, "/debug/publish", {"channel": "after-s", "message": {"n": 3}})
        assert dave.recv_json(5.0)["payload"] == {"n": 3}
        for client in carol:
            client.subscribe("after-s")  # the reply comes first: news-s's n=2 never came
    finally:
        for client in carol + [dave]:
            client.close()


def test_a_forged_control_message_is_dropped_and_the_worker_goes_on(server, pg_dsn) -> None:
    import psycopg2

    client = Client(server, headers={"X-User": "erin-f"})
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_notify('pgws_sync:control', 'garbage')")
            cur.execute("SELECT pg_notify('pgws_sync:control', %s)",
                        (json.dumps({"op": "disconnect", "code": 1001, "match": {}}),))
        post(server, "/debug/control", {"op": "disconnect", "code": 4000,
                                        "match": {"user": "erin-f"}})
        assert closed_with(client, 5.0)[0] == 4000
        assert wait_for(lambda: "dropped a control message" in server.log(), 5.0)
    finally:
        conn.close()
        client.close()


def test_disconnect_reaches_another_host(server, pg_dsn) -> None:
    """A third gunicorn instance on the same database plays another host."""
    other = serve_pubsub(pg_dsn, workers=1)
    here = in_both_workers(server, "frank-h")
    there = [Client(other, headers={"X-User": "frank-h"}),
             Client(other, headers={"X-User": "grace-h"})]
    try:
        post(server, "/debug/control", {"op": "disconnect", "code": 4403,
                                        "reason": "logged out", "match": {"user": "frank-h"}})
        for client in here + there[:1]:
            assert closed_with(client, 5.0) == (4403, "logged out")
        there[1].subscribe("still-here")
    finally:
        for client in here + there:
            client.close()
        other.stop()


# ------------------------------------------------------------ presence frames, fuzzed

MEMBER = st.builds(lambda c, i: {"client": c, "info": i}, st.text(min_size=1, max_size=40),
                   st.dictionaries(st.text(max_size=8), JSON, max_size=3))


@FUZZ
@given(joins=st.lists(MEMBER, max_size=60), leaves=st.lists(MEMBER, max_size=60),
       total=st.integers(min_value=0, max_value=10**6),
       channel=st.text(min_size=1, max_size=30).filter(lambda c: c.isprintable()),
       counts_above=st.integers(min_value=0, max_value=200))
def test_presence_changes_become_frames_every_client_can_read(
        joins: List[Dict[str, Any]], leaves: List[Dict[str, Any]], total: int, channel: str,
        counts_above: int) -> None:
    from pgws_sync._formats import strict_problem
    from pgws_sync.sources.presence import Change, Member, format_changes

    change = Change(channel, [Member(m["client"], m["info"]) for m in joins],
                    [Member(m["client"], m["info"]) for m in leaves], total)
    try:
        payloads = format_changes([change])
    except InvalidPayload:
        return  # a lone surrogate in a name: never sent
    assert all(len(p.encode("utf-8")) < 8000 for p in payloads)
    controls = [parse_control(p) for p in payloads]
    assert [m for c in controls for m in c.joins] == joins
    assert [m for c in controls for m in c.leaves] == leaves
    frames = [f for c in controls for f in change_frames(c, counts_above=counts_above)]
    if total > counts_above:
        assert frames == [(None, json.dumps({"event": "presence_count", "channel": channel,
                                             "count": total}, ensure_ascii=False))] * len(controls)
    else:
        assert len(frames) == len(joins) + len(leaves)
        for about, frame in frames:
            decoded = json.loads(frame)
            assert strict_problem(decoded) is None
            assert decoded["event"] in ("join", "leave") and decoded["channel"] == channel
            assert decoded["member"]["client"] == about
    reply = json.loads(presence_frame(channel, "r", total, joins))
    assert reply == {"event": "presence", "channel": channel, "reply_to": "r", "count": total,
                     "members": joins}
