"""The floor under the connect benchmark: gunicorn answering the upgrade with a bare 101.

No library and no Flask: a plain WSGI function writes the 101 and then blocks on
the socket until the client goes. It delivers nothing; compare connect times only
(``python -m bench.connect`` runs it beside the gateway), or with compare.sh:

    compare.sh --scenarios 'connect-1000:--clients 1000 --messages 0' \\
        --project 'gunicorn -c python:pgws_sync.gunicorn --threads 1100 ... bench.bare_upgrade:app'

``/healthz`` answers 200, so a benchmark can wait for the worker as it does for the gateway.
"""

from typing import Any, Callable, Dict, List

from pgws_sync._core.wire import switching_protocols


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    if "HTTP_SEC_WEBSOCKET_KEY" not in environ:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    sock = environ["gunicorn.socket"]
    sock.sendall(switching_protocols(environ["HTTP_SEC_WEBSOCKET_KEY"], None))
    while sock.recv(4096):
        pass
    return []
