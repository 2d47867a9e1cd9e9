"""The README's quick start runs as written (only the database address is swapped)."""

import re

from .helpers import ROOT, Gunicorn, Ws, http_get, pg_notify


def quick_start_code():
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n# app.py\n(.*?)```", text, re.S).group(1)


def test_quick_start_serves_its_audiences(pg_dsn, sender, tmp_path):
    code = quick_start_code()
    assert 'Listener("postgresql://localhost/app"' in code
    (tmp_path / "readme_app.py").write_text(code.replace("postgresql://localhost/app", pg_dsn))
    command = re.search(r"gunicorn (-c python:pgws_sync.gunicorn .*) app:app",
                        (ROOT / "README.md").read_text()).group(1).split()
    g = Gunicorn("readme_app:app", args=command,
                 env={"PYTHONPATH": str(tmp_path)}).wait_up()
    try:
        ws = Ws(g.ws_url("/ws"))
        # registered before its handshake's answer; the health answer is the public one
        assert http_get(g.url("/healthz")) == (200, '{"status": "ok"}')
        pg_notify(sender, "other-channel", 'default,{"not": "for noosa or coolum"}')
        pg_notify(sender, "pgws", 'noosa,{"message": "hello, world"}')
        frame = ws.recv_json()
        assert frame["payload"] == {"message": "hello, world"} and frame["channel"] == "pgws"
        ws.close()
    finally:
        g.stop()
