"""gunicorn deployment: one listener connection per worker, preload, SIGTERM, close()."""

import json
import os
import signal
import uuid
import platform
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import psutil
import psycopg2.extensions
import pytest

from pgws_sync.gunicorn import drain_setting, prestart_setting, prestart_threads
import simple_websocket

from .helpers import Gunicorn, Ws, http_get, pg_notify, raw_upgrade, serve, wait_for, wait_sockets
from .pubsub_helpers import Client, serve_pubsub


def listener_count(sender, name):
    with sender.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,))
        return cur.fetchone()[0]


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_each_worker_has_one_listener_and_delivers(pg_dsn, sender, preload):
    name = f"pgws test {uuid.uuid4().hex[:8]}"
    g = serve(pg_dsn, listener={"application_name": name}, workers=2,
              args=["--preload"] if preload else []).wait_up()
    socks = []
    try:
        wait_for(lambda: len(g.worker_pids()) == 2, message="two workers")
        workers = g.worker_pids()
        wait_for(lambda: listener_count(sender, name) == 2, message="one listener per worker")
        # connect until both workers hold sockets; each socket learns its worker by
        # a notification addressed to that worker's audience
        seen = {}
        while set(seen.values()) != set(workers):
            assert len(socks) < 200, f"all sockets went to one worker: {seen}"
            ws = Ws(g.ws_url())
            socks.append(ws)
            for pid in workers:
                pg_notify(sender, "pgws", f'worker-{pid},{{"pid": {pid}}}')
            seen[len(socks) - 1] = ws.recv_json()["payload"]["pid"]
        pg_notify(sender, "pgws", 'default,{"to": "everyone"}')
        for ws in socks:
            # any earlier worker-addressed frames for the same worker come first
            while True:
                frame = ws.recv_json()["payload"]
                if frame.get("to") == "everyone":
                    break
                assert frame["pid"] == seen[socks.index(ws)]
        assert listener_count(sender, name) == 2
    finally:
        for ws in socks:
            ws.close()
        g.stop()
    wait_for(lambda: listener_count(sender, name) == 0, message="listeners gone after stop")


def test_sigterm_closes_sockets_with_1001_promptly(pg_dsn, sender):
    name = f"pgws test {uuid.uuid4().hex[:8]}"
    g = serve(pg_dsn, listener={"application_name": name}).wait_up()
    socks = [Ws(g.ws_url()) for _ in range(5)]
    wait_sockets(g, 5)
    g.proc.send_signal(signal.SIGTERM)
    for ws in socks:
        assert ws.expect_close(timeout=15) == (1001, "server shutdown")
    g.proc.wait(20)  # the graceful timeout is 30 s: exiting sooner shows nothing waited for it
    assert "dropped" not in g.log() and "Traceback" not in g.log()
    assert listener_count(sender, name) == 0
    for ws in socks:
        ws.close()


def test_endpoint_close_sends_1001_refuses_new_sockets_and_reports_unhealthy(pg_dsn, clients):
    g = serve(pg_dsn).wait_up()
    try:
        socks = [clients(g.ws_url()) for _ in range(3)]
        wait_sockets(g, 3)
        status, body = http_get(g.url("/debug/close"))
        assert status == 200
        for ws in socks:
            assert ws.expect_close() == (1001, "server shutdown")
        sock, head = raw_upgrade(g.port)
        sock.close()
        assert head.startswith(b"HTTP/1.1 503")
        status, body = http_get(g.url("/healthz"))
        assert status == 503 and json.loads(body) == {"status": "unavailable",
                                                      "reason": "shutting down"}
    finally:
        g.stop()


def test_without_the_hook_a_health_check_starts_the_listener(pg_dsn, sender):
    """Plain gunicorn (no pgws_sync hook), preloaded: the first request of a worker,
    even a health check, starts that worker's listener."""
    name = f"pgws test {uuid.uuid4().hex[:8]}"
    g = Gunicorn(env={"PGWS_DB_URI": pg_dsn,
                      "PGWS_LISTENER_OPTIONS": json.dumps({"application_name": name})},
                 args=["-c", "/dev/null", "--worker-class", "gthread", "--preload"])
    try:
        g.wait_up(healthy=True)
        assert listener_count(sender, name) == 1
        ws = Ws(g.ws_url())
        wait_sockets(g, 1)
        pg_notify(sender, "pgws", 'default,{"no": "hook"}')
        assert ws.recv_json()["payload"] == {"no": "hook"}
        ws.close()
    finally:
        g.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_immediate_stop_still_sends_1001(pg_dsn, sig):
    """Ctrl-C reaches the master and the workers; gunicorn then quits at once."""
    g = serve(pg_dsn).wait_up()
    socks = [Ws(g.ws_url()) for _ in range(3)]
    try:
        wait_sockets(g, 3)
        for pid in [g.proc.pid] + g.worker_pids():
            os.kill(pid, sig)
        for ws in socks:
            assert ws.expect_close(timeout=15) == (1001, "server shutdown")
        g.proc.wait(20)
    finally:
        for ws in socks:
            ws.close()
        g.stop()


