"""A live-table app for the end-to-end tests: a durable PubSub and a route that loads a page.

PGWS_DB_URI      the database
PGWS_LOG_SCHEMA  the durable log's schema

``GET /load?table=T&channel=C[&customer=N]`` answers ``{"rows": [...], "position": {...}}``
from :func:`pgws_sync.load_live`; ``/`` is a blank page for browser tests.
"""

import os

import psycopg2
from flask import Flask, abort, jsonify, request
from psycopg2 import sql

from pgws_sync import Listener, PubSub, load_live

DSN = os.environ.get("PGWS_DB_URI", "")
SCHEMA = os.environ.get("PGWS_LOG_SCHEMA", "pgws_sync")

app = Flask(__name__)
listener = Listener(DSN, min_reconnect=0.2, max_reconnect=2.0)


class Live(PubSub):
    def can_subscribe(self, conn, channel):
        return not channel.startswith("forbidden")


channels = Live(listener, durable=True, log_schema=SCHEMA)
channels.init_app(app, "/ws")


@app.route("/")
def blank_page():
    return "<!doctype html><title>live test</title>\n"


@app.route("/load")
def load():
    table, channel = request.args.get("table"), request.args.get("channel")
    if not table or not channel:
        abort(400)
    query = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(table))
    params = ()
    if "customer" in request.args:
        query = sql.SQL("SELECT * FROM {} WHERE customer = %s ORDER BY id").format(
            sql.Identifier(table))
        params = (int(request.args["customer"]),)
    conn = psycopg2.connect(DSN)
    try:
        with conn:
            loaded = load_live(conn, query.as_string(conn), channel, params, log_schema=SCHEMA)
    finally:
        conn.close()
    return jsonify(loaded.to_json())
