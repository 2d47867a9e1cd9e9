"""The smallest pgws_sync app: NOTIFYs on channel "pgws" to every browser on /ws.

Run:  PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn examples.minimal:app
Send: psql -c "select pg_notify('pgws', 'default,{\"message\": \"hello\"}')"
"""

import os

from flask import Flask

from pgws_sync import Pgws, Listener

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
endpoint = Pgws(listener, "pgws")
endpoint.init_app(app, "/ws")
