"""docs/getting-started.md, followed word for word in a fresh virtual environment: install from
the checkout with an extra, the page's app under gunicorn, the page's psql command, a frame."""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path
from typing import Dict

from pgws_sync import __version__

from . import programs
from .helpers import Gunicorn, ROOT, Ws, http_get
from .pgserver import free_port

PAGE = ROOT / "docs" / "getting-started.md"


def steps() -> Dict[str, str]:
    """The page's marked code blocks: ``<!-- step: NAME -->`` then a fenced block."""
    found = re.findall(r"<!-- step: (\S+) -->\n```\w*\n(.*?)```", PAGE.read_text(), re.S)
    return {name: code for name, code in found}


def test_the_page_has_every_step():
    assert set(steps()) == {"install", "migrate", "app.py", "run", "send"}


def test_getting_started_as_written(pg_dsn: str, tmp_path: Path) -> None:
    programs.require("psql", "PGWS_PSQL")  # the page's last step uses it
    page = steps()
    # 1. a fresh virtual environment, and the install command with ./pgws_sync the checkout
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    (tmp_path / "pgws_sync").symlink_to(ROOT, target_is_directory=True)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               DATABASE_URL=pg_dsn, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    install = page["install"].strip()
    done = subprocess.run(["bash", "-c", install], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = subprocess.run([str(bin_dir / "python"), "-c",
                            "import pgws_sync, redis; print(pgws_sync.__file__)"],
                           cwd=tmp_path / "venv", env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "site-packages" in check.stdout, check.stderr
    # 2. the log's tables, with the venv's pgws-sync, as written
    done = subprocess.run(["bash", "-c", page["migrate"].strip()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # 3. the app, as written
    (tmp_path / "app.py").write_text(page["app.py"])
    # 4. its gunicorn command, as written (the port: a free one, through gunicorn's own variable)
    port = free_port()
    command = page["run"].strip().replace("--bind 127.0.0.1:8000", f"--bind 127.0.0.1:{port}")
    log = open(tmp_path / "gunicorn.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Gunicorn.__new__(Gunicorn)
    server.port, server.proc, server._log, server.log_path = port, proc, log, Path(log.name)
    try:
        server.wait_up(timeout=60)
        ws = Ws(server.ws_url("/ws"))
        assert _health(server) == '{"status": "ok"}'  # the public answer
        ws.client.send('{"action": "subscribe", "channel": "updates", "id": "s"}')
        assert ws.recv_until(lambda f: f.get("reply_to") == "s")["event"] == "subscribed"
        # 5. the page's psql command, as written
        psql_env = dict(env)
        if os.environ.get("PGWS_PSQL"):
            psql_env["PATH"] = str(Path(os.environ["PGWS_PSQL"]).parent) + os.pathsep + env["PATH"]
        sent = subprocess.run(["bash", "-c", page["send"].strip()], env=psql_env,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        frame = ws.recv_until(lambda f: "offset" in f and "event" not in f)
        assert frame["payload"] == {"hello": "world"} and frame["channel"] == "updates"
        ws.close()
    finally:
        server.stop()


def _health(server: Gunicorn) -> str:
    return http_get(server.url("/healthz"))[1]


def test_the_wheel_command_names_the_version_it_builds():
    wheels = set(re.findall(r"pgws_sync-([\w.]+)-py3-none-any\.whl", PAGE.read_text()))
    assert wheels == {__version__}  # the page names the wheel this checkout builds
