"""The examples run under gunicorn exactly as their docstrings say, and deliver."""

import pytest

from .conftest import pg_notify
from .helpers import Gunicorn, Ws, wait_for


def run_example(module, pg_dsn):
    return Gunicorn(f"examples.{module}:app", env={"PGWS_DB_URI": pg_dsn}).wait_up()


def test_minimal_example(pg_dsn, sender):
    g = run_example("minimal", pg_dsn)
    try:
        ws = Ws(g.ws_url())
        wait_for(lambda: _sockets(g) == 1, message="socket registered")
        pg_notify(sender, "pgws", 'default,{"message": "hello, world"}')
        assert ws.recv_json()["payload"] == {"message": "hello, world"}
        ws.close()
    finally:
        g.stop()


def test_audiences_example(pg_dsn, sender):
    g = run_example("audiences", pg_dsn)
    try:
        both = Ws(g.ws_url(), headers={"X-Teams": "noosa, coolum"})
        coolum = Ws(g.ws_url(), headers={"X-Teams": "coolum"})
        wait_for(lambda: _sockets(g) == 2, message="sockets registered")
        pg_notify(sender, "updates", 'noosa,{"surf": "2m"}')
        pg_notify(sender, "updates", 'coolum,{"surf": "1m"}')
        assert both.recv_json()["payload"] == {"surf": "2m"}
        assert both.recv_json()["payload"] == {"surf": "1m"}
        assert coolum.recv_json()["payload"] == {"surf": "1m"}
        both.close()
        coolum.close()
    finally:
        g.stop()


def _sockets(g):
    import json

    from .helpers import http_get

    status, body = http_get(g.url("/healthz"))
    return json.loads(body)["sockets"] if status == 200 else -1


@pytest.mark.parametrize("module", ["minimal", "audiences"])
def test_examples_document_how_to_run(module):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "examples" / f"{module}.py").read_text()
    assert "gunicorn -c python:pgws_sync.gunicorn" in text and f"examples.{module}:app" in text
