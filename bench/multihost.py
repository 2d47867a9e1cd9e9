"""Several hosts behind HAProxy on one PostgreSQL: a rolling restart with many clients, and
what each host costs the database per durable message.

    python -m bench.multihost restart --clients 1000   # drain and restart 3 hosts, one at a time
    python -m bench.multihost cost --rounds 3          # rows read, CPU per message: 1, 2, 3 hosts

Both run the tests' rig (tests/multihost.py): gunicorn hosts of two workers each serving the
pub/sub test app on a durable log, behind HAProxy with examples/proxy/haproxy-hosts.cfg, the
clients connecting through it only and resuming as pgws.js does.

``restart``: the clients subscribe, a publisher commits durable messages at ``--rate`` per
second, each host in turn gets SIGTERM (its drain: ``--drain`` seconds), is started again and
waits until HAProxy's checks see it up. Then publishing stops and every client must reach the
last offset of its channels with no offset missed or repeated. The peak reconnect rate is
HAProxy's: the frontend's ``rate_max`` (new sessions in one second) from its stats socket,
with the counters cleared once every client is connected, so only the restart's connects
count; the clients' own count (attempts and 101s in any one second) is shown beside it.

``cost``: for 1, 2 and 3 hosts in turn (rounds interleaved, medians reported), ``--messages``
durable messages at ``--rate`` per second to clients on every worker; per message: rows read
from the log's table, CPU of the whole PostgreSQL server (every process: publishing,
numbering, listeners, log readers) and of the log readers' backends alone.
Starts PostgreSQL unless BENCH_DSN or PGWS_TEST_DSN is set; needs haproxy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from . import servers
from .commit_cost import server_cpu
from .drain import peak
from .durable import backend_cpu_s, rows_read


#: Seconds until every backend's table statistics are flushed (PostgreSQL flushes an idle
#: backend's within a second or so; the counters of rows read lag behind by that much).
STATS_DELAY = 2.5


def haproxy() -> str:
    """The haproxy program (found as the tests find it), or StartError."""
    from tests import programs

    found = programs.find("haproxy")
    if found is None:
        raise servers.StartError(programs.missing("haproxy"))
    return found


def restart(dsn: str, clients: int, channels: int, rate: float, drain: float) -> Dict[str, Any]:
    """One rolling restart of three hosts under ``clients`` resuming clients."""
    from tests.durable_helpers import new_log, wait_numbered
    from tests.helpers import wait_for
    from tests.multihost import Publishers, Rig, Swarm, wait_caught_up

    names = [f"roll-{i}" for i in range(channels)]
    rig = Rig(dsn, new_log(dsn), haproxy(), threads=clients // 2 + 100, drain=drain)
    swarm: Optional[Swarm] = None
    publishers: Optional[Publishers] = None
    try:
        swarm = Swarm(rig.port, clients, names, per_client=1)
        started = time.monotonic()
        wait_for(lambda: swarm.check() or swarm.subscribed() == clients, 120,
                 message="every client subscribed")
        connect_s = time.monotonic() - started
        assert rig.balancer is not None
        rig.balancer.command("clear counters")
        mark = len(swarm.attempts), len(swarm.connects)
        at_start = dict(swarm.closes)
        publishers = Publishers(dsn, rig.schema, names, rate)
        started = time.monotonic()
        for i in range(len(rig.hosts)):
            rig.restart(i)
        wait_for(lambda: swarm.check() or swarm.subscribed() == clients, 120,
                 message="every client back")
        restart_s = time.monotonic() - started
        published = publishers.stop()
        wait_numbered(dsn, rig.schema)
        wait_caught_up(swarm, published, timeout=120)
        frontend = rig.balancer.frontend()
        per_host = [int(row["rate_max"]) for row in rig.balancer.stats()
                    if row["pxname"] == "app" and row["svname"] not in ("FRONTEND", "BACKEND")]
        attempts, connects = swarm.attempts[mark[0]:], swarm.connects[mark[1]:]
        missed = sum(c.gaps for c in swarm.clients)
        doubled = sum(c.duplicates for c in swarm.clients)
        late = sum(1 for c in swarm.clients for ch in c.channels if c.first.get(ch) != 0)
        downs = [line.split("] ", 1)[-1] for line in rig.balancer.log().splitlines()
                 if " is DOWN" in line]
        return {"clients": clients, "hosts": len(rig.hosts), "drain_s": drain,
                "connect_s": round(connect_s, 1), "restart_s": round(restart_s, 1),
                "published": sum(published.values()), "delivered": sum(c.received for c in
                                                                       swarm.clients),
                "missed": missed, "doubled": doubled, "subscribed_late": late,
                "problems": len(swarm.problems()),
                "reconnects": len(connects), "refused_attempts": len(attempts) - len(connects),
                "haproxy_peak_sessions_per_s": int(frontend["rate_max"]),
                "haproxy_peak_per_host": per_host,
                "clients_peak_attempts_per_s": peak(attempts, 1.0),
                "clients_peak_101_per_s": peak(connects, 1.0),
                "failed_first_connects": at_start,
                "hosts_marked_down": len(downs), "down_reasons": sorted(set(
                    d.split("reason: ", 1)[-1].split(",")[0] for d in downs)),
                "closes": {k: v - at_start.get(k, 0) for k, v in swarm.closes.items()
                           if v > at_start.get(k, 0)}}
    finally:
        if publishers is not None:
            publishers.stop()
        if swarm is not None:
            swarm.stop()
        rig.stop()


def cost(dsn: str, hosts: int, messages: int, rate: float, channels: int) -> Dict[str, Any]:
    """Database work per durable message with ``hosts`` hosts of two workers."""
    from tests.durable_helpers import new_log
    from tests.helpers import wait_for
    from tests.multihost import Publishers, Rig, Swarm, wait_caught_up

    names = [f"cost-{i}" for i in range(channels)]
    rig = Rig(dsn, new_log(dsn), haproxy(), hosts=hosts)
    swarm = Swarm(rig.port, 16 * hosts, names)
    try:
        wait_for(lambda: swarm.check() or swarm.subscribed() == 16 * hosts, 60,
                 message="every client subscribed")
        readers = backend_cpu_s(dsn)[1]
        cpu = server_cpu(dsn)
        time.sleep(STATS_DELAY)  # the subscriptions' reads reach the table statistics
        cpu0, reader0, read0 = cpu(), backend_cpu_s(dsn)[0], rows_read(dsn, rig.schema)
        publishers = Publishers(dsn, rig.schema, names, rate)
        wait_for(lambda: publishers.total() >= messages, messages / rate * 3 + 30,
                 message=f"{messages} published")
        published = publishers.stop()
        wait_caught_up(swarm, published)  # numbered and read (wait_numbered would scan the log)
        total = sum(published.values())
        cpu1, reader1 = cpu(), backend_cpu_s(dsn)[0]
        time.sleep(STATS_DELAY)  # the last reads reach the table statistics
        read1 = rows_read(dsn, rig.schema)
        return {"hosts": hosts, "workers": 2 * hosts, "log_readers": readers,
                "messages": total,
                "rows_read_per_message": round((read1 - read0) / total, 2),
                "server_cpu_ms_per_message": round(1000 * (cpu1 - cpu0) / total, 3),
                "reader_cpu_ms_per_message": round(1000 * (reader1 - reader0) / total, 3),
                "lost": len(swarm.problems())}
    finally:
        swarm.stop()
        rig.stop()


def medians(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by_hosts: Dict[int, List[Dict[str, Any]]] = {}
    for row in rows:
        by_hosts.setdefault(row["hosts"], []).append(row)
    out = []
    for hosts, group in sorted(by_hosts.items()):
        merged = dict(group[0])
        for key in ("rows_read_per_message", "server_cpu_ms_per_message",
                    "reader_cpu_ms_per_message"):
            merged[key] = statistics.median(r[key] for r in group)
        merged["lost"] = sum(r["lost"] for r in group)
        merged["rounds"] = len(group)
        out.append(merged)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multihost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["restart", "cost"])
    p.add_argument("--clients", type=int, default=1000, help="restart: clients")
    p.add_argument("--channels", type=int, default=None,
                   help="durable channels (restart: 10, one per client; cost: 4, all)")
    p.add_argument("--rate", type=float, default=None,
                   help="messages per second (restart: 20, cost: 100)")
    p.add_argument("--drain", type=float, default=3.0, help="restart: PGWS_DRAIN_SECONDS")
    p.add_argument("--messages", type=int, default=1000, help="cost: messages per figure")
    p.add_argument("--rounds", type=int, default=1, help="rounds (cost: medians reported)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    args = p.parse_args(argv)
    from .durable import table

    try:
        with servers.database() as dsn:
            if args.what == "restart":
                for _ in range(args.rounds):
                    row = restart(dsn, args.clients, args.channels or 10, args.rate or 20.0,
                                  args.drain)
                    print(json.dumps(row) if args.json else
                          "\n".join(f"{k:30} {v}" for k, v in row.items()), flush=True)
            else:
                rows = []
                for _ in range(args.rounds):  # 1 2 3 1 2 3: the machine's noise hits each alike
                    for hosts in (1, 2, 3):
                        rows.append(cost(dsn, hosts, args.messages, args.rate or 100.0,
                                         args.channels or 4))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                print(json.dumps(medians(rows)) if args.json else table(medians(rows)))
    except servers.StartError as exc:
        print(f"bench.multihost: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
