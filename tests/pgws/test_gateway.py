"""The ready-made gateway app (``pgws-sync serve``): its sockets are served below Flask."""

import flask
from werkzeug.test import Client

from pgws_sync.pgws.gateway import create_app

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_gateway_answers_upgrades_below_flask_and_plain_requests_through_it(pg_dsn):
    """An upgrade on /ws never reaches Flask (no before_request); a plain GET on /ws still does.

    Delivery through the gateway under gunicorn is covered by test_cli and test_browser.
    """
    app = create_app(pg_dsn, ["pgws"])
    seen = []
    app.before_request(lambda: seen.append(flask.request.path))
    client = Client(app)

    upgrade = client.get("/ws", headers=UPGRADE)
    # Without gunicorn there is no socket to take over: the endpoint itself says so.
    assert upgrade.status_code == 500
    assert b"cannot serve WebSockets" in upgrade.data
    assert seen == []

    plain = client.get("/ws")
    assert plain.status_code == 426
    assert seen == ["/ws"]
