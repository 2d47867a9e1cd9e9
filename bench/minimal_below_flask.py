"""examples/minimal.py with its sockets served below Flask, for compare.sh.

``init_app(app, "/ws", flask_request=False)``: see docs/performance.md.
"""

import os

from flask import Flask

from pgws_sync import Listener, Pgws

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
endpoint = Pgws(listener, "pgws")
endpoint.init_app(app, "/ws", flask_request=False)
