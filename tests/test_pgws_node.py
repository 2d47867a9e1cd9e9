"""pgws.js in Node (``node --test tests/js/``): each defect of issue 26 through a fake WebSocket,
the ES module build, and the classic script loaded with ``require()``."""

from __future__ import annotations

import re
import subprocess

from . import programs
from .helpers import ROOT

JS_TESTS = ROOT / "tests" / "js"


def run_node(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    node = programs.require("node", "PGWS_NODE")
    return subprocess.run([node, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pgws_js_in_node_through_a_fake_websocket() -> None:
    done = run_node("--test", str(JS_TESTS))
    summary = dict(re.findall(r"^# (pass|fail|cancelled) (\d+)$", done.stdout, re.M))
    assert done.returncode == 0 and summary.get("fail") == "0", done.stdout[-4000:] + done.stderr
    print(f"\nnode --test: {summary}")
    assert int(summary["pass"]) >= 15
