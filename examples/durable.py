"""Durable channels: an order's new state reaches every tab once, even one that was away.

The state changes and its message commit in one transaction (or neither does).
Browsers subscribe to "orders" (pgws.js: sock.subscribe("orders")); after any
disconnect they resume from the last offset they saw (docs/guides/durable.md).

Run:  PGWS_DB_URI=postgresql://localhost/postgres pgws-sync migrate && \
      PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 200 -w 2 examples.durable:app
Send: curl -X POST localhost:8000/orders/42 -H 'Content-Type: application/json' -d '"shipped"'
      psql -c "select pgws_sync.publish('orders', '{\"id\": 7, \"state\": \"paid\"}')"
"""

import os

import psycopg2
from flask import Flask, request

from pgws_sync import Listener, PubSub, publish_durable

DSN = os.environ.get("PGWS_DB_URI", "")

app = Flask(__name__)
listener = Listener(DSN, min_reconnect=1.0, max_reconnect=30.0)
orders = PubSub(listener, durable=True, public=True)  # every tab may follow every order
orders.init_app(app, "/ws")


@app.route("/orders/<int:order_id>", methods=["POST"])
def set_state(order_id):
    conn = psycopg2.connect(DSN)
    try:
        with conn:  # one transaction: your UPDATE of the order would go here too
            publish_durable(conn, "orders", {"id": order_id, "state": request.get_json()})
    finally:
        conn.close()
    return "", 202
