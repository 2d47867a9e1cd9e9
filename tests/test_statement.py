"""Publishing inside the transaction the app already has: every publishing function on a
psycopg2 connection, a psycopg 3 connection, a SQLAlchemy Connection and a SQLAlchemy Session,
with the same behaviour on each (commit delivers once, rollback never, the same errors)."""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import psycopg
import psycopg2
import psycopg2.extensions
import pytest
import sqlalchemy
from sqlalchemy.orm import Session

from pgws_sync import (
    InvalidPayload,
    Listener,
    LogUnavailable,
    PubSub,
    Push,
    notify,
    publish,
    publish_durable,
)
from pgws_sync.errors import MessageTooLarge
from pgws_sync.errors import JsonTextWarning
from pgws_sync.pubsub.publication import DEFAULT_PUBSUB_CHANNEL
from pgws_sync.pubsub.publisher import Publisher

from .durable_helpers import new_log
from .helpers import Recorder, wait_for


class AppConn(NamedTuple):
    """A connection of one kind, in a transaction, and how to end that transaction."""

    conn: Any
    commit: Callable[[], None]
    rollback: Callable[[], None]


def sqla_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


KINDS = ["psycopg2", "psycopg3", "sqlalchemy-connection-psycopg2", "sqlalchemy-session-psycopg"]


@pytest.fixture(params=KINDS)
def kind(request: Any) -> str:
    return str(request.param)


def open_conn(kind: str, dsn: str) -> Iterator[AppConn]:
    if kind == "psycopg2":
        conn = psycopg2.connect(dsn)
        try:
            yield AppConn(conn, conn.commit, conn.rollback)
        finally:
            conn.close()
    elif kind == "psycopg3":
        conn3 = psycopg.connect(dsn)
        try:
            yield AppConn(conn3, conn3.commit, conn3.rollback)
        finally:
            conn3.close()
    elif kind == "sqlalchemy-connection-psycopg2":
        engine = sqlalchemy.create_engine(sqla_url(dsn, "psycopg2"))
        try:
            with engine.connect() as sconn:
                yield AppConn(sconn, sconn.commit, sconn.rollback)
        finally:
            engine.dispose()
    else:
        engine = sqlalchemy.create_engine(sqla_url(dsn, "psycopg"))
        try:
            with Session(engine) as session:
                yield AppConn(session, session.commit, session.rollback)
        finally:
            engine.dispose()


@pytest.fixture
def app_conn(kind: str, pg_dsn: str) -> Iterator[AppConn]:
    yield from open_conn(kind, pg_dsn)


@pytest.fixture
def received(pg_dsn: str, channel: str) -> Iterator[Recorder]:
    listener = Listener(pg_dsn, min_reconnect=0.05, max_reconnect=0.5)
    sink = Recorder()
    listener.add_sink(sink, [channel, DEFAULT_PUBSUB_CHANNEL])
    assert listener.wait_connected(10)
    yield sink
    listener.stop()


@pytest.fixture(scope="module")
def schema(pg_dsn: str) -> str:
    return new_log(pg_dsn)