def test_malloc_arena_cap_applies_on_glibc_unless_the_environment_sets_it():
    code = ("from pgws_sync.gunicorn import limit_malloc_arenas as f; "
            "import sys; sys.exit(0 if f(2) else 3)")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    applied = subprocess.run([sys.executable, "-c", code], env=env).returncode
    if platform.libc_ver()[0] == "glibc":
        assert applied == 0
    env["MALLOC_ARENA_MAX"] = "4"  # the environment wins: glibc reads it itself
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 3


def pool_threads(g):
    return sum(name.startswith("ThreadPoolExecutor") for name in g.stats()["thread_names"])


@pytest.mark.parametrize("setting, expected", [(None, 32), ("all", 32), ("5", 5), ("1000", 32)],
                         ids=["default", "all", "five", "capped-at-threads"])
def test_the_hook_starts_pool_threads_before_the_worker_accepts(pg_dsn, setting, expected):
    env = {} if setting is None else {"PGWS_PRESTART_THREADS": setting}
    g = serve(pg_dsn, threads=32, extra_env=env).wait_up()
    try:
        assert pool_threads(g) == expected
        socks = [Ws(g.ws_url()) for _ in range(3)]
        wait_sockets(g, 3)
        # the sockets took idle threads: none was started for them
        assert pool_threads(g) == expected
        for ws in socks:
            ws.close()
    finally:
        g.stop()


def test_the_hook_freezes_what_the_worker_made_before_accepting(pg_dsn):
    """The app, its modules and the pool's threads are out of the collector's walks."""
    g = serve(pg_dsn, threads=8).wait_up()
    try:
        stats = g.stats()
        # without the hook nothing is frozen; with it, the tens of thousands of objects
        # a worker holds before its first request
        assert stats["gc_frozen"] > 10_000, stats["gc_frozen"]
        ws = Ws(g.ws_url())
        wait_sockets(g, 1)
        ws.close()
    finally:
        g.stop()


def test_without_prestarted_threads_each_socket_starts_one(pg_dsn):
    g = serve(pg_dsn, threads=32, extra_env={"PGWS_PRESTART_THREADS": "0"}).wait_up()
    try:
        before = pool_threads(g)
        assert before <= 2  # the health checks' and this request's
        socks = [Ws(g.ws_url()) for _ in range(3)]
        wait_sockets(g, 3)
        assert pool_threads(g) >= 3
        for ws in socks:
            ws.close()
    finally:
        g.stop()


def test_a_bad_prestart_setting_stops_gunicorn_with_a_clear_message(pg_dsn):
    g = serve(pg_dsn, extra_env={"PGWS_PRESTART_THREADS": "many"})
    try:
        assert g.proc.wait(30) != 0
        assert "PGWS_PRESTART_THREADS must be a whole number of threads or 'all', not 'many'" in g.log()
    finally:
        g.stop()


@pytest.mark.parametrize("value, expected", [("all", None), (" ALL ", None), ("0", 0), (" 12 ", 12)])
def test_prestart_setting_reads_the_environment(value, expected):
    assert prestart_setting({"PGWS_PRESTART_THREADS": value}) == expected
    assert prestart_setting({}) is None


@pytest.mark.parametrize("value", ["-1", "many", "", "1.5"])
def test_prestart_setting_refuses_anything_else(value):
    from pgws_sync.errors import ConfigError

    with pytest.raises(ConfigError, match="PGWS_PRESTART_THREADS must be a whole number"):
        prestart_setting({"PGWS_PRESTART_THREADS": value})


def test_prestart_threads_fills_a_thread_pool_and_leaves_other_workers_alone():
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        worker = SimpleNamespace(tpool=pool, cfg=SimpleNamespace(threads=8), pid=os.getpid())
        before = threading.active_count()
        assert prestart_threads(worker, 3) == 3
        assert threading.active_count() == before + 3
        assert prestart_threads(worker) == 8  # the three idle ones, and five more
        assert threading.active_count() == before + 8
        # the threads are idle: work submitted now runs on them, none is added
        assert pool.submit(threading.current_thread).result(5).name.startswith("ThreadPoolExecutor")
        assert threading.active_count() == before + 8
    finally:
        pool.shutdown()
    sync_worker = SimpleNamespace(cfg=SimpleNamespace(threads=1), pid=os.getpid())  # no pool
    assert prestart_threads(sync_worker) == 0


