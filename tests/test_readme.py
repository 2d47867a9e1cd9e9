"""The README's quick start runs as written (only the database address is swapped)."""

import re

from .clirun import no_database_env, run_cli
from .helpers import ROOT, Gunicorn, Ws, http_get


def quick_start_code():
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n# app.py\n(.*?)```", text, re.S).group(1)


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_delivers_a_published_row_and_replays_it(pg_dsn, sender, tmp_path):
    code = quick_start_code()
    assert 'Listener("postgresql://localhost/app")' in code
    (tmp_path / "readme_app.py").write_text(code.replace("postgresql://localhost/app", pg_dsn))
    migrate, gunicorn, psql = quick_start_commands()
    assert migrate.startswith("pgws-sync migrate --dsn postgresql://localhost/app")
    done = run_cli(*migrate.replace("postgresql://localhost/app", pg_dsn).split()[1:],
                   env=no_database_env())
    assert done.returncode == 0, done.stderr
    command = re.search(r"gunicorn (-c python:pgws_sync.gunicorn .*) app:app", gunicorn).group(1)
    sql = re.search(r'psql app -c "(.*)"$', psql).group(1).replace('\\"', '"')
    g = Gunicorn("readme_app:app", args=command.split(),
                 env={"PYTHONPATH": str(tmp_path)}).wait_up()
    try:
        ws = Ws(g.ws_url("/ws"))
        assert http_get(g.url("/healthz")) == (200, '{"status": "ok"}')
        ws.client.send('{"action": "subscribe", "channel": "orders", "id": "s"}')
        subscribed = ws.recv_until(lambda f: f.get("reply_to") == "s")
        with sender.cursor() as cur:
            cur.execute(sql)
        frame = ws.recv_until(lambda f: "offset" in f and "event" not in f)
        assert frame["payload"] == {"id": 7, "state": "paid"} and frame["channel"] == "orders"
        ws.close()
        again = Ws(g.ws_url("/ws"))  # a tab that was away: what it missed, from its offset
        again.client.send('{"action": "subscribe", "channel": "orders", "id": "s", "since": %d, '
                          '"epoch": "%s"}' % (subscribed["offset"], subscribed["epoch"]))
        replayed = again.recv_until(lambda f: "offset" in f and "event" not in f)
        assert replayed["payload"] == {"id": 7, "state": "paid"}
        again.close()
    finally:
        g.stop()
