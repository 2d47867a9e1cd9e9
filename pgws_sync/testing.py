"""Testing an app's sockets with pytest: a real gunicorn serving it, a client, waiting helpers.

Use it as a pytest plugin, in your ``conftest.py``::

    pytest_plugins = ["pgws_sync.testing"]

    def test_orders_reach_the_browser(pgws_server, pgws_client):
        server = pgws_server("myapp:app", env={"PGWS_DB_URI": DSN})
        client = pgws_client(server)
        client.subscribe("orders")
        ...  # publish, as the app does
        assert client.next_message("orders") == {"id": 1}

or use :class:`Server`, :class:`Client` and :func:`wait_for` on their own. The server is
the app under gunicorn with pgws_sync's hooks (``-c python:pgws_sync.gunicorn``), as in
production; the client speaks the pub/sub protocol (``subscribe``, ``publish``,
``message``) and reads any JSON frame.
"""

from __future__ import annotations

import http.cookiejar
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from ._core.simple_ws import ConnectionClosed, HandshakeFailed, WsClient

__all__ = ["Server", "HttpSession", "Client", "UpgradeRefused", "wait_for", "free_port", "pgws_server",
           "pgws_client"]

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0,
             message: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy, and return that; raise
    ``AssertionError`` naming ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, timeout: float) -> Tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _quiet_gunicorn_args() -> List[str]:
    """No control socket where gunicorn has one (27 and later): every server of a test run
    would share its one path."""
    try:
        from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]
    except ImportError:
        return []
    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


