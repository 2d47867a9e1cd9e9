"""The browser files shipped with the package: client.html and pgws.js, and pgws.js as a response."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from werkzeug.wrappers import Request, Response

from .errors import ConfigError

CLIENT_HTML = "client.html"
CLIENT_JS = "pgws.js"
#: Seconds a browser may reuse pgws.js before asking again (then a 304 if unchanged).
CLIENT_JS_MAX_AGE = 300


def _read(name: str) -> str:
    try:
        return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"the package file {name} cannot be read ({exc}); reinstall pgws_sync"
        ) from exc


def client_html() -> str:
    """The text of client.html, the one-screen page of the ready-made gateway."""
    return _read(CLIENT_HTML)


@functools.lru_cache(maxsize=None)
def client_js() -> str:
    """The text of pgws.js, the browser client (read once per process)."""
    return _read(CLIENT_JS)


@functools.lru_cache(maxsize=None)
def _client_js_etag() -> str:
    return hashlib.sha256(client_js().encode("utf-8")).hexdigest()[:32]


def client_js_response(request: Request) -> Response:
    """pgws.js as ``application/javascript``, cacheable for a few minutes, 304 when unchanged."""
    response = Response(client_js(), mimetype="application/javascript")
    response.set_etag(_client_js_etag())
    response.cache_control.public = True
    response.cache_control.max_age = CLIENT_JS_MAX_AGE
    return response.make_conditional(request)
