"""Database addresses as Flask apps write them (SQLAlchemy's URLs) work wherever pgws_sync
takes one: the listener, the endpoints, the log, the CLI and its environment variable."""

from __future__ import annotations

import psycopg2
import pytest
import sqlalchemy

from pgws_sync import JwtAuth, JwtGateway, Listener, PubSub, migrate
from pgws_sync.pubsub.publication import DEFAULT_PUBSUB_CHANNEL
from pgws_sync.pubsub.publisher import Publisher
from pgws_sync._dsn import libpq_dsn
from pgws_sync._startup import check_dsn
from pgws_sync.pgws.gateway import create_app

from .clirun import Serve, no_database_env, run_cli
from .helpers import Recorder, Ws, pg_notify, wait_for

FORMS = ["postgresql+psycopg2://", "postgresql+psycopg://", "postgres://", "postgresql://"]


def as_form(dsn: str, form: str) -> str:
    return form + dsn.split("://", 1)[1]


def test_sqlalchemy_urls_lose_their_driver_and_keep_the_password() -> None:
    assert libpq_dsn("postgresql+psycopg2://u:p%40ss@h:5/db?sslmode=disable") == \
        "postgresql://u:p%40ss@h:5/db?sslmode=disable"
    assert libpq_dsn("POSTGRESQL+PSYCOPG://h/db") == "postgresql://h/db"
    assert libpq_dsn("postgres+psycopg2://h/db") == "postgresql://h/db"
    assert libpq_dsn("postgres://h/db") == "postgres://h/db"  # libpq reads it as it is
    assert libpq_dsn("host=h dbname=db") == "host=h dbname=db"
    url = sqlalchemy.engine.make_url("postgresql+psycopg://u:secret@h/db")
    assert libpq_dsn(url) == "postgresql://u:secret@h/db"  # str(url) would hide it: ***
    with pytest.raises(TypeError):
        libpq_dsn(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("form", FORMS)
def test_the_start_up_check_takes_every_form_and_still_names_a_wrong_scheme(form: str) -> None:
    check_dsn(form + "u@localhost/app")
    with pytest.raises(Exception, match="starts with 'mysql\\+pymysql://', but pgws_sync needs "
                                        "PostgreSQL.*postgresql\\+psycopg2"):
        check_dsn("mysql+pymysql://u@localhost/app")


@pytest.mark.parametrize("form", FORMS)
def test_a_listener_and_a_publisher_connect_with_every_form(pg_dsn, sender, channel, form):
    dsn = as_form(pg_dsn, form)
    listener = Listener(dsn, min_reconnect=0.05, max_reconnect=0.5)
    sink = Recorder()
    listener.add_sink(sink, [channel, DEFAULT_PUBSUB_CHANNEL])
    publisher = Publisher(dsn)
    try:
        assert listener.wait_connected(10), listener.status()
        publisher.publish(channel, {"form": form})
        wait_for(lambda: sink.payloads(), message="the publication")
        assert f'"form":"{form}"' in sink.payloads()[0]
    finally:
        publisher.close()
        listener.stop()


def test_a_sqlalchemy_url_object_is_taken_with_its_password(pg_dsn) -> None:
    url = sqlalchemy.engine.make_url(as_form(pg_dsn, "postgresql+psycopg://"))
    listener = Listener(url)
    assert listener.dsn == pg_dsn


@pytest.mark.parametrize("form", FORMS[:3])
def test_endpoints_and_migrate_take_every_form(pg_dsn, form):
    dsn = as_form(pg_dsn, form)
    assert PubSub(Listener(dsn)).publisher.dsn == libpq_dsn(dsn)
    assert PubSub(Listener(pg_dsn), dsn=dsn).publisher.dsn == libpq_dsn(dsn)
    JwtGateway(Listener(dsn), JwtAuth("x" * 32), dsn=dsn)  # parses its pool's DSN at once
    create_app(dsn, ["pgws"])  # builds; its listener connects on the first request
    assert any("up to date" in line or "created" in line
               for line in migrate(dsn, schema="pgws_sync_dsn_forms"))


@pytest.mark.parametrize("form", FORMS[:3])
def test_the_cli_takes_every_form_in_dsn_and_in_the_environment(pg_dsn, form):
    dsn = as_form(pg_dsn, form)
    result = run_cli("notify", "--dsn", dsn, "pgws", '{"a": 1}')
    assert result.returncode == 0, result.stderr
    result = run_cli("notify", "pgws", '{"a": 1}', env=no_database_env(PGWS_DB_URI=dsn))
    assert result.returncode == 0, result.stderr
    assert "sent to channel 'pgws'" in result.stdout


@pytest.mark.parametrize("jwt", [False, True], ids=["pgws", "jwt-gateway"])
def test_pgws_sync_serve_takes_a_sqlalchemy_url_and_says_where_it_listens(pg_dsn, sender, jwt):
    url = as_form(pg_dsn, "postgresql+psycopg2://")
    extra = {"PGWS_JWT_SECRET": "s" * 32, "PGWS_DB_URI": url} if jwt else {}
    server = Serve([] if jwt else ["--dsn", url], env=no_database_env(**extra)).wait_up()
    try:
        assert f"serving on http://127.0.0.1:{server.port}" in server.log()
        if not jwt:
            ws = Ws(server.ws_url("/ws"))
            server.wait_sockets(1)
            pg_notify(sender, "pgws", 'default,{"via": "sqlalchemy url"}')
            assert ws.recv_json()["payload"] == {"via": "sqlalchemy url"}
            ws.close()
    finally:
        server.stop()
