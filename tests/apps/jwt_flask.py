"""A Flask app with the JWT gateway mounted at /ws (werkzeug's DispatcherMiddleware), for the tests.

PGWS_DB_URI, PGWS_JWT_SECRET and PGWS_LISTEN_CHANNEL as for tests/apps/jwt_app.py.
"""

import os

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from pgws_sync import JwtAuth, JwtGateway, Listener

app = Flask(__name__)
gateway = JwtGateway(Listener(os.environ["PGWS_DB_URI"]), JwtAuth(os.environ["PGWS_JWT_SECRET"]),
                     listen_channel=os.environ["PGWS_LISTEN_CHANNEL"])
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/ws": gateway})  # type: ignore[method-assign]


@app.route("/")
def index() -> str:
    return "the Flask app"
