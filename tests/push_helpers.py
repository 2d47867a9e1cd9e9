"""Helpers for the push end-to-end tests: the push app under gunicorn, backend messages, clients."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

from .helpers import Gunicorn, Ws, http_get, wait_for

APP = "tests.apps.push_app:app"


#: The secret the test app signs AuthEvents with (Push(auth_key=...)).
AUTH_KEY = "test-auth-key-for-signed-auth-events"


def serve_push(pg_dsn: str, redis_url: Optional[str] = None,
               options: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Gunicorn:
    """The push app under gunicorn; backend messages from Redis when ``redis_url`` is given."""
    env = {"PGWS_DB_URI": pg_dsn, "PGWS_OPTIONS": json.dumps(options or {})}
    if redis_url:
        env["PGWS_REDIS_URL"] = redis_url
    return Gunicorn(APP, env=env, **kwargs).wait_up()


def _post(server: Gunicorn, path: str, data: bytes, content_type: str) -> Dict[str, Any]:
    request = urllib.request.Request(server.url(path), data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode()[:2000]}") from None


def push(server: Gunicorn, message: Any) -> Dict[str, Any]:
    """Send a backend message (a dict, or text sent as is) through the app's push source."""
    text = message if isinstance(message, str) else json.dumps(message)
    return _post(server, "/debug/push", text.encode("utf-8"), "text/plain; charset=utf-8")


def api(server: Gunicorn, body: Dict[str, Any]) -> Dict[str, Any]:
    """Call the server-side API (push_to_user / push_to_room / authenticate) in some worker."""
    return _post(server, "/debug/api", json.dumps(body).encode(), "application/json")


def stats(server: Gunicorn) -> Dict[str, Any]:
    status, body = http_get(server.url("/debug/stats"))
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


class Tab(Ws):
    """A browser tab's socket: reads its tabWindowId, joins and leaves rooms."""

    def __init__(self, server: Gunicorn, user: Optional[str] = None, guest: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, hello: bool = False) -> None:
        headers = dict(headers or {})
        if user is not None:
            headers["X-Auth-User"] = user
        if guest is not None:
            headers["X-Auth-Guest"] = guest
        super().__init__(server.ws_url("/ws?hello=1" if hello else "/ws"), headers=headers)
        first = self.recv_json()
        assert list(first) == ["tabWindowId"], first
        self.tab: str = first["tabWindowId"]
        #: The worker's pid, with ``hello`` (the app says it right after the tab window id).
        self.pid: Optional[int] = self.recv_json()["pid"] if hello else None

    def send(self, frame: Any) -> None:
        self.client.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    def join(self, room: str) -> None:
        self.send({"joinRoom": room})
        reply = self.recv_json()
        assert reply == {"event": "joined", "room": room}, reply

    def leave(self, room: str) -> None:
        self.send({"leaveRoom": room})
        reply = self.recv_json()
        assert reply == {"event": "left", "room": room}, reply


def wait_sockets(server: Gunicorn, n: int) -> None:
    wait_for(lambda: stats(server)["sockets"] == n, message=f"{n} registered sockets")
