"""Health and readiness answers: a short fixed reason for the public, the detail for operators."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Dict, NamedTuple, Optional

from werkzeug.wrappers import Response

logger = logging.getLogger(__name__)

# The reasons a check may give. Each is a fixed text: a probe may compare it, and an error
# message (role names, hosts, ports) never reaches the public through it.
#: The endpoint is closing (a drain or a shutdown).
SHUTTING_DOWN = "shutting down"
#: The listener (a PostgreSQL source) is not connected.
DATABASE_UNREACHABLE = "database unreachable"
#: A Redis source is not connected.
REDIS_UNREACHABLE = "redis unreachable"
#: Another kind of source is not connected.
SOURCE_UNREACHABLE = "source unreachable"
#: A source has not connected yet (no attempt failed), or some channel is not listened to yet.
NOT_LISTENING = "not listening"
#: The durable log cannot be read (its connection is down, or the log is unusable).
LOG_UNAVAILABLE = "log unavailable"
#: Durable delivery has had work and has not moved for a while.
LOG_STALLED = "log stalled"
#: No readiness canary came back recently (or none could be sent).
CANARY_SILENT = "canary silent"

#: Every reason the library gives.
REASONS = frozenset({SHUTTING_DOWN, DATABASE_UNREACHABLE, REDIS_UNREACHABLE, SOURCE_UNREACHABLE,
                     NOT_LISTENING, LOG_UNAVAILABLE, LOG_STALLED, CANARY_SILENT})


class Health(NamedTuple):
    """One answer of a health or readiness check.

    ``reason`` is None while ``ok``, else a short fixed text (one of :data:`REASONS`
    for the library's endpoints) that the public sees. ``detail`` is for operators
    only: states, error texts, counts; it goes to the log and, with ``health_detail``,
    into the answer.
    """

    ok: bool
    reason: Optional[str]
    detail: Dict[str, Any]


def health_body(health: Health, *, detail: bool = False) -> Dict[str, Any]:
    """``{"status": "ok"}`` or ``{"status": "unavailable", "reason": ...}``, plus the detail's
    fields when ``detail`` (never replacing ``status`` or ``reason``)."""
    body: Dict[str, Any] = {"status": "ok" if health.ok else "unavailable"}
    if not health.ok:
        body["reason"] = health.reason or "unavailable"
    if detail:
        for key, value in health.detail.items():
            body.setdefault(key, value)
    return body


def health_answer(health: Health, *, detail: bool = False) -> Response:
    """The HTTP answer: 200 or 503, with :func:`health_body` as JSON."""
    return Response(json.dumps(health_body(health, detail=detail)),
                    status=200 if health.ok else 503, mimetype="application/json")


def describe(detail: Dict[str, Any]) -> str:
    """The detail as one log line: ``key: value`` pairs."""
    return "; ".join(f"{key}: {value}" for key, value in detail.items()) or "no detail"


class HealthLog:
    """Logs a check's answer when it changes, not on every request.

    The first answer of a process and a shutdown are logged at INFO (a worker
    starts unavailable while its listener connects); any later change to
    unavailable at WARNING, with the detail; the way back at INFO.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()  # guards _last
        self._last: Optional[str] = None  # the reason last seen (None: ok)
        self._seen = False  # whether any answer was seen yet

    def note(self, health: Health) -> None:
        reason = None if health.ok else (health.reason or "unavailable")
        with self._lock:
            first, previous = not self._seen, self._last
            if not first and previous == reason:
                return
            self._seen, self._last = True, reason
        if reason is None:
            if not first:
                logger.info("%s: ok again", self.what)
        elif first or reason == SHUTTING_DOWN:
            logger.info("%s: unavailable, %s (%s)", self.what, reason, describe(health.detail))
        else:
            logger.warning("%s: unavailable, %s (%s)", self.what, reason,
                           describe(health.detail))
