"""Flask-Login, and a logout that closes the user's sockets in every worker and on every host.

A user logs in (Flask-Login keeps the session); each of their tabs opens a socket that
Push knows by the user id. Logging out calls ``disconnect_user`` with close code 4403:
every worker closes that user's sockets, and pgws.js does not reconnect after a code in
4400-4499 (it fires its ``close`` event with ``willReconnect: false``).

Run:  PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 200 -w 2 examples.logout:app
      (set SECRET_KEY in production: every worker signs sessions with it)
Open: http://127.0.0.1:8000/  (log in as anyone; open several tabs; log out in one)
"""

import os

from flask import Flask, redirect, request
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from pgws_sync import Listener, Push

#: The close code of a logout: 4403 is in 4400-4499, so pgws.js does not come back.
LOGGED_OUT = 4403


class User(UserMixin):
    def __init__(self, user_id):
        self.id = user_id


class Notifications(Push):
    def get_user(self, request):  # the upgrade is a Flask request: current_user works
        return current_user.get_id() if current_user.is_authenticated else None


app = Flask(__name__)
# Every worker must sign sessions with the same key. This fixed one is for trying the example.
app.secret_key = os.environ.get("SECRET_KEY") or "pgws_sync example key: set SECRET_KEY"
login_manager = LoginManager(app)
login_manager.user_loader(User)  # a real app loads the user from its database
notifications = Notifications(Listener(os.environ.get("PGWS_DB_URI", "")))
notifications.init_app(app, "/ws")


@app.route("/login", methods=["POST"])
def login():
    login_user(User(request.form["user"]))  # a real app checks a password first
    return redirect("/")


@app.route("/logout", methods=["POST"])
def logout():
    if current_user.is_authenticated:
        # every socket of this user, in every worker and host, closes with 4403
        notifications.disconnect_user(current_user.get_id(), code=LOGGED_OUT,
                                      reason="logged out")
    logout_user()
    return redirect("/")


PAGE = """<!doctype html><meta charset="utf-8"><title>pgws_sync logout</title>
<p>__WHO__ (<span id="state">connecting</span>)</p>
<form method="post" action="/login"><input name="user"> <button>log in</button></form>
<form method="post" action="/logout"><button>log out</button></form>
<script src="/pgws.js"></script>
<script>
  const sock = new PgwsSocket("/ws");
  const state = document.getElementById("state");
  sock.on("open", () => { state.textContent = "open"; });
  sock.on("close", (e) => {
    state.textContent = e.willReconnect ? "reconnecting" : `closed for good (${e.code} ${e.reason})`;
  });
  sock.on("message", (m) => console.log(m.payload));
</script>
"""


@app.route("/")
def page():
    who = f"logged in as {current_user.get_id()}" if current_user.is_authenticated else "a guest"
    return PAGE.replace("__WHO__", who)
