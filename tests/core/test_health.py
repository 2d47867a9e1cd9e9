"""Health and readiness: a fixed reason for the public, the database's error text only in the log
(and behind health_detail)."""

from __future__ import annotations

import json
import logging

import psycopg2.extensions
import pytest

from pgws_sync._core.health import REASONS, Health, HealthLog, health_body
from pgws_sync._listening import public_reason

from ..helpers import http_get, serve, wait_for

#: What a driver's error tells about the database, none of which the public may read.
SECRETS = ("fatal", "refused", "connection", "127.0.0.1", "localhost", "postgres", "role",
           "could not", "port", "server")


def public(body: str, *numbers: int) -> bool:
    """True when ``body`` gives nothing of a database error away (nor the ``numbers``)."""
    text = body.lower()
    return not any(word in text for word in SECRETS) and not any(
        str(n) in text for n in numbers)


def test_bodies():
    down = Health(False, "database unreachable", {"listener": "disconnected",
                                                  "error": "FATAL: role \"x\" does not exist",
                                                  "sockets": 2})
    assert health_body(Health(True, None, {"sockets": 2})) == {"status": "ok"}
    assert health_body(down) == {"status": "unavailable", "reason": "database unreachable"}
    assert health_body(down, detail=True) == {
        "status": "unavailable", "reason": "database unreachable", "listener": "disconnected",
        "error": "FATAL: role \"x\" does not exist", "sockets": 2}
    assert health_body(Health(False, None, {"reason": "x", "status": "y"}), detail=True) == {
        "status": "unavailable", "reason": "unavailable"}  # detail never replaces them
    assert all(public(reason) for reason in REASONS)


def test_the_log_hears_of_changes_only(caplog):
    log = HealthLog("Test health")
    down = Health(False, "database unreachable", {"error": "connection refused"})
    with caplog.at_level(logging.INFO, logger="pgws_sync"):
        log.note(Health(True, None, {}))
        for _ in range(3):
            log.note(down)
        log.note(down._replace(detail={"error": "another text, same state"}))
        log.note(Health(True, None, {}))
        log.note(Health(False, "shutting down", {}))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "Test health: unavailable, database unreachable (error: connection refused)"),
        ("INFO", "Test health: ok again"),
        ("INFO", "Test health: unavailable, shutting down (no detail)"),
    ]


def test_a_first_answer_that_fails_is_information(caplog):
    with caplog.at_level(logging.INFO, logger="pgws_sync"):
        HealthLog("Test health").note(Health(False, "not listening", {}))
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_the_database_down_tells_the_public_nothing_of_its_error(pg_server):
    g = serve(pg_server.dsn, options={"canary_interval": 0.2}).wait_up()
    try:
        assert http_get(g.url("/healthz")) == (200, '{"status": "ok"}')
        wait_for(lambda: http_get(g.url("/readyz")) == (200, '{"status": "ok"}'),
                 message="/readyz ok")
        pg_server.stop()
        wait_for(lambda: http_get(g.url("/healthz"))[0] == 503, message="/healthz 503")
        # the listener tries again and again meanwhile, and logs the driver's own words
        wait_for(lambda: "Connection refused" in g.log(), message="a refused reconnect logged")
        for _ in range(3):
            for path in ("/healthz", "/readyz"):
                status, body = http_get(g.url(path))
                assert (status, json.loads(body)) == (
                    503, {"status": "unavailable", "reason": "database unreachable"}), body
                assert public(body, pg_server.port), body
        changes = [line for line in g.log().splitlines()
                   if "[WARNING] Pgws health: unavailable" in line]
        assert len(changes) == 1, changes  # once, not per request, however the error's text goes
        assert "Pgws health: unavailable, database unreachable (" in changes[0]
        assert "listener: disconnected; error: " in changes[0]
        pg_server.start()
        g.wait_up()
        wait_for(lambda: "Pgws health: ok again" in g.log(), message="the way back logged")
    finally:
        g.stop()


def test_a_refused_role_is_named_in_the_detail_only(pg_dsn):
    dsn = psycopg2.extensions.make_dsn(pg_dsn, user="pgws_secret_role")
    quiet = serve(dsn).wait_up(healthy=False)
    detailed = serve(dsn, options={"health_detail": True}).wait_up(healthy=False)
    try:
        def answer(g):
            return http_get(g.url("/healthz"))
        wait_for(lambda: "pgws_secret_role" in answer(detailed)[1], message="the detail's error")
        status, body = answer(detailed)
        detail = json.loads(body)
        assert status == 503 and detail["reason"] == "database unreachable"
        assert detail["listener"] == "disconnected" and "FATAL" in detail["error"]
        status, body = answer(quiet)
        assert (status, json.loads(body)) == (503, {"status": "unavailable",
                                                    "reason": "database unreachable"})
        assert "pgws_secret_role" not in body and public(body), body
        assert 'role "pgws_secret_role" does not exist' in quiet.log()
    finally:
        quiet.stop()
        detailed.stop()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_detail_is_opt_in_on_a_healthy_worker(pg_dsn, path):
    g = serve(pg_dsn, options={"health_detail": True, "canary_interval": 0.2}).wait_up()
    try:
        def detail():
            status, body = http_get(g.url(path))
            return status == 200 and json.loads(body)
        found = wait_for(detail, message=f"{path} ok")
        assert found["status"] == "ok" and found["listener"] == "connected"
        assert found["sockets"] == 0
    finally:
        g.stop()


def test_a_resync_frame_tells_clients_what_reconnected_never_the_drivers_words():
    detail = ('listener reconnected after: connection to server at "10.0.0.5", port 5432 '
              'failed: FATAL:  role "app_user" does not exist')
    assert public_reason(detail) == "listener reconnected"
    assert public_reason("redis source reconnected after: Error 111") == \
        "redis source reconnected"
    assert public_reason("listener reconnected") == "listener reconnected"
