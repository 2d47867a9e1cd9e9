"""The pub/sub app the end-to-end tests run under gunicorn, configured by environment variables.

PGWS_DB_URI     the database
PGWS_OPTIONS    JSON object of PubSub options (backpressure, max_queue, ...)
PGWS_ORIGIN_SUFFIX  if set, check_origin admits only origins ending with it

Client messages (``on_client_message``): ``{"echo": x}`` is answered ``{"echoed": x}``,
``"ack"`` gets the plain acknowledgement, ``"refuse"`` an error, ``"crash"`` raises.

Hooks: X-Refuse refuses the upgrade (401, that body); X-User goes into
metadata (default "anonymous"); the first frame is a welcome naming the
connection id and the worker's pid. Anyone may subscribe except to channels
starting "forbidden"; "boom" makes the hook raise. Only a user other than
"anonymous" may publish, and not to channels starting "readonly".
"""

import base64
import json
import os
import threading

from flask import Flask, jsonify, request

from pgws_sync import Listener, ProtocolError, PubSub, Refused

app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=0.2, max_reconnect=2.0)
disconnects = []
disconnects_lock = threading.Lock()


class App(PubSub):
    def on_connect(self, conn, request):
        if "X-Refuse" in request.headers:
            raise Refused(401, request.headers["X-Refuse"])
        conn.metadata["user"] = request.headers.get("X-User", "anonymous")
        conn.send(json.dumps({"event": "welcome", "id": conn.id, "pid": os.getpid()}))

    def on_disconnect(self, conn):
        with disconnects_lock:
            disconnects.append(conn.id)

    def can_subscribe(self, conn, channel):
        if channel == "boom":
            raise RuntimeError("the hook failed on purpose")
        return not channel.startswith("forbidden")

    def presence_info(self, conn):
        return {"user": conn.metadata["user"]}

    def can_publish(self, conn, channel):
        return conn.metadata["user"] != "anonymous" and not channel.startswith("readonly")

    def on_client_message(self, conn, channel, payload, message_id):
        message = json.loads(payload)
        if message == "ack":
            return None
        if message == "refuse":
            raise ProtocolError("refused on purpose")
        if message == "crash":
            raise RuntimeError("the handler failed on purpose")
        return {"echoed": message.get("echo") if isinstance(message, dict) else message,
                "channel": channel, "user": conn.metadata["user"]}


options = json.loads(os.environ.get("PGWS_OPTIONS", "{}"))
if os.environ.get("PGWS_ORIGIN_SUFFIX"):
    options["check_origin"] = lambda req: req.headers.get("Origin", "").endswith(
        os.environ["PGWS_ORIGIN_SUFFIX"])
endpoint = App(listener, **options)
endpoint.init_app(app, "/ws")


@app.route("/")
def blank_page():
    """An empty page of this origin, for browser tests that load /pgws.js into it."""
    return "<!doctype html><title>pubsub test</title>\n"


def _message(body):
    if body.get("type") == "binary":
        return base64.b64decode(body["message"])
    return body["message"]


@app.route("/debug/stats")
def stats():
    with disconnects_lock:
        gone = list(disconnects)
    return jsonify(
        pid=os.getpid(),
        threads=len(threading.enumerate()),
        thread_names=sorted(t.name for t in threading.enumerate()),
        sockets=endpoint.connection_count,
        keys=endpoint.hub.key_count(),
        policies=endpoint.hub.policy_count(),
        connections=endpoint.connection_list(),
        disconnects=gone,
        batches=endpoint.batcher.pending(),
        listener=listener.status(),
        streams=endpoint.channels.streams.status() if endpoint.channels.durable else None,
        presence=endpoint.presence.status() if endpoint.presence is not None else None,
        rss_kb=_rss_kb(),
    )


def _rss_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


@app.route("/debug/publish", methods=["POST"])
def publish():
    body = request.get_json()
    message_id = endpoint.publish(body["channel"], _message(body), type=body.get("type", "json"),
                                  message_id=body.get("id"), reply_to=body.get("reply_to"))
    return jsonify(id=message_id, pid=os.getpid())


@app.route("/debug/send_to", methods=["POST"])
def send_to():
    body = request.get_json()
    message_id = endpoint.send_to(body["to"], _message(body), type=body.get("type", "json"),
                                  channel=body.get("channel"), message_id=body.get("id"),
                                  reply_to=body.get("reply_to"))
    return jsonify(id=message_id, pid=os.getpid())


@app.route("/debug/batch", methods=["POST"])
def batch():
    body = request.get_json()
    for message in body["messages"]:
        endpoint.publish_batched(body["channel"], body["key"], message, name=body["name"],
                                 window=body.get("window", 0.1), text=body.get("text", False))
    return jsonify(pid=os.getpid(), pending=endpoint.batcher.pending())


@app.route("/debug/cancel", methods=["POST"])
def cancel():
    body = request.get_json()
    return jsonify(cancelled=endpoint.cancel_batch(body["channel"], body["key"]), pid=os.getpid())


@app.route("/debug/prune", methods=["POST"])
def prune():
    return jsonify(deleted=endpoint.prune(), pid=os.getpid())


@app.route("/debug/close")
def close():
    endpoint.close(timeout=5.0)
    return jsonify(closed=True)


@app.route("/debug/control", methods=["POST"])
def control():
    """disconnect / subscribe_matching / unsubscribe_matching, cluster-wide."""
    body = request.get_json()
    match = body.get("match", {})
    if body["op"] == "disconnect":
        endpoint.disconnect(code=body.get("code", 4000), reason=body.get("reason", ""), **match)
    elif body["op"] == "subscribe":
        endpoint.subscribe_matching(body["channel"], **match)
    else:
        endpoint.unsubscribe_matching(body["channel"], **match)
    return jsonify(pid=os.getpid())
