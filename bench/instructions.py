"""What publishing and numbering cost PostgreSQL, in instructions (valgrind's callgrind).

CPU time and commits per second swing with whatever else the machine runs; an
instruction count does not. This runs a throw-away PostgreSQL in single-user mode
under ``valgrind --tool=callgrind`` on a fresh copy of one prepared cluster for every
count, and prints:

- per app transaction (UPDATE one row of 1000, then one more statement, all
  prepared): nothing more, a plain INSERT into a table of the app's, an INSERT
  into the log's intake written by hand, and ``publish()``;
- per message numbered by ``sequence()``, with messages committed in batches of
  1, 50 and 400 (a quiet log, a busy one, a flooded one) over 32 channels.

Each figure is the difference of two runs (N and 3N transactions), so start-up
costs cancel out. Commits are not flushed (fsync off): this counts CPU work, not
waiting for a disk.

    python -m bench.instructions [--transactions 500]

It needs valgrind; it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import psycopg2

from .commit_cost import SCHEMA, prepare

#: The app transaction's extra statement, by what it is compared as ($1: 0..31).
STATEMENTS = {
    "nothing more": None,
    "plain insert": "INSERT INTO plain (channel, payload) VALUES ('orders' || $1, '{\"a\": 1}')",
    "intake insert": f"INSERT INTO {SCHEMA}.messages (channel, type, payload) "
                     "VALUES ('orders' || $1, 'json', '{\"a\": 1}')",
    "publish()": f"SELECT {SCHEMA}.publish('orders' || $1, '{{\"a\": 1}}')",
}
#: Messages committed per transaction before each call of the sequencer.
BATCHES = (1, 50, 400)


def app_script(statement: Optional[str], transactions: int) -> str:
    """Single-user input: ``transactions`` app transactions with ``statement`` in each."""
    lines = ["PREPARE u(int) AS UPDATE app SET v = v + 1 WHERE id = $1;"]
    if statement:
        lines.append(f"PREPARE p(int) AS {statement};")
    for i in range(transactions):
        lines += ["BEGIN;", f"EXECUTE u({i % 1000 + 1});"]
        if statement:
            lines.append(f"EXECUTE p({i % 32});")
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def numbering_script(messages: int, batch: int, number: bool) -> str:
    """Single-user input: ``messages`` published ``batch`` per transaction, each batch
    numbered by one call of the sequencer when ``number``."""
    lines = [f"PREPARE p(int) AS SELECT {SCHEMA}.publish('orders' || $1, '{{\"a\": 1}}');"]
    for first in range(0, messages, batch):
        lines += ["BEGIN;"] + [f"EXECUTE p({(first + i) % 32});" for i in range(batch)]
        lines.append("COMMIT;")
        if number:
            lines.append(f"SELECT count(*) FROM {SCHEMA}.sequence(1000);")
    return "\n".join(lines) + "\n"


def counter(data: Path, user: Optional[str], workdir: Path) -> Callable[[str], int]:
    """A function running single-user input on a fresh copy of the stopped cluster in
    ``data``, returning the instructions it took."""
    from tests.pgserver import _bin_dir

    pristine = workdir / "pristine"
    shutil.copytree(data, pristine, symlinks=True)

    def count(script: str) -> int:
        shutil.rmtree(data)
        shutil.copytree(pristine, data, symlinks=True)
        if user:
            shutil.chown(data, user)
            for path in data.rglob("*"):
                shutil.chown(path, user)
        out = data.parent / "callgrind.out"  # where the server's user may write
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             str(_bin_dir() / "postgres"), "--single", "-D", str(data), "-c", "fsync=off",
             "postgres"], input=script, capture_output=True, text=True, user=user, check=False)
        if "ERROR:" in result.stdout + result.stderr:
            raise RuntimeError(f"single-user PostgreSQL failed: {result.stderr[-1000:]}")
        found = re.search(r"Collected : (\d+)", result.stderr)
        if not found:
            raise RuntimeError(f"valgrind gave no count: {result.stderr[-1000:]}")
        return int(found.group(1))
    return count


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=500,
                        help="N: each figure is (count of 3N - count of N) / 2N")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 1
    from tests.pgserver import PgServer

    n = args.transactions
    server = PgServer()
    server.start()
    try:
        prepare(server.dsn)
        server.stop()
        with tempfile.TemporaryDirectory() as tmp:
            count = counter(server.data, server.user, Path(tmp))
            print("instructions per app transaction (UPDATE one row, then):")
            for name, statement in STATEMENTS.items():
                per = (count(app_script(statement, 3 * n))
                       - count(app_script(statement, n))) / (2 * n)
                print(f"  {name:14} {per:10,.0f}")
            print("instructions per message numbered by sequence(), over 32 channels:")
            for batch in BATCHES:
                messages = max(batch, n // batch * batch)

                def numbering(total: int, batch: int = batch) -> int:
                    return (count(numbering_script(total, batch, True))
                            - count(numbering_script(total, batch, False)))
                per = (numbering(3 * messages) - numbering(messages)) / (2 * messages)
                print(f"  {batch:4} per call {per:10,.0f}")
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
