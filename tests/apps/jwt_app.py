"""The JWT gateway built with the library API, for the end-to-end tests (configured by environment).

PGWS_DB_URI          the database
PGWS_JWT_SECRET      the JWT secret (a string, JWK or JWKS; no @file here)
PGWS_LISTEN_CHANNEL  the NOTIFY channel
PGWS_META_CHANNEL    optional meta channel
PGWS_ROOT_PATH       optional folder of static files
PGWS_POOL_SIZE       write connections (default 10)
PGWS_OPTIONS         JSON object of more JwtGateway options (e.g. client_rate)
"""

import json
import os

from pgws_sync import JwtAuth, JwtGateway, Listener, static_files

listener = Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=0.2, max_reconnect=2.0)
root = os.environ.get("PGWS_ROOT_PATH")
app = JwtGateway(
    listener,
    JwtAuth(os.environ["PGWS_JWT_SECRET"]),
    listen_channel=os.environ["PGWS_LISTEN_CHANNEL"],
    meta_channel=os.environ.get("PGWS_META_CHANNEL") or None,
    pool_size=int(os.environ.get("PGWS_POOL_SIZE", "10")),
    fallback=static_files(root) if root else None,
    **json.loads(os.environ.get("PGWS_OPTIONS", "{}")),
)
