"""A Pgws endpoint as a plain WSGI application, without Flask (PGWS_OPTIONS: a JSON object of
endpoint options)."""

import json
import os

from pgws_sync import Pgws, Listener

application = Pgws(Listener(os.environ.get("PGWS_DB_URI", ""), min_reconnect=0.2,
                            max_reconnect=2.0), "pgws",
                   **json.loads(os.environ.get("PGWS_OPTIONS", "{}")))
