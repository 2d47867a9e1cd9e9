"""gunicorn deployment: one listener connection per worker, preload, SIGTERM, close()."""

import json
import os
import signal
import uuid

import pytest

from .conftest import pg_notify
from .helpers import Ws, http_get, raw_upgrade, serve, wait_for, wait_sockets


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
        assert status == 503 and json.loads(body)["closing"] is True
    finally:
        g.stop()


def test_without_the_hook_a_health_check_starts_the_listener(pg_dsn, sender):
    """Plain gunicorn (no pgws_sync hook), preloaded: the first request of a worker,
    even a health check, starts that worker's listener."""
    from .helpers import Gunicorn

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
    import platform
    import subprocess
    import sys

    code = ("from pgws_sync.gunicorn import limit_malloc_arenas as f; "
            "import sys; sys.exit(0 if f(2) else 3)")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    applied = subprocess.run([sys.executable, "-c", code], env=env).returncode
    if platform.libc_ver()[0] == "glibc":
        assert applied == 0
    env["MALLOC_ARENA_MAX"] = "4"  # the environment wins: glibc reads it itself
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 3
