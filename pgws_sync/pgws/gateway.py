"""The ready-made gateway app: a Pgws endpoint at /ws, the browser page at /, pgws.js, /healthz."""

from __future__ import annotations

import logging
from typing import Sequence

from flask import Flask, Response

from .._core.assets import client_html
from ..sources.postgres import Listener
from .endpoint import Pgws

logger = logging.getLogger(__name__)

__all__ = ["client_html", "create_app"]


def create_app(dsn: str, channels: Sequence[str], *, metrics: bool = False,
               health_detail: bool = False) -> Flask:
    """A Flask app serving NOTIFYs on ``channels`` to the audience ``default``.

    ``dsn`` is a libpq connection string or URI (empty: libpq's environment).
    Routes: ``/ws`` (the WebSocket), ``/`` (client.html), ``/pgws.js``, ``/healthz``.
    Create it in the process that serves it (after any fork): its listener
    connects from there. The gateway has no Flask hooks, so its sockets are
    served below Flask (``init_app(..., flask_request=False)``): less CPU to
    open one, less memory while open. ``health_detail``: the health answers carry
    the operator's detail (see :class:`~pgws_sync.WebSocketEndpoint`).
    """
    page = client_html()
    app = Flask(__name__)
    listener = Listener(dsn, min_reconnect=1.0, max_reconnect=30.0)
    endpoint = Pgws(listener, *channels, metrics_path="/metrics" if metrics else None,
                    health_detail=health_detail)
    endpoint.init_app(app, "/ws", flask_request=False)

    def index() -> Response:
        return Response(page, mimetype="text/html")

    app.add_url_rule("/", endpoint="pgws_sync_client", view_func=index)
    app.extensions["pgws_sync"] = endpoint
    logger.info("gateway app for channels %s", ", ".join(endpoint.channels))
    return app
