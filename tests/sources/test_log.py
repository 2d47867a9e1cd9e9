"""The durable log's rights errors: every missing right is one line naming the role, the right
and the GRANTs that fix it (a worker's check, publishing, and migrate)."""

from __future__ import annotations

from typing import Any, Iterator, List
import re

import psycopg2
import psycopg2.extensions
import pytest

from pgws_sync import LogUnavailable, migrate, publish_durable
from pgws_sync.sources.log import check_rights, log_info

from ..clirun import no_database_env, run_cli
from ..durable_helpers import new_log
from ..helpers import ROOT

ROLE = "pgws_rights"


@pytest.fixture
def role(pg_dsn: str) -> Iterator[str]:
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP OWNED BY {ROLE}" if _exists(cur) else "SELECT 1")
        cur.execute(f"DROP ROLE IF EXISTS {ROLE}")
        cur.execute(f"CREATE ROLE {ROLE} LOGIN")
    try:
        yield ROLE
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP OWNED BY {ROLE}")
            cur.execute(f"DROP ROLE {ROLE}")
        admin.close()


def _exists(cur: Any) -> bool:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,))
    return cur.fetchone() is not None


def grant(pg_dsn: str, statements: List[str]) -> None:
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    admin.close()


def worker_check(dsn: str, schema: str) -> str:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(LogUnavailable) as info:
            log_info(cur, schema)
            check_rights(cur, schema)
        return str(info.value)
    finally:
        conn.close()


CASES = {
    # what the owner granted -> what the worker's line says it lacks
    "nothing (right after migrate)": ([], "permission denied for schema"),
    "usage only": (["GRANT USAGE ON SCHEMA {s} TO {r}"], "permission denied for table meta"),
    "usage and select": (["GRANT USAGE ON SCHEMA {s} TO {r}",
                          "GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {r}"],
                         "it lacks UPDATE on {s}.meta"),
    "every table right, no execute": (
        ["GRANT USAGE ON SCHEMA {s} TO {r}",
         "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
         "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} FROM PUBLIC"],
        "it lacks EXECUTE on {s}.publish"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_worker_lacking_a_right_gets_one_line_with_its_role_and_the_grants(pg_dsn, role,
                                                                             case):
    schema = new_log(pg_dsn)
    granted, lacks = CASES[case]
    grant(pg_dsn, [g.format(s=schema, r=role) for g in granted])
    line = worker_check(psycopg2.extensions.make_dsn(pg_dsn, user=role), schema)
    assert "\n" not in line
    assert line.startswith(f"the role {role} cannot use the durable log in schema '{schema}': ")
    assert lacks.format(s=schema) in line
    assert f"pgws-sync migrate --schema {schema} --grant {role}" in line
    assert f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"' in line


def test_the_printed_grants_are_all_a_worker_needs(pg_dsn, role):
    schema = new_log(pg_dsn)
    migrate(pg_dsn, schema=schema, grant=[role])
    conn = psycopg2.connect(psycopg2.extensions.make_dsn(pg_dsn, user=role))
    conn.autocommit = True
    with conn.cursor() as cur:
        log_info(cur, schema)
        check_rights(cur, schema)
    conn.close()


def test_migrate_without_create_names_the_role_the_database_and_the_grant(pg_dsn, role):
    dsn = psycopg2.extensions.make_dsn(pg_dsn, user=role)
    with pytest.raises(LogUnavailable) as info:
        migrate(dsn, schema=f"never_{role}")
    line = str(info.value)
    assert "\n" not in line
    assert f"the role {role} cannot create or upgrade the durable log" in line
    assert "permission denied for database postgres" in line
    assert f'GRANT CREATE ON DATABASE "postgres" TO "{role}"' in line
    result = run_cli("migrate", "--dsn", dsn, "--schema", f"never_{role}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"the role {role} cannot create" in result.stderr


def test_the_dba_block_of_the_durable_guide_runs_and_prints_its_grants(pg_dsn):
    """docs/guides/durable.md, "For the DBA": the command as written (its address swapped),
    the GRANTs it prints as shown, and the roles then do what the page says."""
    page = (ROOT / "docs" / "guides" / "durable.md").read_text()
    command = re.search(r"<!-- recipe: dba -->\n```sh\n(.*?)```", page, re.S).group(1).split()
    shown = re.search(r"It creates \(or upgrades\) the log and runs, printing each:\n\n```sql\n"
                      r"(.*?)```", page, re.S).group(1).splitlines()
    assert command[:2] == ["pgws-sync", "migrate"]
    args = command[1:]
    args[args.index("--dsn") + 1] = pg_dsn
    roles = ("app_web", "app_jobs")
    grant(pg_dsn, [f"DROP ROLE IF EXISTS {r}" for r in roles]
          + [f"CREATE ROLE {r} LOGIN" for r in roles])
    try:
        result = run_cli(*args, env=no_database_env())
        assert result.returncode == 0, result.stderr
        printed = [line for line in result.stdout.splitlines() if line.startswith("GRANT")]
        assert [p + ";" for p in printed] == shown
        worker_dsn = psycopg2.extensions.make_dsn(pg_dsn, user="app_web")
        conn = psycopg2.connect(worker_dsn)
        with conn.cursor() as cur:
            log_info(cur)
            check_rights(cur)
        conn.close()
        jobs = psycopg2.connect(psycopg2.extensions.make_dsn(pg_dsn, user="app_jobs"))
        with jobs:
            publish_durable(jobs, "dba-recipe", {"ok": True})
        jobs.close()
    finally:
        grant(pg_dsn, [s for r in roles for s in (f"DROP OWNED BY {r}", f"DROP ROLE {r}")])
