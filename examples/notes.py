"""Notes: a Flask app written the usual way (Flask-SQLAlchemy, Flask-Login) with live updates.

A note a user saves reaches every open tab of that user once, even a tab that was away
(a durable channel per user). The note and its message commit in db.session's one
transaction, or neither does. The socket's hooks use current_user and db.session like any
view, and hold no database connection while the socket is open.

Run:  PGWS_DB_URI=postgresql+psycopg://localhost/postgres pgws-sync migrate && \
      PGWS_DB_URI=postgresql+psycopg://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 100 examples.notes:app
      (PGWS_DB_URI is the app's SQLAlchemy URL, as it has it)
Use:  curl -c jar -X POST localhost:8000/login/ann
      curl -b jar -X POST localhost:8000/notes -H 'Content-Type: application/json' -d '{"text": "hi"}'
      then open localhost:8000/ with that session (its page lists notes as they are saved)
Test: PGWS_DB_URI=... pytest examples/test_notes.py
"""

import os

from flask import Flask, abort, jsonify, request
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user, logout_user
from flask_sqlalchemy import SQLAlchemy

from pgws_sync import Listener, PubSub, Refused, publish_durable

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("PGWS_DB_URI", "")
app.secret_key = os.environ.get("SECRET_KEY", "dev only: set SECRET_KEY, the same in every worker")
db = SQLAlchemy(app)
login_manager = LoginManager(app)


class User(db.Model, UserMixin):
    __tablename__ = "notes_users"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.Text, unique=True, nullable=False)


class Note(db.Model):
    __tablename__ = "notes_notes"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("notes_users.id"), nullable=False)
    text = db.Column(db.Text, nullable=False)


@login_manager.user_loader
def load_user(user_id):
    return db.session.get(User, int(user_id))


def channel_of(user_id):
    return f"notes.{user_id}"


class Notes(PubSub):
    def on_connect(self, conn, request):
        # The upgrade is a Flask request: current_user and db.session work here.
        if not current_user.is_authenticated:
            raise Refused(401, "log in first")
        conn.metadata["user_id"] = current_user.id  # later hooks have no request: keep it

    def can_subscribe(self, conn, channel):
        # A later hook: a fresh app context (db.session works), no request, no current_user.
        return channel == channel_of(conn.metadata["user_id"])


# The app's SQLAlchemy URL works as it is (postgresql+psycopg://, postgresql+psycopg2://).
notes = Notes(Listener(app.config["SQLALCHEMY_DATABASE_URI"]), durable=True)
notes.init_app(app, "/ws")

with app.app_context():
    db.create_all()


PAGE = """<!doctype html><meta charset="utf-8"><title>notes</title><ul id="notes"></ul>
<script src="/pgws.js"></script>
<script>
  const sock = new PgwsSocket("/ws", {storage: sessionStorage});  // resumes across reloads
  sock.on("message", (m) => {
    const li = document.createElement("li");
    li.textContent = m.payload.text;
    document.getElementById("notes").append(li);
  });
  sock.subscribe("__CHANNEL__").then(() => { document.body.dataset.live = "yes"; });
</script>"""


@app.get("/")
@login_required
def index():
    return PAGE.replace("__CHANNEL__", channel_of(current_user.id))  # notes.<int>: no escaping


@app.post("/login/<name>")
def login(name):
    user = db.session.execute(db.select(User).filter_by(name=name)).scalar_one_or_none()
    if user is None:
        user = User(name=name)
        db.session.add(user)
        db.session.commit()
    login_user(user)
    return jsonify(id=user.id, channel=channel_of(user.id))


@app.post("/logout")
def logout():
    logout_user()  # sockets already open stay open; the next upgrade is refused (401)
    return "", 204


@app.post("/notes")
@login_required
def add_note():
    text = (request.get_json(silent=True) or {}).get("text")
    if not isinstance(text, str) or not text:
        abort(400)
    note = Note(user_id=current_user.id, text=text)
    db.session.add(note)
    db.session.flush()  # the note's id, inside the transaction
    publish_durable(db.session, channel_of(current_user.id), {"id": note.id, "text": text})
    db.session.commit()  # the note and its message, together
    return jsonify(id=note.id), 201
