"""gunicorn integration: close every socket with 1001 on SIGTERM, start listeners per worker.

Use it as a config module, ``gunicorn -c python:pgws_sync.gunicorn app:app``,
or import ``post_worker_init`` into your own config file. Without it gunicorn
waits its whole graceful timeout for open sockets and then kills them (1006).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .listener import live_listeners
from .pgws import shutdown

logger = logging.getLogger(__name__)

#: Settings this module gives gunicorn when used as its config file.
worker_class = "gthread"
threads = 100
graceful_timeout = 10

#: Seconds the SIGTERM handler waits for sockets to take their close frame.
SHUTDOWN_TIMEOUT = 5.0


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: start this worker's listeners and chain a SIGTERM handler."""
    for listener in live_listeners():
        try:
            listener.start()
        except Exception:  # a stopped listener must not stop the worker
            logger.exception("could not start listener in worker %s", worker.pid)
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        threading.Thread(target=shutdown, args=(SHUTDOWN_TIMEOUT,),
                         name="pgws-shutdown", daemon=True).start()
        if callable(gunicorn_handler):
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
