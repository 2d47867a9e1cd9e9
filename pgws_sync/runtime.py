"""What runs in this process: its endpoints and sources, and :func:`shutdown` for all of them."""

from __future__ import annotations

from typing import List

from ._core.endpoint import WebSocketEndpoint, live_endpoints
from ._core.reader import stop_reader
from .sources.base import SourceThread, live_sources

__all__ = ["live_endpoints", "live_sources", "shutdown", "start_sources"]


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


def shutdown(timeout: float = 5.0) -> None:
    """Close every endpoint of this process (1001), stop every source and the shared reader.

    This is what the gunicorn hook runs on SIGTERM.
    """
    endpoints: List[WebSocketEndpoint] = live_endpoints()
    for endpoint in endpoints:
        endpoint.close(timeout)
    for source in live_sources():
        source.stop(timeout)
    stop_reader(timeout)
