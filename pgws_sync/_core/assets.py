"""Files served over HTTP: the browser client shipped with the package, and static folders."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict

from werkzeug.exceptions import NotFound
from werkzeug.utils import send_from_directory
from werkzeug.wrappers import Request, Response

from ..errors import ConfigError

WSGIEnviron = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Any]

CLIENT_HTML = "client.html"
CLIENT_JS = "pgws.js"
CLIENT_ESM = "pgws.mjs"
#: Where pgws.js's exports start: the ES module build replaces what follows.
EXPORTS_MARK = "  // ---- exports"
#: Seconds a browser may reuse pgws.js before asking again (then a 304 if unchanged).
CLIENT_JS_MAX_AGE = 300


def _read(name: str) -> str:
    try:
        return resources.files("pgws_sync").joinpath(name).read_text(encoding="utf-8")
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


def esm_build(classic: str) -> str:
    """pgws.mjs from pgws.js's text: the same code, ending in ``export`` instead of setting
    a global or ``module.exports`` (tools/build-pgws-esm writes it; a test checks the file)."""
    head, mark, _ = classic.partition(EXPORTS_MARK)
    start = "(function (root) {"
    if not mark or start not in head:
        raise ConfigError("pgws.js has no exports block to build pgws.mjs from")
    return ("// pgws.mjs: built from pgws.js by tools/build-pgws-esm (edit pgws.js, then run it).\n"
            + head.replace(start, "const PgwsSocket = (function (root) {", 1)
            + "  return PgwsSocket;\n})(globalThis);\n\nexport default PgwsSocket;\nexport { PgwsSocket };\n")


def client_esm() -> str:
    """The text of pgws.mjs, the ES module build of pgws.js shipped beside it."""
    return _read(CLIENT_ESM)


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


def static_files(root: str) -> WSGIApp:
    """A WSGI app serving the files under ``root`` (``index.html`` for folders), GET and HEAD."""
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"{root!r} is not a folder")

    def app(environ: WSGIEnviron, start_response: StartResponse) -> Any:
        request = Request(environ)
        if request.method not in ("GET", "HEAD"):
            response = Response("method not allowed\n", status=405, mimetype="text/plain",
                                headers={"Allow": "GET, HEAD"})
            return response(environ, start_response)
        path = request.path.lstrip("/")
        tries = [path + "index.html"] if path == "" or path.endswith("/") else [
            path, path + "/index.html"]
        for candidate in tries:
            try:
                response = send_from_directory(folder, candidate, environ)
            except NotFound:
                continue
            return response(environ, start_response)
        return Response("not found\n", status=404, mimetype="text/plain")(environ, start_response)

    return app
