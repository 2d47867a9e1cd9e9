"""Chat rooms: the members of a room read its history and write to it from the browser.

Membership lives in the app's database (Flask-SQLAlchemy); the socket's hooks ask it. A
member's message is stamped with its author by the server, kept in the room's durable
channel, and reaches every member's tabs once, including tabs that were away.

Run:  PGWS_DB_URI=postgresql+psycopg://localhost/postgres pgws-sync migrate && \\
      PGWS_DB_URI=postgresql+psycopg://localhost/postgres \\
      gunicorn -c python:pgws_sync.gunicorn --threads 100 examples.chat:app
Use:  a page: sock.subscribe("lobby"); sock.send({action: "message", channel: "lobby",
      payload: {text: "hi"}}) (after POST /login/<name> and POST /rooms/lobby/join)
Test: PGWS_DB_URI=... pytest examples/test_chat.py
"""

import json
import os

from flask import Flask, session
from flask_sqlalchemy import SQLAlchemy

from pgws_sync import Listener, ProtocolError, PubSub, Refused

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("PGWS_DB_URI", "")
app.secret_key = os.environ.get("SECRET_KEY") or "pgws_sync example key: set SECRET_KEY"
db = SQLAlchemy(app)


class Member(db.Model):
    __tablename__ = "chat_members"
    room = db.Column(db.Text, primary_key=True)
    user = db.Column(db.Text, primary_key=True)


class Rooms(PubSub):
    def on_connect(self, conn, request):
        if "user" not in session:  # the upgrade is a Flask request: the session works here
            raise Refused(401, "log in first")
        conn.metadata["user"] = session["user"]

    def can_subscribe(self, conn, channel):
        # a later hook: no request, but a fresh app context, so db.session works
        return db.session.get(Member, (channel, conn.metadata["user"])) is not None

    def on_client_message(self, conn, channel, payload, message_id):
        if channel is None or not self.can_subscribe(conn, channel):
            raise ProtocolError("only the room's members may write to it")
        text = json.loads(payload).get("text") if payload.startswith("{") else None
        if not isinstance(text, str) or not 0 < len(text) <= 2000:
            raise ProtocolError("a message is {\"text\": \"...\"}, 1 to 2000 characters")
        self.publish(channel, {"from": conn.metadata["user"], "text": text},
                     reply_to=message_id)  # the writer's tab knows its own message by it
        # None: the writer gets {"event": "received", "reply_to": <its id>}


rooms = Rooms(Listener(app.config["SQLALCHEMY_DATABASE_URI"]), durable=True)
rooms.init_app(app, "/ws")

with app.app_context():
    db.create_all()


@app.post("/login/<name>")
def login(name):
    session["user"] = name
    return "", 204


@app.post("/rooms/<room>/join")
def join(room):
    if "user" not in session:
        return "log in first", 401
    if db.session.get(Member, (room, session["user"])) is None:
        db.session.add(Member(room=room, user=session["user"]))
        db.session.commit()
    return "", 204
