"""Helpers of the JWT gateway tests: tokens, refused upgrades, a plain database listener."""

from __future__ import annotations

import http.client
import select
import warnings
from typing import Any, Dict, Optional, Tuple

import jwt
import psycopg2

from .helpers import Gunicorn, wait_for

#: The secret of postgres-websockets' own tests.
SECRET = "reallyreallyreallyreallyverysafe"


def make_token(claims: Dict[str, Any], secret: Any = SECRET, alg: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short test keys
        return jwt.encode(claims, secret, algorithm=alg)


def upgrade_refused(server: Gunicorn, path: str,
                    headers: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """Ask for a WebSocket on ``path``; return the HTTP status and body of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


class DbListener:
    """A plain PostgreSQL session LISTENing on one channel: what the database sees."""

    def __init__(self, dsn: str, channel: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(f'LISTEN "{channel}"')

    def next(self, timeout: float = 10.0, *, skip_meta: bool = True) -> str:
        """The next payload, skipping the meta events of sockets opening and closing."""
        def arrived() -> Any:
            if not self.conn.notifies:
                select.select([self.conn], [], [], 0.05)
                self.conn.poll()
            while self.conn.notifies:
                payload = self.conn.notifies.pop(0).payload
                if not skip_meta or not payload.startswith(('{"event":"ConnectionOpen"',
                                                            '{"event":"ConnectionClose"')):
                    return payload
            return None
        return wait_for(arrived, timeout, "a notification in the database")

    def close(self) -> None:
        self.conn.close()
