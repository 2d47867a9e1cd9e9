"""A test app exercising the endpoint hooks: refusal, subprotocol, close_at, echo, disconnect count.

Headers: X-Refuse (refuse with 401 and that body), X-Close-In (seconds until a
3001 close), X-Audience as in app.py. Text messages are echoed as "echo:<text>",
binary ones reversed; "boom" raises in the hook; "block" waits until
/debug/release is called; "close" closes with 4000.
"""

import json
import os
import threading
import time

from flask import Flask, jsonify

from pgws_sync import Pgws, Listener, Refused

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=0.2, max_reconnect=2.0)
released = threading.Event()
counts = {"connect": 0, "open": 0, "disconnect": 0, "disconnect_ids": []}
counts_lock = threading.Lock()


class HookedEndpoint(Pgws):
    def on_connect(self, conn, request):
        if "X-Refuse" in request.headers:
            raise Refused(401, request.headers["X-Refuse"])
        with counts_lock:
            counts["connect"] += 1
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "echo.v1" in offered:
            conn.subprotocol = "echo.v1"
        if "X-Close-In" in request.headers:
            conn.close_at(time.time() + float(request.headers["X-Close-In"]), 3001, "JWT expired")
        conn.metadata["user"] = request.headers.get("X-User", "anonymous")
        conn.send(json.dumps({"hello": conn.metadata["user"]}))

    def on_open(self, conn):
        with counts_lock:
            counts["open"] += 1

    def on_message(self, conn, data):
        if data == "boom":
            raise RuntimeError("the hook failed on purpose")
        if data == "block":
            released.wait(30)
            return
        if data == "close":
            conn.close(4000, "asked to")
            return
        if isinstance(data, bytes):
            conn.send(data[::-1])
        else:
            conn.send("echo:" + data)

    def on_disconnect(self, conn):
        with counts_lock:
            counts["disconnect"] += 1
            counts["disconnect_ids"].append(conn.id)


endpoint = HookedEndpoint(listener, "pgws", **json.loads(os.environ.get("PGWS_OPTIONS", "{}")))
endpoint.get_audience = lambda request: [a for a in request.headers.get("X-Audience", "default").split(",") if a]
endpoint.init_app(app, "/ws")


@app.route("/debug/stats")
def stats():
    with counts_lock:
        hooks = dict(counts, disconnect_ids=list(counts["disconnect_ids"]))
    return jsonify(pid=os.getpid(), sockets=len(endpoint.hub), keys=endpoint.hub.key_count(),
                   hooks=hooks, listener=listener.status())


@app.route("/debug/release")
def release():
    released.set()
    return jsonify(released=True)
