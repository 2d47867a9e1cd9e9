"""Audiences from a request header: each socket receives only its teams' notifications.

A proxy in front of the app (after authenticating the user) sets X-Teams,
e.g. "noosa,coolum". A NOTIFY "noosa,{...}" then reaches only noosa's sockets.

Run:  PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 200 examples.audiences:app
Send: psql -c "select pg_notify('updates', 'noosa,{\"surf\": \"2m\"}')"
"""

import os

from flask import Flask

from pgws_sync import Pgws, Listener

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
endpoint = Pgws(listener, "updates")


def teams(request):
    """The audiences of one socket: the teams named in X-Teams (none: receives nothing)."""
    header = request.headers.get("X-Teams", "")
    return [team.strip() for team in header.split(",") if team.strip()]


endpoint.get_audience = teams
endpoint.init_app(app, "/ws")


@app.route("/")
def index():
    return "WebSocket endpoint at /ws; health at /healthz\n"
