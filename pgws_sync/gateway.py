"""The ready-made gateway app: a PGWS endpoint at /ws, the browser client at /, /healthz."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Sequence

from flask import Flask, Response

from .errors import ConfigError
from .listener import Listener
from .pgws import PGWS

logger = logging.getLogger(__name__)

CLIENT_RESOURCE = "client.html"


def client_html() -> str:
    """The text of the browser client shipped with the package."""
    try:
        return resources.files(__package__).joinpath(CLIENT_RESOURCE).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"the package file {CLIENT_RESOURCE} cannot be read ({exc}); reinstall pgws_sync"
        ) from exc


def create_app(dsn: str, channels: Sequence[str]) -> Flask:
    """A Flask app serving NOTIFYs on ``channels`` to the audience ``default``.

    ``dsn`` is a libpq connection string or URI (empty: libpq's environment).
    Routes: ``/ws`` (the WebSocket), ``/`` (client.html), ``/healthz``.
    Create it in the process that serves it (after any fork): its listener
    connects from there.
    """
    page = client_html()
    app = Flask(__name__)
    listener = Listener(dsn, min_reconnect=1.0, max_reconnect=30.0)
    endpoint = PGWS(listener, *channels)
    endpoint.init_app(app, "/ws")

    def index() -> Response:
        return Response(page, mimetype="text/html")

    app.add_url_rule("/", endpoint="pgws_sync_client", view_func=index)
    app.extensions["pgws_sync"] = endpoint
    logger.info("gateway app for channels %s", ", ".join(endpoint.channels))
    return app
