"""The app bench.presence asks: a PubSub with presence on, anyone may subscribe."""

import os

from flask import Flask

from pgws_sync import Listener, PubSub

app = Flask(__name__)
PubSub(Listener(os.environ.get("PGWS_DB_URI", "")), presence=True).init_app(app, "/ws")
