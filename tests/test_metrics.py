"""Prometheus metrics: a real prometheus server scraping a two-worker gunicorn sees the sum of
both workers; failures show up in the metric that counts them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from pgws_sync import Connection, _metrics
from pgws_sync._core.hub import Hub
from pgws_sync.jwt.settings import create_gateway_app, settings_from_environ
from pgws_sync.pgws.gateway import create_app

from . import programs
from .helpers import Gunicorn, ROOT, Ws, http_get, raw_upgrade, scrape, serve, value, wait_for
from .pgserver import free_port
from .pubsub_helpers import Client, serve_pubsub
from .durable_helpers import new_log, publish_many, serve_durable


class Prometheus:
    """A real prometheus server scraping ``target`` every second."""

    def __init__(self, target: str) -> None:
        binary = programs.require("prometheus")
        self.dir = Path(tempfile.mkdtemp(prefix="pgws-prometheus-"))
        self.port = free_port()
        config = self.dir / "prometheus.yml"
        config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: pgws_sync
    static_configs:
      - targets: ["{target}"]
""")
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql})
        try:
            status, body = http_get(url)
        except OSError:
            return None
        if status != 200:
            return None
        result = json.loads(body)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_two_workers(pg_dsn: str) -> Iterator[Gunicorn]:
    g = serve(pg_dsn, options={"metrics_path": "/metrics"}, workers=2).wait_up()
    yield g
    g.stop()


@pytest.fixture
def two_workers(shared_two_workers: Gunicorn) -> Gunicorn:
    """The module's two-worker server, once no socket of an earlier test is open on it: every
    test starts from no socket, whichever tests ran (or were skipped) before it."""
    wait_for(lambda: value(shared_two_workers, "pgws_sync_sockets_open{") == 0,
             message="the sockets of earlier tests closed")
    return shared_two_workers


def test_prometheus_sees_the_sum_of_both_workers_sockets(two_workers):
    prometheus = Prometheus(f"127.0.0.1:{two_workers.port}")  # skips without prometheus
    sockets = []
    try:
        sockets.extend(Ws(two_workers.ws_url()) for _ in range(12))
        wait_for(lambda: value(two_workers, "pgws_sync_sockets_open{") == 12,
                 message="12 sockets counted by any worker's scrape")
        per_worker = [c.pid for c in psutil_children(two_workers)]
        assert len(per_worker) == 2
        wait_for(lambda: prometheus.query('sum(pgws_sync_sockets_open{endpoint="Pgws"})') == 12,
                 timeout=60, message="prometheus to see the 12 sockets of both workers")
        for ws in sockets[:5]:
            ws.close()
        wait_for(lambda: prometheus.query("sum(pgws_sync_sockets_open)") == 7, timeout=30,
                 message="prometheus to see 5 of them closed")
        assert prometheus.query('sum(pgws_sync_sockets_closed_total{code="client"})') >= 5
        assert prometheus.query("max(pgws_sync_socket_queue_depth_max)") == 0  # all read
        check_dashboard(prometheus, scrape(two_workers))
    finally:
        for ws in sockets:
            ws.close()
        prometheus.stop()


def check_dashboard(prometheus: Prometheus, scraped: Dict[str, float]) -> None:
    """examples/grafana-dashboard.json: every query is valid PromQL for a real Prometheus, and
    every metric it names is one the library exports."""
    from pgws_sync._metrics import DEFINITIONS


    known = {f"pgws_sync_{name}" for _, name, _, _, _ in DEFINITIONS}
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        for name in re.findall(r"pgws_sync_\w+", expr):
            assert re.sub(r"_(total|bucket|sum|count)$", "", name) in known, name
        url = f"http://127.0.0.1:{prometheus.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr})
        status, body = http_get(url)
        assert status == 200 and json.loads(body)["status"] == "success", (expr, body)
    assert any(k.startswith("pgws_sync_sockets_open{") for k in scraped)


def psutil_children(server: Gunicorn) -> Any:
    import psutil

    return psutil.Process(server.proc.pid).children()


def test_refused_upgrades_are_counted_by_status(two_workers):
    before = value(two_workers, 'pgws_sync_sockets_refused_total{endpoint="Pgws",status="400"}')
    sock, head = raw_upgrade(two_workers.port, headers={"Sec-WebSocket-Key": "not base64"})
    sock.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert value(two_workers,
                 'pgws_sync_sockets_refused_total{endpoint="Pgws",status="400"}') == before + 1


def test_a_killed_listener_counts_a_reconnect_and_the_source_is_up_again(two_workers, sender):
    ws = Ws(two_workers.ws_url())
    try:
        wait_for(lambda: value(two_workers, "pgws_sync_sockets_open{") == 1, message="the socket")
        resyncs = value(two_workers,
                        'pgws_sync_control_frames_total{endpoint="Pgws",event="resync"}')
        reconnects = value(two_workers, 'pgws_sync_source_reconnects_total{source="listener"}')
        with sender.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'pgws_sync listener'")
        wait_for(lambda: value(two_workers, 'pgws_sync_source_reconnects_total{source="listener"}')
                 >= reconnects + 2, message="both workers' listeners counted their reconnect")
        wait_for(lambda: value(two_workers, 'pgws_sync_source_up{source="listener"}') >= 1,
                 message="the listeners up again")
        assert ws.recv_json()["event"] == "resync"
        wait_for(lambda: value(two_workers, 'pgws_sync_control_frames_total{endpoint="Pgws",'
                               'event="resync"}') == resyncs + 1, message="the resync counted")
    finally:
        ws.close()


