"""Channels: browsers subscribe, the app and SQL publish; any worker reaches every subscriber.

Browsers send {"action": "subscribe", "channel": "prices"} (see docs/protocol.md).
Users named in X-User (set by an authenticating proxy) may publish to "chat".
Price updates are batched: everything for one symbol within 0.2 s leaves as one
message, and a slow client loses old prices (a "gap" frame) instead of its socket.

Run:  PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 200 -w 2 examples.pubsub:app
Send: curl -X POST localhost:8000/prices/ACME -H 'Content-Type: application/json' -d '12.5'
      psql -c "select pg_notify('pgws_sync', json_build_object('channel', 'chat',
               'payload', json_build_object('text', 'hello from SQL'))::text)"
"""

import os

from flask import Flask, jsonify, request

from pgws_sync import Listener, PubSub


class Channels(PubSub):
    def on_connect(self, conn, request):
        conn.metadata["user"] = request.headers.get("X-User")

    def can_subscribe(self, conn, channel):
        return channel in ("prices", "chat")

    def can_publish(self, conn, channel):
        return channel == "chat" and conn.metadata["user"] is not None


app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
channels = Channels(listener, backpressure="drop")
channels.init_app(app, "/ws")


@app.route("/prices/<symbol>", methods=["POST"])
def price(symbol):
    channels.publish_batched("prices", symbol, {"symbol": symbol, "price": request.get_json()},
                             name="prices", window=0.2)
    return "", 202


@app.route("/connections")
def connections():
    return jsonify(count=channels.connection_count, connections=channels.connection_list())
