"""Setups where notifications cannot arrive are refused at start with one line naming the cause
and the fix: a real PgBouncer in transaction mode, a real streaming replica. And /readyz."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator
import json

import pytest
import psycopg2

from pgws_sync import ConfigError, Listener, Pgws, migrate, publish_durable
from pgws_sync.sources.canary import check_listening

from . import programs
from .clirun import no_database_env, run_cli
from .helpers import Gunicorn, http_get, wait_for
from .pgserver import SYSTEM_USER, PgServer, free_port
from .durable_helpers import new_log
from .pubsub_helpers import Client


class PgBouncer:
    """A real pgbouncer in front of ``server``, pool_mode ``mode``, on a free port."""

    def __init__(self, server: PgServer, mode: str) -> None:
        binary = programs.require("pgbouncer")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgws-bouncer-"))
        self.dir.chmod(0o777)
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(f"""[databases]
postgres = host=127.0.0.1 port={server.port} dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = {mode}
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
""")
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        for f in self.dir.iterdir():
            f.chmod(0o666)
        kwargs = {"user": SYSTEM_USER} if os.geteuid() == 0 else {}
        self.proc = subprocess.Popen([binary, str(ini)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, **kwargs)
        wait_for(self._answers, 20, "pgbouncer to accept connections")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            log = self.dir / "pgbouncer.log"
            raise AssertionError(f"pgbouncer exited: {log.read_text() if log.exists() else ''}")
        try:
            psycopg2.connect(self.dsn, connect_timeout=2).close()
            return True
        except psycopg2.Error:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def primary() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def transaction_pooler(primary: PgServer) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(primary, "transaction")
    yield bouncer
    bouncer.stop()


REFUSAL_POOLER = "a connection pooler in transaction mode (PgBouncer pool_mode = transaction)"
REFUSAL_STANDBY = "is a hot standby (in recovery): it cannot LISTEN"


def test_the_check_passes_a_direct_session_and_a_session_pool(primary):
    assert check_listening(primary.dsn) is True
    bouncer = PgBouncer(primary, "session")
    try:
        assert check_listening(bouncer.dsn) is True
    finally:
        bouncer.stop()
    assert check_listening(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
                           timeout=1) is False  # unreachable: nothing known, nothing refused


def test_a_transaction_mode_pooler_is_refused(transaction_pooler):
    with pytest.raises(ConfigError) as info:
        check_listening(transaction_pooler.dsn, timeout=2)
    assert REFUSAL_POOLER in str(info.value) and "direct session" in str(info.value)


def test_serve_refuses_a_transaction_mode_pooler_in_one_line(transaction_pooler):
    result = run_cli("serve", "--dsn", transaction_pooler.dsn, "--bind",
                     f"127.0.0.1:{free_port()}", env=no_database_env(), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and REFUSAL_POOLER in lines[0], result.stderr


def test_a_gunicorn_worker_refuses_to_boot_behind_the_pooler(transaction_pooler):
    g = Gunicorn(env={"PGWS_DB_URI": transaction_pooler.dsn, "PGWS_CHANNELS": '["pgws"]'})
    try:
        assert g.proc.wait(60) != 0  # the worker exits 3: gunicorn stops
        refusals = [line for line in g.log().splitlines() if "refuses to start" in line]
        assert refusals and REFUSAL_POOLER in refusals[0]
    finally:
        g.stop()


def test_a_hot_standby_is_refused(primary):
    standby = primary.replica()
    try:
        with pytest.raises(ConfigError, match=re.escape(REFUSAL_STANDBY)):
            check_listening(standby.dsn)
        result = run_cli("serve", "--dsn", standby.dsn, "--bind", f"127.0.0.1:{free_port()}",
                         env=no_database_env(), timeout=60)
        assert result.returncode == 2 and REFUSAL_STANDBY in result.stderr
        assert "Point the listener (and publishing) at the primary" in result.stderr
    finally:
        standby.destroy()


def test_readyz_needs_a_canary_back_and_says_why_not(primary):
    g = Gunicorn(env={"PGWS_DB_URI": primary.dsn, "PGWS_CHANNELS": '["pgws"]',
                      "PGWS_OPTIONS": '{"canary_interval": 0.2}'}).wait_up()
    try:
        wait_for(lambda: http_get(g.url("/readyz"))[0] == 200, message="ready")
        assert http_get(g.url("/readyz"))[1] == '{"status": "ok"}'
    finally:
        g.stop()
    endpoint = Pgws(Listener(primary.dsn), "pgws")
    endpoint.close(0)  # a drain has begun
    status = endpoint.ready_response()
    assert status.status_code == 503
    assert status.get_json() == {"status": "unavailable", "reason": "shutting down"}


def durable_app(dsn: str, schema: str, workers: int = 1) -> Gunicorn:
    return Gunicorn("tests.apps.pubsub_app:app", workers=workers, env={
        "PGWS_DB_URI": dsn, "PGWS_OPTIONS": json.dumps({"durable": True, "log_schema": schema})})


def test_a_durable_endpoint_without_its_log_refuses_to_boot_and_says_how_to_fix_it(pg_dsn):
    g = durable_app(pg_dsn, "no_such_log")
    try:
        assert g.proc.wait(60) != 0
        refusals = [line for line in g.log().splitlines() if "refuses to start" in line]
        assert refusals, g.log()
        assert "the durable log is missing: no table no_such_log.meta" in refusals[0]
        assert "pgws-sync migrate --dsn" in refusals[0]
    finally:
        g.stop()


def test_a_worker_joining_a_running_instance_without_its_log_starts_and_recovers(pg_dsn):
    # gunicorn answers a worker's exit 3 by stopping every worker: a replacement worker
    # that finds the log gone must not take down the instance that serves
    schema = new_log(pg_dsn)
    server = durable_app(pg_dsn, schema, workers=2).wait_up()
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    try:
        first = set(server.worker_pids())
        seen = set()

        def both_serve() -> bool:  # a worker still booting when the log goes would refuse
            client = Client(server)
            seen.add(client.pid)
            client.close()
            return seen == first
        wait_for(both_serve, 30, "both workers to serve")
        with admin.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        os.kill(min(first), signal.SIGKILL)
        joined = "this worker replaces one of a running instance: it starts anyway"
        wait_for(lambda: joined in server.log(), 30, "the replacement worker's ERROR line")
        line = next(line for line in server.log().splitlines() if joined in line)
        assert f"the durable log is missing: no table {schema}.meta" in line
        assert "refuses to start" not in server.log()
        new = (set(server.worker_pids()) - first).pop()
        assert server.proc.poll() is None and http_get(server.url("/healthz"))[0] in (200, 503)
        migrate(admin, schema=schema)

        def on_the_new_worker() -> Client:
            while True:
                client = Client(server)
                if client.pid == new:
                    return client
                client.close()
        client = on_the_new_worker()  # reuse_port: the kernel picks; some land there
        reply: dict = {}

        def subscribed() -> bool:
            reply.update(client.request(action="subscribe", channel="back", id="s"))
            return reply.get("event") == "subscribed"
        wait_for(subscribed, 30, "the new worker to use the recreated log")
        publish_durable(admin, "back", {"n": 1}, schema=schema)
        frame = client.recv_json(timeout=15)
        assert (frame["channel"], frame["payload"], frame["offset"]) == ("back", {"n": 1}, 1)
        client.close()
    finally:
        admin.close()
        server.stop()


def test_a_role_without_rights_on_the_log_is_refused_naming_the_right(pg_dsn):
    import psycopg2.extensions


    schema = new_log(pg_dsn)
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgws_reader")
        cur.execute("CREATE ROLE pgws_reader LOGIN")
        cur.execute(f"GRANT USAGE ON SCHEMA {schema} TO pgws_reader")
        cur.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO pgws_reader")
    dsn = psycopg2.extensions.make_dsn(pg_dsn, user="pgws_reader")
    g = durable_app(dsn, schema)
    try:
        assert g.proc.wait(60) != 0
        refusals = [line for line in g.log().splitlines() if "refuses to start" in line]
        assert refusals, g.log()
        assert f"cannot use the durable log in schema '{schema}': it lacks UPDATE on " \
               f"{schema}.meta" in refusals[0]
        assert f"pgws-sync migrate --schema {schema} --grant pgws_reader" in refusals[0]
        assert f'GRANT USAGE ON SCHEMA "{schema}" TO "pgws_reader"' in refusals[0]
    finally:
        g.stop()
        with admin.cursor() as cur:
            cur.execute("DROP OWNED BY pgws_reader")
            cur.execute("DROP ROLE pgws_reader")
        admin.close()