def test_publish_failures_are_counted_by_cause(pg_server):
    g = serve_pubsub(pg_server.dsn, options={"metrics_path": "/metrics"})
    try:
        c = Client(g, headers={"X-User": "ann"})
        assert c.request(action="publish", channel="m", payload=1, id=1)["event"] == "published"
        assert value(g, 'pgws_sync_publishes_total{kind="publish"}') == 1
        c.close()
        pg_server.stop()  # the pool's connection breaks, and no new one can be made
        request = urllib.request.Request(g.url("/debug/publish"), method="POST",
                                         data=b'{"channel": "m", "message": 2}',
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError):  # PublishFailed: a 500 from the test app
            urllib.request.urlopen(request, timeout=30)
        assert value(g, 'pgws_sync_publish_failures_total{cause="unreachable",kind="publish"}') == 1
    finally:
        g.stop()
        pg_server.start()


def test_slow_clients_dropped_frames_gaps_and_resyncs_are_counted():
    """In this process, with real Connection objects: each failure moves its counter."""
    from prometheus_client import REGISTRY


    _metrics.enable()

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    hub = Hub("TestHub")
    slow, dropping = Connection([], max_queue=1), Connection([], max_queue=1)
    dropping.label = "TestHub"
    for conn in (slow, dropping):
        hub.add(conn)
    hub.join(slow, "k")
    hub.join(dropping, "k", drop_as="k")
    before = {name: sample(name, endpoint="TestHub") for name in (
        "pgws_sync_slow_clients_dropped_total", "pgws_sync_frames_dropped_total",
        "pgws_sync_messages_delivered_total")}
    hub.fan_out([("k", "1")])  # both take it
    hub.fan_out([("k", "2")])  # neither has room: slow is dropped, dropping loses a frame
    assert sample("pgws_sync_messages_delivered_total", endpoint="TestHub") == \
        before["pgws_sync_messages_delivered_total"] + 2
    assert sample("pgws_sync_slow_clients_dropped_total", endpoint="TestHub") == \
        before["pgws_sync_slow_clients_dropped_total"] + 1
    assert sample("pgws_sync_frames_dropped_total", endpoint="TestHub") == \
        before["pgws_sync_frames_dropped_total"] + 1
    gaps = sample("pgws_sync_control_frames_total", endpoint="TestHub", event="gap")
    dropping._queue.get_nowait()  # the client read: the gap frame is written before the next
    dropping._queue.task_done()
    hub.fan_out([("k", "3")])
    assert sample("pgws_sync_control_frames_total", endpoint="TestHub", event="gap") == gaps + 1


def test_serve_metrics_flag_serves_metrics_in_both_gateways(pg_dsn):
    """``pgws-sync serve --metrics`` builds its apps with /metrics (plain and JWT mode)."""
    plain = create_app(pg_dsn, ["pgws"], metrics=True)
    assert plain.test_client().get("/metrics").status_code == 200
    assert create_app(pg_dsn, ["pgws"]).test_client().get("/metrics").status_code == 404
    settings = settings_from_environ({"PGWS_JWT_SECRET": "s" * 32}, dsn=pg_dsn)
    gateway = create_gateway_app(settings, metrics=True)
    try:
        from werkzeug.test import Client as WsgiClient

        response = WsgiClient(gateway).get("/metrics")
        assert response.status_code == 200 and b"pgws_sync_" in response.data
    finally:
        gateway.close(0)
    for app in (plain,):
        app.extensions["pgws_sync"].close(0)


def test_the_durable_log_is_measured_and_replays_are_counted(pg_dsn):
    schema = new_log(pg_dsn)
    g = serve_durable(pg_dsn, schema, {"metrics_path": "/metrics"})
    try:
        publish_many(pg_dsn, schema, (("m", n) for n in range(5)))  # numbered by the server
        c = Client(g)
        reply = c.request(action="subscribe", channel="m", since=2, id=1)
        assert reply["event"] == "subscribed" and reply["offset"] == 5
        assert [c.recv_json()["offset"] for _ in range(3)] == [3, 4, 5]
        assert c.request(action="subscribe", channel="m", since=1, epoch="other",
                         id=2)["event"] == "resync_required"
        label = '{endpoint="App"}'
        assert value(g, f"pgws_sync_messages_replayed_total{label}") == 3
        assert value(g, f"pgws_sync_log_messages{label}") == 5
        assert value(g, f"pgws_sync_log_oldest_message_age_seconds{label}") >= 0
        assert value(g, 'pgws_sync_control_frames_total{endpoint="App",'
                        'event="resync_required"}') == 1
        publish_many(pg_dsn, schema, [("m", "live")])
        assert c.recv_json()["offset"] == 6
        assert value(g, 'pgws_sync_socket_writes_total{endpoint="App"') == 1  # direct or queued
        assert value(g, f"pgws_sync_messages_delivered_total{label}") == 1
        c.close()
    finally:
        g.stop()
