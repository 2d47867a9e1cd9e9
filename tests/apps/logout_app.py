"""examples/logout.py under gunicorn, with a stats route the tests read (which worker holds
which socket)."""

import os

from flask import jsonify

from examples.logout import app, notifications

__all__ = ["app"]


@app.route("/debug/stats")
def stats():
    return jsonify(pid=os.getpid(), sockets=notifications.connection_count,
                   connections=notifications.connection_list())
