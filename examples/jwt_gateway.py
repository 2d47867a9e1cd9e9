"""A postgres-websockets style gateway with the library API, and a page to try it.

Sockets open on /<channel> with a JWT (claims "mode": r, w or rw; "channel" or
"channels"); what a socket sends is NOTIFYed on "postgres-websockets-listener"
and reaches every reader of its channel. The page in examples/jwt_chat (served
from PGWS_ROOT_PATH) lets you paste a token, pick a channel, see and send messages.

Run:   PGWS_DB_URI=postgresql://localhost/postgres PGWS_JWT_SECRET=reallyreallyreallyreallyverysafe \
       PGWS_ROOT_PATH=examples/jwt_chat gunicorn -c python:pgws_sync.gunicorn examples.jwt_gateway:app
Token: python -c "import jwt; print(jwt.encode({'mode': 'rw', 'channels': ['chat']}, 'reallyreallyreallyreallyverysafe'))"
Send:  psql -c "select pg_notify('postgres-websockets-listener', '{\"channel\": \"chat\", \"text\": \"hi\"}')"
Same without Python code: PGWS_ROOT_PATH=examples/jwt_chat pgws-sync serve (port 3000).
"""

import os

from pgws_sync import JwtAuth, JwtGateway, Listener, static_files

listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=1.0, max_reconnect=30.0)
app = JwtGateway(
    listener,
    JwtAuth(os.environ["PGWS_JWT_SECRET"]),
    fallback=static_files(os.environ.get("PGWS_ROOT_PATH")
                          or os.path.join(os.path.dirname(__file__), "jwt_chat")),
)
