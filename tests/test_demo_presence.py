"""The demo page shows how many pages watch its change log (presence), in Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict

from .clirun import COMMAND, no_database_env
from .helpers import ROOT
from .pgserver import free_port
from .test_cli import Lines


def test_the_demo_page_shows_who_watches(page) -> None:
    port = free_port()
    env: Dict[str, str] = no_database_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([*COMMAND, "demo", "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = Lines(proc.stdout).value("page", timeout=40)  # type: ignore[arg-type]
        page.goto(url)
        page.wait_for_function(
            "document.getElementById('watching').textContent === '1 (this page)'")
        second = page.context.browser.new_page()
        try:
            second.goto(url)
            for p in (page, second):
                p.wait_for_function("document.getElementById('watching').textContent === "
                                    "'2 (this page and 1 more)'", timeout=15_000)
        finally:
            second.close()
        page.wait_for_function(
            "document.getElementById('watching').textContent === '1 (this page)'",
            timeout=15_000)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
