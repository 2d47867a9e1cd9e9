"""Helpers for the pub/sub end-to-end tests: the test app under gunicorn, clients, POSTs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

from psycopg2 import sql

from .helpers import Gunicorn, Ws, http_get, wait_for

APP = "tests.apps.pubsub_app:app"


def serve_pubsub(pg_dsn: str, options: Optional[Dict[str, Any]] = None,
                 extra_env: Optional[Dict[str, str]] = None, *, wait: bool = True,
                 **kwargs: Any) -> Gunicorn:
    """The pub/sub test app under gunicorn; with ``wait``, once it answers /healthz."""
    env = {"PGWS_DB_URI": pg_dsn, "PGWS_OPTIONS": json.dumps(options or {}), **(extra_env or {})}
    server = Gunicorn(APP, env=env, **kwargs)
    return server.wait_up() if wait else server


def post(server: Gunicorn, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
    request = urllib.request.Request(server.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode()[:2000]}") from None


def stats(server: Gunicorn) -> Dict[str, Any]:
    status, body = http_get(server.url("/debug/stats"))
    assert status == 200, body
    return json.loads(body)


def wait_sockets(server: Gunicorn, n: int) -> None:
    wait_for(lambda: stats(server)["sockets"] == n, message=f"{n} registered sockets")


class Client:
    """A pub/sub client: reads its welcome frame, sends actions, reads replies and messages."""

    def __init__(self, server: Gunicorn, headers: Optional[Dict[str, str]] = None) -> None:
        self.ws = Ws(server.ws_url(), headers=headers)
        welcome = self.ws.recv_json()
        assert welcome["event"] == "welcome", welcome
        self.id: str = welcome["id"]
        self.pid: int = welcome["pid"]

    def send(self, **action: Any) -> None:
        self.ws.client.send(json.dumps(action))

    def request(self, **action: Any) -> Dict[str, Any]:
        self.send(**action)
        return self.ws.recv_json()

    def subscribe(self, channel: str, **extra: Any) -> None:
        reply = self.request(action="subscribe", channel=channel, id="sub-" + channel, **extra)
        assert reply == {"event": "subscribed", "channel": channel, "reply_to": "sub-" + channel}, reply

    def recv(self, timeout: float = 10.0) -> Any:
        return self.ws.recv(timeout)

    def recv_json(self, timeout: float = 10.0) -> Any:
        return self.ws.recv_json(timeout)

    def close(self) -> None:
        self.ws.close()


def sql_publish(conn: Any, channel: str, payload_sql: str = "json_build_object('n', %s)",
                args: tuple = (), pubsub_channel: str = "pgws_sync") -> None:
    """Publish from SQL exactly as docs/protocol.md shows (json_build_object)."""
    query = sql.SQL("SELECT pg_notify({}, json_build_object('channel', {}, 'payload', "
                    + payload_sql + ")::text)").format(sql.Literal(pubsub_channel),
                                                      sql.Literal(channel))
    with conn.cursor() as cur:
        cur.execute(query, args)


def until_event(client: Client, event: str, timeout: float = 10.0) -> List[Any]:
    """Frames read until one with ``"event": event``; returns (frames before, that frame)."""
    seen: List[Any] = []
    while True:
        frame = client.recv(timeout)
        decoded = json.loads(frame) if isinstance(frame, str) else frame
        if isinstance(decoded, dict) and decoded.get("event") == event:
            return [seen, decoded]
        seen.append(decoded)
