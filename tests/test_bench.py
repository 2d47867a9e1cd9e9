"""The benchmark tool (bench/): its client framing, and short real runs under gunicorn."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request
from wsproto.extensions import PerMessageDeflate

from bench.clients import find_stamp
from bench.wsframes import (FIN, OP_CONT, OP_TEXT, RSV1, Handshake, Inflater, ProtocolError,
                            split_frames, upgrade_request)

from .helpers import ROOT
from .pgserver import free_port


def run_bench(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "bench.fanout", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def check_complete(r: Dict[str, Any], clients: int, messages: int) -> None:
    assert r["opened"] == clients and r["failed"] == 0, r["connect_errors"]
    assert r["expected"] == clients * messages
    assert r["delivered"] == r["expected"] and r["lost"] == 0
    assert r["min_per_client"] == messages
    assert r["out_of_order"] == 0 and r["closes"] == {}
    lat = r["lat_ms"]
    assert None not in lat.values() and lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["deliveries_per_s"] > 0 and r["total_s"] > 0


def test_run_against_gunicorn(pg_dsn: str) -> None:
    proc = run_bench("--clients", "20", "--messages", "20", "--json", "--dsn", pg_dsn)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    check_complete(r, 20, 20)
    assert r["server"]["app"] == "examples.minimal:app"
    assert "--threads 123" in r["server"]["gunicorn_args"]  # 20 sockets, a tenth more, + 100
    assert r["deflate_offered"] is False and r["deflate_accepted"] == 0
    rss = r["rss_kb"]
    assert 0 < rss["before"] <= rss["connected"] and rss["end"] > 0
    assert r["rss_per_conn_kb"] is not None and r["server_threads"] >= 20
    assert r["server_cpu_s"] is not None and r["server_cpu_s"] >= 0


def test_compressed_answers_are_read(pg_dsn: str) -> None:
    """--deflate against a server that accepts it: every message inflated and counted."""
    proc = run_bench("--clients", "20", "--messages", "20", "--rate", "200", "--pad", "500",
                     "--deflate", "--procs", "2", "--json", "--dsn", pg_dsn,
                     "--app", "tests.apps.app:app",
                     env={"PGWS_OPTIONS": json.dumps({"compression": True})})
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    check_complete(r, 20, 20)
    assert r["procs"] == 2 and r["deflate_offered"] is True and r["deflate_accepted"] == 20


def test_table_output(pg_dsn: str) -> None:
    proc = run_bench("--clients", "3", "--messages", "2", "--dsn", pg_dsn)
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines()[2:])
    assert rows["delivered"].startswith("6 of 6") and rows["lost"].startswith("0 ")
    assert rows["closes"] == "none"


def test_exits_non_zero_when_the_server_cannot_start() -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = run_bench("--clients", "2", "--messages", "1", "--dsn", dead, "--start-timeout", "2")
    assert proc.returncode == 2
    assert "could not start" in proc.stderr and "/healthz" in proc.stderr
    log = re.search(r"its log is (\S+):", proc.stderr)
    assert log, proc.stderr
    os.unlink(log.group(1))  # kept for the user to read; the test has seen the message


# ---------------------------------------------------------------- framing, against wsproto


def wsproto_server(deflate: bool) -> tuple:
    request, accept = upgrade_request("example.test", "/ws", deflate=deflate)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(request)
    event = next(server.events())
    assert isinstance(event, Request)
    answer = server.send(AcceptConnection(extensions=[PerMessageDeflate()] if deflate else []))
    return server, answer, accept


def read_messages(wire: bytes, inflater: Any, chunk: int) -> List[bytes]:
    buf, messages, parts, first_byte = bytearray(), [], [], 0
    for i in range(0, len(wire), chunk):
        buf += wire[i:i + chunk]
        for first, payload in split_frames(buf):
            if first & 0x0F == OP_TEXT:
                parts, first_byte = [payload], first
            else:
                assert first & 0x0F == OP_CONT
                parts.append(payload)
            if first & FIN:
                data = b"".join(parts)
                messages.append(inflater.inflate(data) if first_byte & RSV1 else data)
    assert not buf
    return messages


@pytest.mark.parametrize("deflate", [False, True])
def test_frames_from_wsproto(deflate: bool) -> None:
    server, answer, accept = wsproto_server(deflate)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert rest == b""
    handshake = Handshake.parse(head)
    handshake.check(accept)
    inflater = handshake.deflate()
    assert (inflater is not None) == deflate
    texts = [json.dumps({"payload": {"seq": i, "t": 1.5 + i, "pad": "x" * size}})
             for i, size in enumerate([0, 200, 70000, 3])]
    wire = b"".join(server.send(Message(data=t)) for t in texts)
    # one message in three fragments
    wire += server.send(Message(data="ab", message_finished=False))
    wire += server.send(Message(data="cd", message_finished=False))
    wire += server.send(Message(data="ef", message_finished=True))
    got = read_messages(wire, inflater or Inflater(), chunk=7)
    assert got == [t.encode() for t in texts] + [b"abcdef"]
    assert [find_stamp(m) for m in got] == [(1.5, 0), (2.5, 1), (3.5, 2), (4.5, 3), None]


def test_bad_answers() -> None:
    _, accept = upgrade_request("h", "/")
    with pytest.raises(ProtocolError, match="HTTP 403"):
        Handshake.parse(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0").check(accept)
    with pytest.raises(ProtocolError, match="Accept"):
        Handshake.parse(b"HTTP/1.1 101 Switching\r\nSec-WebSocket-Accept: nope").check(accept)
    with pytest.raises(ProtocolError, match="masked"):
        split_frames(bytearray(b"\x81\x85abcd12345"))
    with pytest.raises(ProtocolError, match="compressed"):
        Inflater().inflate(b"\xff\xff\xff")


def test_connect_compares_the_gateway_with_the_bare_floor(pg_dsn: str) -> None:
    """bench.connect: the gateway and gunicorn's bare 101, same settings, both timed."""
    proc = subprocess.run([sys.executable, "-m", "bench.connect", "--clients", "20",
                           "--rounds", "1", "--workers", "1", "--json", "--dsn", pg_dsn],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert [run["server"] for run in r["runs"]] == ["gateway", "bare"]
    for run in r["runs"]:
        assert run["opened"] == 20 and run["failed"] == 0 and run["workers"] == 1
        # CPU time counts in clock ticks (10 ms): 20 sockets may take less than one
        assert run["connect_s"] > 0 and run["cpu_ms_per_socket"] >= 0
    (summary,) = r["summary"]
    assert summary["ratio_of_medians"] == round(
        summary["gateway"]["connect_s"] / summary["bare"]["connect_s"], 3)
