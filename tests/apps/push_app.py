"""The push app (websocket-push's model) the end-to-end tests run under gunicorn.

PGWS_DB_URI      the database
PGWS_REDIS_URL   when set, backend messages come from Redis instead of NOTIFY
PGWS_OPTIONS     JSON object of Push options (push_channel, tab_windows, ...)

Hooks: X-Deny refuses the upgrade (permit_connection); ``?user=`` in the URL
names the user when no header does (browsers cannot set headers); rooms
starting "private" may be joined only by user "admin"; "boom" makes the hook
raise; ``?hello=1`` sends the worker's pid after the tab window id. ``/`` is
a blank page for browser tests, ``/pgws.js`` the client.
"""

import json
import os
import threading

from flask import Flask, jsonify, request

from pgws_sync import Listener, Push
from tests.push_helpers import AUTH_KEY  # the secret the tests sign AuthEvents with

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=0.2, max_reconnect=2.0)
options = json.loads(os.environ.get("PGWS_OPTIONS", "{}"))
# The test clients play a proxy that authenticates: it sets these headers (and strips them
# from what a real client sends). PGWS_OPTIONS {"user_header": null, ...} keeps the defaults.
options.setdefault("user_header", "X-Auth-User")
options.setdefault("guest_header", "X-Auth-Guest")
options.setdefault("auth_key", AUTH_KEY)
if os.environ.get("PGWS_REDIS_URL"):
    from pgws_sync import RedisSource

    options["source"] = RedisSource(os.environ["PGWS_REDIS_URL"], min_reconnect=0.2,
                                    max_reconnect=2.0)
joins = []
joins_lock = threading.Lock()


class App(Push):
    def on_connect(self, conn, req):
        super().on_connect(conn, req)
        if req.args.get("hello"):
            conn.send(json.dumps({"pid": os.getpid()}))

    def get_user(self, req):
        return super().get_user(req) or req.args.get("user")

    def permit_connection(self, req):
        return "X-Deny" not in req.headers

    def permit_join(self, user, room, req):
        with joins_lock:
            joins.append([user, room, req.path])
        if room == "boom":
            raise RuntimeError("the hook failed on purpose")
        return not room.startswith("private") or user == "admin"


endpoint = App(listener, **options)
endpoint.init_app(app, "/ws")


@app.route("/")
def page():
    return "<!doctype html><meta charset=utf-8><title>push test page</title>"


@app.route("/debug/stats")
def stats():
    with joins_lock:
        asked = list(joins)
    return jsonify(
        pid=os.getpid(),
        sockets=endpoint.connection_count,
        keys=endpoint.hub.key_count(),
        connections=endpoint.connection_list(),
        joins=asked,
        requests=len(endpoint._requests),
        listener=listener.status(),
        source=endpoint.push_source.status(),
    )


@app.route("/debug/push", methods=["POST"])
def push():
    """Send the body as is through the push source, as a backend service would."""
    text = request.get_data(as_text=True)
    if endpoint.push_source is listener:
        endpoint.publisher.notify(text, channel=endpoint.push_channel)
    else:
        endpoint.push_source.publish(endpoint.push_channel, text)
    return jsonify(pid=os.getpid())


@app.route("/debug/api", methods=["POST"])
def api():
    """The server-side API: push_to_user / push_to_room / authenticate."""
    body = request.get_json()
    if "user" in body and "payload" in body:
        endpoint.push_to_user(body["user"], body["payload"], tab_window_id=body.get("tab"))
    elif "room" in body:
        endpoint.push_to_room(body["room"], body["payload"])
    else:
        endpoint.authenticate(body["guest"], body["auth_user"])
    return jsonify(pid=os.getpid())
