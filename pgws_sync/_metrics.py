"""Prometheus metrics: defined once, recorded by every layer, no-ops until an endpoint asks for them.

prometheus_client is an optional dependency (the ``metrics`` extra). Nothing is
recorded, and it is not even imported, until :func:`enable` is called (an
endpoint with a ``metrics_path`` does). Under gunicorn the hook points
``PROMETHEUS_MULTIPROC_DIR`` at a directory of its own, so every worker's figures
are summed when any worker is scraped.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigError

_lock = threading.Lock()
_metrics: Optional[Dict[str, Any]] = None  # name -> metric, once enabled

#: Delivery lag buckets, seconds: from a message's publishing to its hand-over to the sockets.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: (kind, name, help, labels, extra): every metric, in one table.
DEFINITIONS: Tuple[Tuple[str, str, str, Tuple[str, ...], Dict[str, Any]], ...] = (
    ("gauge", "sockets_open", "WebSocket connections open now", ("endpoint",),
     {"multiprocess_mode": "livesum"}),
    ("counter", "sockets_opened", "WebSocket connections opened", ("endpoint",), {}),
    ("counter", "sockets_refused", "Upgrade requests refused, by HTTP status",
     ("endpoint", "status"), {}),
    ("counter", "sockets_closed", "WebSocket connections ended, by close code (or 'client', "
     "'lost')", ("endpoint", "code"), {}),
    ("gauge", "socket_queue_depth_max", "The longest send queue of a socket, in frames, at the "
     "last scrape", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("counter", "messages_delivered", "Frames handed to sockets (one per socket and frame)",
     ("endpoint",), {}),
    ("counter", "socket_writes", "Hand-overs to sockets, by how: 'direct' (written at once by the "
     "delivering thread) or 'queued' (left to the socket's writer)", ("endpoint", "how"), {}),
    ("counter", "slow_clients_dropped", "Sockets closed with 1013 for reading too slowly",
     ("endpoint",), {}),
    ("counter", "frames_dropped", "Frames lost by sockets under the drop policy", ("endpoint",), {}),
    ("counter", "frames_rate_limited", "Client frames refused for exceeding client_rate "
     "(answered 'rate limited', not acted on)", ("endpoint",), {}),
    ("counter", "sockets_rate_limited", "Sockets closed with 1008 for exceeding client_rate "
     "again and again", ("endpoint",), {}),
    ("counter", "control_frames", "gap, resync, resync_required and pong frames sent",
     ("endpoint", "event"), {}),
    ("counter", "messages_replayed", "Durable messages paged from the log to sockets that "
     "resumed or fell behind", ("endpoint",), {}),
    ("histogram", "delivery_lag_seconds", "From a message's publishing to its hand-over to "
     "the sockets (messages that carry their publishing time)", ("endpoint",),
     {"buckets": LAG_BUCKETS}),
    ("gauge", "source_up", "1 while a source (listener, Redis) is connected", ("source",),
     {"multiprocess_mode": "livemin"}),
    ("counter", "source_reconnects", "Connections a source lost or could not make", ("source",), {}),
    ("gauge", "source_last_message_timestamp_seconds", "When a source last received a message "
     "(unix time)", ("source",), {"multiprocess_mode": "livemax"}),
    ("gauge", "notification_queue_usage", "pg_notification_queue_usage(): how full "
     "PostgreSQL's notification queue is (0 to 1)", (), {"multiprocess_mode": "livemax"}),
    ("gauge", "log_messages", "Messages the durable log keeps (all channels)", ("endpoint",),
     {"multiprocess_mode": "livemax"}),
    ("gauge", "log_oldest_message_age_seconds", "Age of the oldest message the durable log "
     "keeps", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("gauge", "log_intake_messages", "Committed durable messages waiting to be numbered by "
     "the sequencer", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("gauge", "log_intake_age_seconds", "Age of the oldest committed durable message waiting "
     "to be numbered (the sequencer's lag)", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("gauge", "log_delivery_stalled_seconds", "How long durable delivery has not moved although "
     "it had work (0 while it moves)", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("counter", "log_reads", "Reads of the durable log by a process given log_read_dsn, by "
     "where they went: 'replica' or 'primary'", ("endpoint", "source"), {}),
    ("counter", "log_replica_fallbacks", "Times durable log reads went back to the primary, by "
     "why: 'lag' (the replica had not replayed far enough in log_read_max_wait) or 'lost'",
     ("endpoint", "reason"), {}),
    ("gauge", "log_replica_in_use", "1 while this process reads the durable log from the "
     "replica (summed: the processes that do)", ("endpoint",), {"multiprocess_mode": "livesum"}),
    ("gauge", "log_replica_lag_bytes", "Bytes of WAL the replica had still to replay when the "
     "log was last read (0: caught up)", ("endpoint",), {"multiprocess_mode": "livemax"}),
    ("counter", "log_sequenced", "Durable messages numbered by this process's sequencer",
     ("log",), {}),
    ("gauge", "log_sequencer_elected", "1 while this process is the durable log's elected "
     "sequencer", ("log",), {"multiprocess_mode": "livesum"}),
    ("counter", "publishes", "Messages published through the database", ("kind",), {}),
    ("counter", "publish_failures", "Publishes the database did not take, by cause",
     ("kind", "cause"), {}),
    ("histogram", "publish_seconds", "How long a publish took", ("kind",), {}),
)


def enable() -> None:
    """Record metrics in this process from now on; :class:`ConfigError` without prometheus_client."""
    global _metrics
    with _lock:
        if _metrics is not None:
            return
        try:
            import prometheus_client
        except ImportError:
            raise ConfigError("metrics need the prometheus_client package: install pgws_sync "
                              "with its metrics extra (from a checkout: pip install "
                              "'.[metrics]'), or pip install prometheus_client") from None
        made: Dict[str, Any] = {}
        classes = {"gauge": prometheus_client.Gauge, "counter": prometheus_client.Counter,
                   "histogram": prometheus_client.Histogram}
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        for kind, name, text, labels, extra in DEFINITIONS:
            options = dict(extra)
            if not multiprocess:
                options.pop("multiprocess_mode", None)
            made[name] = classes[kind](f"pgws_sync_{name}", text, labels, **options)
        _metrics = made


def enabled() -> bool:
    return _metrics is not None


def inc(name: str, amount: float = 1.0, **labels: str) -> None:
    """Add ``amount`` to counter ``name`` (nothing while metrics are off)."""
    metrics = _metrics
    if metrics is not None and amount:
        metric = metrics[name]
        (metric.labels(**labels) if labels else metric).inc(amount)


def set_gauge(name: str, value: float, **labels: str) -> None:
    metrics = _metrics
    if metrics is not None:
        metric = metrics[name]
        (metric.labels(**labels) if labels else metric).set(value)


def add_gauge(name: str, amount: float, **labels: str) -> None:
    metrics = _metrics
    if metrics is not None:
        metrics[name].labels(**labels).inc(amount)


def observe(name: str, value: float, **labels: str) -> None:
    metrics = _metrics
    if metrics is not None:
        metric = metrics[name]
        (metric.labels(**labels) if labels else metric).observe(value)


def exposition() -> Tuple[bytes, str]:
    """(body, content type) of a scrape: every worker's figures summed under gunicorn."""
    import prometheus_client
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