class Server:
    """The WSGI app ``app`` (``"module:app"``) served by a real gunicorn on a free port.

    :param app: the app to serve, as gunicorn names it (``"module:app"``).
    :param env: environment variables added for the server (the database, say).
    :param threads: gunicorn threads (each open socket holds one).
    :param workers: gunicorn worker processes.
    :param cwd: directory to run in (default: this one), put first on ``PYTHONPATH``.
    :param args: more gunicorn arguments.
    """

    def __init__(self, app: str, *, env: Optional[Dict[str, str]] = None, threads: int = 32,
                 workers: int = 1, cwd: Union[str, Path, None] = None,
                 args: Sequence[str] = ()) -> None:
        self.app = app
        self.port = free_port()
        self.cwd = Path(cwd or os.getcwd())
        self.log_path = Path(tempfile.gettempdir()) / f"pgws-testing-{self.port}.log"
        full_env = dict(os.environ)
        full_env["PGWS_DRAIN_SECONDS"] = "0"  # stopping closes every socket at once
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(self.cwd) + os.pathsep + full_env.get("PYTHONPATH", "")
        self._cmd = [sys.executable, "-m", "gunicorn", "-c", "python:pgws_sync.gunicorn",
                     "-b", f"127.0.0.1:{self.port}", "-w", str(workers),
                     "--threads", str(threads), *_quiet_gunicorn_args(), *args, app]
        self._env = full_env
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    def start(self, timeout: float = 20.0, *, healthy: bool = True) -> "Server":
        """Start gunicorn and wait until ``/healthz`` answers (200 with ``healthy``)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self._cmd, cwd=self.cwd, env=self._env, stdout=log,
                                         stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            try:
                status, _ = _get(self.url("/healthz"), 1.0)
            except OSError:
                return False
            return status == 200 if healthy else status in (200, 503)

        wait_for(up, timeout, f"{self.app} to answer /healthz")
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self) -> "HttpSession":
        """A new HTTP session with this server, keeping its cookies (a logged-in user)."""
        return HttpSession(self)

    def log(self) -> str:
        """What gunicorn and the app logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class UpgradeRefused(AssertionError):
    """The server answered the WebSocket upgrade with an HTTP error (``status``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the upgrade was refused with HTTP {status}")
        self.status = status


class HttpSession:
    """Plain HTTP requests to a :class:`Server` that keep the cookies it sets, as a browser
    does: log in with it, then open a :class:`Client` with ``cookies=`` this session."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.jar = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method: str, path: str, *, json_body: Any = None,
                headers: Optional[Dict[str, str]] = None,
                timeout: float = 10.0) -> Tuple[int, str]:
        """``method path`` (with ``json_body`` sent as JSON): (status, body text)."""
        data = None if json_body is None else json.dumps(json_body).encode()
        sent = dict(headers or {})
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.server.url(path), data=data, method=method,
                                         headers=sent)
        try:
            with self._opener.open(request, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def get(self, path: str, **options: Any) -> Tuple[int, str]:
        return self.request("GET", path, **options)

    def post(self, path: str, json_body: Any = None, **options: Any) -> Tuple[int, str]:
        return self.request("POST", path, json_body=json_body, **options)

    def cookie_header(self) -> str:
        """The ``Cookie`` header a browser would send with its requests."""
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


class Client:
    """A WebSocket client for tests: reads frames with deadlines, speaks the pub/sub protocol.

    ``url`` is a ``ws://`` URL or a :class:`Server` (its ``/ws``); ``headers`` are sent with
    the upgrade (``Authorization``, ``Origin``...), and the cookies of ``cookies`` (an
    :class:`HttpSession`, logged in say) too. A refused upgrade raises
    :class:`UpgradeRefused` with the HTTP status.
    """

    def __init__(self, url: Union[str, Server], *, headers: Optional[Dict[str, str]] = None,
                 cookies: Optional[HttpSession] = None,
                 subprotocols: Optional[List[str]] = None) -> None:
        self.url = url.ws_url() if isinstance(url, Server) else url
        sent = dict(headers or {})
        if cookies is not None and cookies.cookie_header():
            sent["Cookie"] = cookies.cookie_header()
        try:
            self._ws = WsClient.connect(self.url, headers=sent, subprotocols=subprotocols)
        except HandshakeFailed as exc:
            raise UpgradeRefused(int(getattr(exc, "status_code", 0) or 0)) from None
        self._ids = itertools.count(1)
        self._pending: List[Any] = []  # JSON frames read while looking for another one

    def send(self, data: Union[str, bytes]) -> None:
        self._ws.send(data)

    def send_json(self, frame: Any) -> None:
        self._ws.send(json.dumps(frame))

    def recv(self, timeout: float = 10.0) -> Union[str, bytes]:
        """The next frame; ``AssertionError`` if none comes within ``timeout`` seconds."""
        frame = self._ws.receive(timeout=timeout)
        if frame is None:
            raise AssertionError(f"no frame within {timeout}s")
        return frame  # type: ignore[no-any-return]

    def recv_json(self, timeout: float = 10.0) -> Any:
        """The next frame, decoded (one read earlier by :meth:`recv_until` first)."""
        if self._pending:
            return self._pending.pop(0)
        return json.loads(self.recv(timeout))

    def recv_until(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """The first JSON frame ``predicate`` accepts; frames before it are kept for
        :meth:`recv_json` and the next calls."""
        for i, frame in enumerate(self._pending):
            if predicate(frame):
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; kept "
                                     f"{self._pending!r:.2000}")
            frame = json.loads(self.recv(left))
            if predicate(frame):
                return frame
            self._pending.append(frame)

    def _request(self, action: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        action["id"] = f"t{next(self._ids)}"
        self.send_json(action)
        reply: Dict[str, Any] = self.recv_until(
            lambda f: isinstance(f, dict) and f.get("reply_to") == action["id"], timeout)
        return reply

    def subscribe(self, channel: str, *, since: Optional[int] = None,
                  epoch: Optional[str] = None, timeout: float = 10.0) -> Dict[str, Any]:
        """Subscribe (resuming after offset ``since`` of ``epoch`` on a durable endpoint);
        returns the ``subscribed`` reply, raises ``AssertionError`` on an error reply."""
        action: Dict[str, Any] = {"action": "subscribe", "channel": channel}
        if since is not None:
            action["since"] = since
            if epoch is not None:
                action["epoch"] = epoch
        reply = self._request(action, timeout)
        if reply.get("event") not in ("subscribed", "resync_required"):
            raise AssertionError(f"subscribing to {channel!r} was refused: {reply}")
        return reply

    def publish(self, channel: str, payload: Any, timeout: float = 10.0) -> Dict[str, Any]:
        """Publish ``payload`` (a value, sent as JSON) as the client; returns the reply."""
        return self._request({"action": "publish", "channel": channel, "payload": payload},
                             timeout)

    def next_message(self, channel: str, timeout: float = 10.0) -> Any:
        """The payload of the next message on ``channel`` (frames of others are kept)."""
        frame = self.recv_until(lambda f: isinstance(f, dict) and f.get("channel") == channel
                                and "payload" in f and "event" not in f, timeout)
        return frame["payload"]

    def nothing_within(self, seconds: float) -> bool:
        """Whether no frame at all arrives within ``seconds``."""
        if self._pending:
            return False
        try:
            self._pending.append(json.loads(self.recv(seconds)))
        except AssertionError:
            return True
        return False

    def expect_close(self, timeout: float = 10.0) -> Tuple[Optional[int], Optional[str]]:
        """Read until the server closes; (code, reason). ``AssertionError`` on a frame."""
        try:
            frame = self._ws.receive(timeout=timeout)
        except ConnectionClosed as exc:
            return exc.reason, exc.message
        raise AssertionError(f"expected a close, got {frame!r}")

    def close(self) -> None:
        try:
            self._ws.close()
        except ConnectionClosed:
            pass
        self._ws.thread.join(5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------ pytest fixtures

try:
    import pytest
except ImportError:  # plain use of Server and Client needs no pytest
    pass
else:
    @pytest.fixture
    def pgws_server() -> Iterator[Callable[..., Server]]:
        """``pgws_server("module:app", env=..., ...)``: a started :class:`Server`, stopped
        when the test ends (``server.log()`` holds what it logged)."""
        made: List[Server] = []

        def start(app: str, **options: Any) -> Server:
            server = Server(app, **options)
            made.append(server)
            return server.start()

        yield start
        for server in made:
            server.stop()

    @pytest.fixture
    def pgws_client() -> Iterator[Callable[..., Client]]:
        """``pgws_client(server_or_url, headers=...)``: a :class:`Client`, closed when the
        test ends."""
        made: List[Client] = []

        def connect(url: Union[str, Server], **options: Any) -> Client:
            client = Client(url, **options)
            made.append(client)
            return client

        yield connect
        for client in made:
            client.close()
