"""A Flask-SQLAlchemy app as most are written, under gunicorn: hooks that use ``db.session``,
routes that publish inside ``db.session``'s transaction.

PGWS_DB_URI        the database, as the app has it (a SQLAlchemy URL, e.g. postgresql+psycopg://)
PGWS_LOG_SCHEMA    the durable log's schema (the endpoint is durable)
PGWS_HOLD_REQUEST  "1": init_app(..., hold_request=True)
PGWS_APP_NAME      the application_name of the app's pooled connections

The pool is small on purpose (3 + 2 overflow, 3 s timeout). ``on_connect`` and
``can_subscribe`` query ``db.session``; POST /notes inserts a row and publishes it in the
same transaction (``{"text": ..., "rollback": true}`` rolls both back, ``"json": true``
publishes JSON text with ``json_text=True``).
"""

import os
import threading

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import text

from pgws_sync import Listener, PubSub, publish_durable

URL = os.environ.get("PGWS_DB_URI", "")
SCHEMA = os.environ.get("PGWS_LOG_SCHEMA", "pgws_sync")

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = URL
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
    "pool_size": 3, "max_overflow": 2, "pool_timeout": 3,
    "connect_args": {"application_name": os.environ.get("PGWS_APP_NAME", "sqla_app")},
}
db = SQLAlchemy(app)
teardowns = {"count": 0}
teardowns_lock = threading.Lock()


class Note(db.Model):  # type: ignore[name-defined]
    __tablename__ = "sqla_notes"
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.Text, nullable=False)


@app.teardown_appcontext
def count_teardown(exc):
    with teardowns_lock:
        teardowns["count"] += 1


class Notes(PubSub):
    def on_connect(self, conn, request):
        conn.metadata["notes"] = db.session.execute(text("SELECT count(*) FROM sqla_notes")).scalar()
        conn.send('{"event": "welcome", "id": "%s", "pid": %d}' % (conn.id, os.getpid()))

    def can_subscribe(self, conn, channel):
        # a later hook: a fresh app context, so db.session works and is removed afterwards
        return db.session.execute(text("SELECT 1")).scalar() == 1


listener = Listener(URL, min_reconnect=0.2, max_reconnect=2.0)
notes = Notes(listener, durable=True, log_schema=SCHEMA)
notes.init_app(app, "/ws", hold_request=os.environ.get("PGWS_HOLD_REQUEST") == "1")

with app.app_context():
    db.create_all()


@app.route("/notes", methods=["POST"])
def add_note():
    body = request.get_json()
    note = Note(text=body["text"])
    db.session.add(note)
    db.session.flush()
    if body.get("json"):
        publish_durable(db.session, "notes", '{"id": %d, "text": "%s"}' % (note.id, note.text),
                        json_text=True, schema=SCHEMA)
    else:
        publish_durable(db.session, "notes", {"id": note.id, "text": note.text}, schema=SCHEMA)
    if body.get("rollback"):
        db.session.rollback()
        return jsonify(rolled_back=True)
    db.session.commit()
    return jsonify(id=note.id)


@app.route("/debug/stats")
def stats():
    with teardowns_lock:
        counted = teardowns["count"]
    return jsonify(pid=os.getpid(), sockets=len(notes.hub), teardowns=counted,
                   pool=db.engine.pool.status())