def _listening(pid: int, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def test_each_worker_listens_on_its_own_socket_and_sockets_spread(pg_dsn):
    """With one shared listening socket the worker that wakes first takes nearly every socket;
    the shipped settings (reuse_port) give each worker its own and the kernel spreads them."""
    g = serve_pubsub(pg_dsn, workers=2)
    clients = []
    try:
        wait_for(lambda: len(g.worker_pids()) == 2, message="two workers")
        assert not _listening(g.proc.pid, g.port)  # the master holds no listening socket
        assert all(_listening(pid, g.port) for pid in g.worker_pids())
        clients = [Client(g) for _ in range(100)]
        per_worker = {pid: sum(c.pid == pid for c in clients) for pid in g.worker_pids()}
        assert min(per_worker.values()) >= 20, per_worker  # hashed: about 50 each
    finally:
        for c in clients:
            c.close()
        g.stop()


def test_library_logs_go_through_gunicorns_error_log(pg_dsn):
    """A bare gunicorn run shows the library's lines in gunicorn's own format, at its level."""
    g = serve(pg_dsn, args=["--log-level", "debug"])
    try:
        g.wait_up()
        ws = Ws(g.ws_url())
        wait_sockets(g, 1)
        ws.close()
        wait_sockets(g, 0)
        line = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[(\w+)\] "
        log = g.log()
        connected = re.search(line.replace(r"(\w+)", "INFO") + r"listener connected to "
                              r"database '([^']+)' on (\S+) as '[^']+' \(backend pid", log)
        assert connected, log  # named: an empty DSN would listen on libpq's defaults
        params = psycopg2.extensions.parse_dsn(pg_dsn)
        assert connected.group(1) == params["dbname"]
        assert connected.group(2) == f"{params['host']}:{params['port']}"
        assert re.search(line.replace(r"(\w+)", "DEBUG") + r"socket [0-9a-f-]+ open", log)
        assert re.search(line.replace(r"(\w+)", "DEBUG") + r"socket [0-9a-f-]+ closed", log)
    finally:
        g.stop()
    quiet = serve(pg_dsn, args=["--log-level", "warning"]).wait_up()
    try:
        assert "listener connected" not in quiet.log()  # gunicorn's level applies
    finally:
        quiet.stop()


def test_sigterm_drains_sockets_in_batches_with_1012_and_a_time_to_come_back(pg_dsn):
    """PGWS_DRAIN_SECONDS: every socket is closed with 1012 and a reason saying when to
    reconnect (bench/drain.py measures how the closes spread over the window)."""
    g = serve(pg_dsn, extra_env={"PGWS_DRAIN_SECONDS": "2"}).wait_up()
    sockets = [Ws(g.ws_url()) for _ in range(30)]
    try:
        wait_sockets(g, 30)
        g.proc.send_signal(signal.SIGTERM)
        reasons = []
        for ws in sockets:
            with pytest.raises(simple_websocket.ConnectionClosed) as closed:
                ws.client.receive(timeout=15)
            assert closed.value.reason == 1012, (closed.value.reason, closed.value.message)
            reasons.append(closed.value.message)
        assert set(reasons) == {"restart: reconnect after 1.0s"}
        assert g.proc.wait(30) == 0
    finally:
        for ws in sockets:
            ws.close()
        g.stop()


@pytest.mark.parametrize("value", ["-1", "soon", "99"])
def test_a_bad_drain_setting_stops_the_worker_naming_the_variable(value):
    from pgws_sync import ConfigError

    with pytest.raises(ConfigError, match="PGWS_DRAIN_SECONDS must be seconds from 0 to 5"):
        drain_setting({"PGWS_DRAIN_SECONDS": value})
    assert drain_setting({}) == 3.0 and drain_setting({"PGWS_DRAIN_SECONDS": "0"}) == 0.0


@pytest.mark.parametrize("flask_request", [True, False], ids=["flask-route", "below-flask"])
def test_init_app_serves_sockets_with_or_without_a_flask_request(pg_dsn, sender, flask_request):
    """init_app(flask_request=False): upgrades on the path skip Flask (no before_request, a
    werkzeug Request for the hooks); plain HTTP on that path and other routes still go to Flask."""
    g = serve(pg_dsn, extra_env={"PGWS_FLASK_REQUEST": "1" if flask_request else "0"}).wait_up()
    socks = []
    try:
        socks = [Ws(g.ws_url(), headers={"X-Audience": "default"}) for _ in range(3)]
        wait_sockets(g, 3)
        pg_notify(sender, "pgws", 'default,{"n": 1}')
        assert [ws.recv_json()["payload"] for ws in socks] == [{"n": 1}] * 3
        status, body = http_get(g.url("/ws"))
        assert status == 426 and "WebSocket" in body
        stats = g.stats()
        assert "/ws" in stats["before_request_paths"]  # the plain GET went through Flask
        assert ("/ws (upgrade)" in stats["before_request_paths"]) is flask_request
        assert stats["request_types"] == (["flask"] if flask_request else ["werkzeug"])
        # a refused upgrade is answered the same way below Flask
        sock, head = raw_upgrade(g.port, headers={"Sec-WebSocket-Version": "8"})
        sock.close()
        assert head.startswith(b"HTTP/1.1 426 ")
    finally:
        for ws in socks:
            ws.close()
        g.stop()


def test_the_server_says_where_it_listens(pg_dsn):
    """gunicorn's own line names no address under reuse_port; the hook's line does."""
    g = serve(pg_dsn).wait_up()
    try:
        assert f"serving on http://127.0.0.1:{g.port} (each worker binds it: reuse_port)" \
            in g.log()
    finally:
        g.stop()
