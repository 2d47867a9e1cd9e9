"""The floor under the connect benchmark: gunicorn answering the upgrade with a bare 101.

No library and no Flask: a plain WSGI function writes the 101 and then blocks on
the socket until the client goes. It delivers nothing; compare connect times only:

    compare.sh --scenarios 'connect-1000:--clients 1000 --messages 0' \\
        --project 'gunicorn -c python:pgws_sync.gunicorn --threads 1100 ... bench.bare_upgrade:app'
"""

from typing import Any, Callable, Dict, List

from pgws_sync._core.wire import switching_protocols


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    sock = environ["gunicorn.socket"]
    sock.sendall(switching_protocols(environ["HTTP_SEC_WEBSOCKET_KEY"], None))
    while sock.recv(4096):
        pass
    return []