def durable_payloads(dsn: str, schema: str, channel: str) -> list:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT payload FROM {schema}.messages WHERE channel = %s ORDER BY seq",
                        (channel,))
            return [json.loads(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()


def test_notify_commit_delivers_once_and_rollback_never(app_conn, channel, received):
    notify(app_conn.conn, channel, {"step": "rolled back"})
    app_conn.rollback()
    notify(app_conn.conn, channel, {"step": "committed", "n": 1})
    app_conn.commit()
    wait_for(lambda: received.payloads(), message="the committed notification")
    notify(app_conn.conn, channel, {"step": "last"})
    app_conn.commit()
    wait_for(lambda: len(received.payloads()) == 2, message="the last notification")
    assert received.payloads() == ['default,{"step":"committed","n":1}',
                                   'default,{"step":"last"}']


def test_pubsub_publish_commit_delivers_once_and_rollback_never(app_conn, channel, received):
    publish(app_conn.conn, channel, {"step": "rolled back"})
    app_conn.rollback()
    publish(app_conn.conn, channel, {"step": "committed"})
    app_conn.commit()
    publish(app_conn.conn, channel, '{"step": "as text"}', json_text=True)
    app_conn.commit()
    wait_for(lambda: len(received.payloads()) == 2, message="two publications")
    bodies = [json.loads(p) for p in received.payloads()]
    assert [b["channel"] for b in bodies] == [channel, channel]
    assert [b["payload"] for b in bodies] == [{"step": "committed"}, {"step": "as text"}]


def test_publish_durable_commit_appends_once_and_rollback_never(app_conn, pg_dsn, schema,
                                                               channel):
    publish_durable(app_conn.conn, channel, {"id": 1, "state": "rolled back"}, schema=schema)
    app_conn.rollback()
    seq = publish_durable(app_conn.conn, channel, {"id": 1, "state": "paid"}, schema=schema)
    assert isinstance(seq, int)
    publish_durable(app_conn.conn, channel, '{"id": 2}', json_text=True, schema=schema)
    app_conn.commit()
    assert durable_payloads(pg_dsn, schema, channel) == [{"id": 1, "state": "paid"}, {"id": 2}]


def test_the_log_s_own_limit_is_message_too_large_on_every_kind(app_conn, pg_dsn, channel):
    small = new_log(pg_dsn, max_payload=100)
    with pytest.raises(MessageTooLarge) as info:
        publish_durable(app_conn.conn, channel, {"pad": "x" * 200}, schema=small)
    assert info.value.limit == 100
    app_conn.rollback()


def test_a_role_without_rights_gets_one_line_naming_it_and_the_grant(kind, pg_dsn, schema,
                                                                    channel):
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    role = "pgws_no_publish"
    with admin.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {role}")
        cur.execute(f"CREATE ROLE {role} LOGIN")
    try:
        for app_conn in open_conn(kind, psycopg2.extensions.make_dsn(pg_dsn, user=role)
                                  if kind.startswith("psycopg") else
                                  pg_dsn.replace("postgres@", f"{role}@", 1)):
            with pytest.raises(LogUnavailable) as info:
                publish_durable(app_conn.conn, channel, {"a": 1}, schema=schema)
            app_conn.rollback()
            message = str(info.value)
            assert "\n" not in message
            assert f"the role {role} cannot publish" in message
            assert f"pgws-sync migrate --schema {schema} --grant-publish {role}" in message
            assert f'TO "{role}"' in message
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")
        admin.close()


def test_a_str_of_json_given_as_a_value_warns_and_json_text_is_checked(app_conn, schema,
                                                                     channel):
    with pytest.warns(JsonTextWarning, match="json_text=True") as caught:
        publish_durable(app_conn.conn, channel, '{"id": 1}', schema=schema)
    assert caught[0].filename == __file__  # the warning names the caller's line
    with pytest.warns(JsonTextWarning):
        publish(app_conn.conn, channel, "[1, 2]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        publish_durable(app_conn.conn, channel, "plain words", schema=schema)  # a string
        publish_durable(app_conn.conn, channel, "{not json", schema=schema)
        publish(app_conn.conn, channel, {"id": 1})
    with pytest.raises(InvalidPayload, match="JSON"):
        publish_durable(app_conn.conn, channel, "{not json", json_text=True, schema=schema)
    with pytest.raises(InvalidPayload, match="takes JSON text"):
        publish(app_conn.conn, channel, {"id": 1}, json_text=True)
    with pytest.raises(InvalidPayload, match="takes JSON text"):
        notify(app_conn.conn, channel, {"id": 1}, json_text=True)
    with pytest.warns(DeprecationWarning, match="json_text=True"):
        notify(app_conn.conn, channel, '{"id": 1}')
    app_conn.rollback()


def test_something_else_than_a_connection_is_refused_clearly(channel):
    with pytest.raises(TypeError, match="SQLAlchemy Connection or Session"):
        publish(object(), channel, {"a": 1})


def test_the_pooled_publishers_follow_the_same_rule(pg_dsn, channel):
    """PubSub.publish, Publisher.publish and Push.push_to_user: a value as JSON, JSON text
    with json_text=True, a warning for a str holding JSON."""
    listener = Listener(pg_dsn, min_reconnect=0.05, max_reconnect=0.5)
    sink = Recorder()
    listener.add_sink(sink, [DEFAULT_PUBSUB_CHANNEL, "BackgroundPush"])
    assert listener.wait_connected(10)
    publisher = Publisher(pg_dsn)
    pubsub = PubSub(Listener(pg_dsn))
    push = Push(Listener(pg_dsn))
    try:
        publisher.publish(channel, {"n": 1})
        publisher.publish(channel, '{"n": 2}', json_text=True)
        pubsub.publish(channel, '{"n": 3}', json_text=True)
        push.push_to_user("ann", '{"n": 4}', json_text=True)
        push.push_to_room("lobby", {"n": 5})
        with pytest.warns(JsonTextWarning):
            pubsub.publish(channel, '{"n": 6}')
        with pytest.warns(JsonTextWarning):
            push.push_to_user("ann", '{"n": 7}')
        with pytest.raises(InvalidPayload, match="json_text=True is for json"):
            pubsub.publish(channel, "words", type="text", json_text=True)
        wait_for(lambda: len(sink.payloads()) == 7, message="seven messages")
        payloads = [json.loads(p)["payload"] for p in sink.payloads()]
        assert payloads == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}, '{"n": 6}',
                            '{"n": 7}']
    finally:
        publisher.close()
        pubsub.publisher.close()
        push.publisher.close()
        listener.stop()
