"""The app the end-to-end tests run under gunicorn, configured by environment variables.

PGWS_DB_URI           the database
PGWS_CHANNELS         JSON list of channels (default ["pgws"])
PGWS_OPTIONS          JSON object of endpoint options (max_queue, write_timeout, ...)
PGWS_LISTENER_OPTIONS JSON object of Listener options
PGWS_FLASK_REQUEST    "0": init_app(..., flask_request=False) (sockets served below Flask)
Audiences: the X-Audience header (comma-separated, may be empty) if sent, else
["default", "worker-<pid>"].
"""

import gc
import json
import os
import threading

from flask import Flask, jsonify, request

from pgws_sync import Pgws, Listener

app = Flask(__name__)
listener = Listener(
    os.environ.get("PGWS_DB_URI", ""),
    **{"min_reconnect": 0.2, "max_reconnect": 2.0,
       **json.loads(os.environ.get("PGWS_LISTENER_OPTIONS", "{}"))},
)
endpoint = Pgws(listener, *json.loads(os.environ.get("PGWS_CHANNELS", '["pgws"]')),
                **json.loads(os.environ.get("PGWS_OPTIONS", "{}")))


#: The paths Flask's before_request hooks saw, " (upgrade)" added for WebSocket upgrades.
before_request_paths = set()
#: The module of the request class get_audience was given: "flask", or "werkzeug" below Flask.
seen_request_types = set()


@app.before_request
def count_requests():
    upgrade = " (upgrade)" if request.headers.get("Upgrade") else ""
    before_request_paths.add(request.path + upgrade)


def audiences(request):
    seen_request_types.add(request.__class__.__module__.split(".")[0])
    header = request.headers.get("X-Audience")
    if header is not None:
        return [a for a in header.split(",") if a]
    return ["default", f"worker-{os.getpid()}"]


endpoint.get_audience = audiences
endpoint.init_app(app, "/ws", flask_request=os.environ.get("PGWS_FLASK_REQUEST") != "0")


@app.route("/debug/stats")
def stats():
    return jsonify(
        pid=os.getpid(),
        threads=threading.active_count(),
        thread_names=sorted(t.name for t in threading.enumerate()),
        gc_frozen=gc.get_freeze_count(),
        sockets=len(endpoint.hub),
        audiences=endpoint.hub.key_count(),
        queue_depths=[c.queue_depth for c in endpoint.hub.connections()],
        listener=listener.status(),
        before_request_paths=sorted(before_request_paths),
        request_types=sorted(seen_request_types),
    )


@app.route("/debug/close")
def close():
    endpoint.close(timeout=5.0)
    return jsonify(closed=True)
