"""What runs in this process: its endpoints and sources, and :func:`shutdown` for all of them."""

from __future__ import annotations

import logging
import threading
from typing import List

from ._core.endpoint import WebSocketEndpoint, live_endpoints
from ._core.reader import stop_reader
from ._threads import gather
from .sources.base import SourceThread, live_sources

__all__ = ["hurry", "live_endpoints", "live_sources", "prepare_endpoints", "shutdown",
           "start_sources"]

logger = logging.getLogger(__name__)


def start_sources() -> List[SourceThread]:
    """Start every source created so far in this process (listeners, Redis sources).

    Returns those that could not start (stopped ones), for the caller to report.
    """
    failed = []
    for source in live_sources():
        try:
            source.start()
        except Exception:  # a stopped source must not stop the others
            failed.append(source)
    return failed


def prepare_endpoints() -> None:
    """Start every endpoint's machinery in this process now (a durable endpoint's log
    reader and sequencer), so health is right from boot, before any request."""
    for endpoint in live_endpoints():
        try:
            endpoint.prepare()
        except Exception:  # one endpoint must not keep the others from starting
            logger.exception("could not start endpoint %r", endpoint)


def shutdown(timeout: float = 5.0, *, drain: float = 0.0) -> None:
    """Close every endpoint of this process, stop every source and the shared reader.

    ``drain`` seconds spread the closes out (1012, "reconnect after N s"); 0 closes
    every socket at once with 1001. Endpoints close side by side. This is what the
    gunicorn hook runs on SIGTERM (with ``PGWS_DRAIN_SECONDS``).
    """
    endpoints: List[WebSocketEndpoint] = live_endpoints()
    threads = [threading.Thread(target=endpoint.close, args=(timeout,), kwargs={"drain": drain},
                                name=f"pgws-close-{i}", daemon=True)
               for i, endpoint in enumerate(endpoints)]
    for thread in threads:
        thread.start()
    gather(threads, drain + timeout + 1.0)
    for source in live_sources():
        source.stop(timeout)
    stop_reader(timeout)


def hurry() -> None:
    """Make drains under way close their remaining sockets at once."""
    for endpoint in live_endpoints():
        endpoint.hurry()
