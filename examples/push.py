"""Notifications per user, per browser tab and per room, pushed by any backend (websocket-push's model).

Visitors are guests until they log in (a Flask session); logging in moves the
guest's open tabs to the user. Every tab joins the room "lobby"; a user also
joins "team-<name>". Backend services push through PostgreSQL, or through Redis
when PGWS_REDIS_URL is set; every worker delivers to its own sockets.

Run:  PGWS_DB_URI=postgresql://localhost/postgres \
      gunicorn -c python:pgws_sync.gunicorn --threads 200 -w 2 examples.push:app
      (add PGWS_REDIS_URL=redis://127.0.0.1:6379/0 to take backend messages from Redis)
Open: http://127.0.0.1:8000/  then  http://127.0.0.1:8000/login/alice  in another tab
Send: psql -c "select pg_notify('BackgroundPush', '{\"pushToRoom\": \"lobby\", \"payload\": {\"text\": \"hi all\"}}')"
      redis-cli publish BackgroundPush '{"pushToUser": "alice", "payload": {"text": "hi alice"}}'
      curl -X POST localhost:8000/notify/alice -H 'Content-Type: application/json' -d '{"text": "hi"}'
"""

import json
import os
import secrets

from flask import Flask, jsonify, redirect, request, session

from pgws_sync import Listener, Push, RedisSource


class Notifications(Push):
    def get_user(self, request):  # default: nobody (no header is trusted)
        return session.get("user")

    def get_guest(self, request):  # a visitor not logged in yet (never a user)
        return session.get("guest")

    def permit_join(self, user, room, request):
        return room == "lobby" or user is not None and room == f"team-{user}"


app = Flask(__name__)
# Every worker must sign sessions with the same key, or a login made in one worker is unknown
# to the others. This fixed key is for trying the example only: set SECRET_KEY in production.
app.secret_key = os.environ.get("SECRET_KEY") or "pgws_sync example key: set SECRET_KEY"
listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
source = RedisSource(os.environ["PGWS_REDIS_URL"]) if os.environ.get("PGWS_REDIS_URL") else None
# AuthEvents (a guest logging in) are signed with a secret every worker shares: no database
# role can forge one. The session key serves here.
notifications = Notifications(listener, source=source, auth_key=app.secret_key)
notifications.init_app(app, "/ws")

PAGE = """<!doctype html><meta charset="utf-8"><title>pgws_sync push</title>
<p>You are <b id="who"></b>, tab <code id="tab">…</code> (<span id="state">connecting</span>)</p>
<ul id="log"></ul>
<script src="/pgws.js"></script>
<script>
  const who = __WHO__;
  document.getElementById("who").textContent = who;
  const log = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    document.getElementById("log").prepend(li);
  };
  const sock = new PgwsSocket("/ws");
  sock.joinRoom("lobby").then(() => log("joined the lobby"));
  if (!who.startsWith("guest-")) sock.joinRoom("team-" + who).then(() => log("joined the team"));
  sock.on("open", () => { document.getElementById("state").textContent = "live"; });
  sock.on("close", () => { document.getElementById("state").textContent = "reconnecting"; });
  sock.on("tabwindow", (d) => { document.getElementById("tab").textContent = d.tabWindowId; });
  sock.on("message", (m) => log(JSON.stringify(m.payload !== undefined ? m.payload : m)));
  sock.on("resync", () => log("(reconnected: refetch what the page shows)"));
  sock.on("error", (e) => log("error: " + (e.error || e.message)));
</script>
"""


@app.route("/")
def index():
    if "user" not in session and "guest" not in session:
        session["guest"] = "guest-" + secrets.token_hex(4)
    who = json.dumps(session.get("user") or session["guest"]).replace("<", "\\u003c")
    return PAGE.replace("__WHO__", who)


@app.route("/login/<name>")
def login(name):
    guest = session.pop("guest", None)
    session["user"] = name
    if guest:
        notifications.authenticate(guest, name)  # the guest's open tabs become name's
    return redirect("/")


@app.route("/notify/<user>", methods=["POST"])
def notify(user):
    notifications.push_to_user(user, request.get_json(), tab_window_id=request.args.get("tab"))
    return jsonify(sent=True), 202
