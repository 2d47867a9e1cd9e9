"""The WebSocket endpoint: HTTP checks, the upgrade, each connection's life, health and shutdown."""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from contextlib import nullcontext
from functools import partial
from typing import (Any, Callable, ContextManager, Dict, Iterable, Iterator, List, NamedTuple,
                    Optional, Sequence, Tuple, Union)

from werkzeug.wrappers import Request, Response

from .. import _metrics
from .._formats import SUBPROTOCOL_V2, error_frame, parse_ping, pong_frame
from ..errors import ConfigError, Refused
from .assets import StartResponse, WSGIEnviron, client_js_response
from .connection import (
    DEFAULT_MAX_QUEUE_BYTES,
    SLOW_CLIENT_REASON,
    Connection,
    GuardedSocket,
)
from .._threads import WakingEvent
from .health import SHUTTING_DOWN, Health, HealthLog, health_answer
from .hub import Hub
from .limits import TokenBucket
from .origin import origin_allowed, request_scheme
from .reader import reading_thread
from .simple_ws import (
    ConnectionClosed,
    HandshakeFailed,
    accept,
    accept_plain,
    chosen_subprotocol,
    header_tokens,
    limit_inbound,
)
from .wire import CloseCode, Frame, valid_key

logger = logging.getLogger(__name__)

_live_endpoints: "weakref.WeakSet[WebSocketEndpoint]" = weakref.WeakSet()


class _SocketBudget:
    """The sockets open in this process (they share the server's threads), per address too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the three fields below
        self.open = 0
        self.by_address: Dict[str, int] = {}
        #: The server's threads per worker, when the gunicorn hook said (None: unknown).
        self.threads: Optional[int] = None

    def take(self, address: str, cap: Optional[int], per_address: Optional[int]) -> bool:
        """Count one more socket, if the caps allow it."""
        with self._lock:
            mine = self.by_address.get(address, 0)
            if (cap is not None and self.open >= cap) or \
                    (per_address is not None and mine >= per_address):
                return False
            self.open += 1
            self.by_address[address] = mine + 1
            return True

    def give_back(self, address: str) -> None:
        with self._lock:
            self.open -= 1
            left = self.by_address.get(address, 1) - 1
            if left > 0:
                self.by_address[address] = left
            else:
                self.by_address.pop(address, None)


_sockets = _SocketBudget()


def set_worker_threads(threads: int) -> None:
    """Tell the endpoints how many threads this worker serves requests with (the gunicorn
    hook does): ``max_sockets="auto"`` leaves some of them to plain requests."""
    _sockets.threads = threads


def auto_socket_cap(threads: int) -> int:
    """The sockets a worker of ``threads`` threads takes with ``max_sockets="auto"``: all but
    a tenth of them, and at least 4, kept for plain requests."""
    return max(0, threads - max(4, -(-threads // 10)))

#: The reason of a drain's 1012 close: when to come back (pgws.js reads it).
RESTART_REASON = "restart: reconnect after 1.0s"

#: The audience a connection belongs to unless the endpoint decides otherwise.
DEFAULT_AUDIENCE = "default"


class _SocketDone(Response):
    """Returned once a socket is over: tells the web server the connection is gone.

    gunicorn ends the request on StopIteration, Werkzeug's server on
    ConnectionError; neither then writes anything into the used-up socket.
    """

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        if "gunicorn.socket" in environ:
            raise StopIteration()
        if "werkzeug.socket" in environ:
            raise ConnectionError()
        return []


class _ServeAfterRequest(Response):
    """Returned by the Flask route for an admitted socket: the socket is served once Flask has
    ended the request (its ``teardown_request`` and ``teardown_appcontext`` functions have run,
    so e.g. Flask-SQLAlchemy's session is removed and its connection back in the pool).

    Flask calls a response inside the request's context and pops the context afterwards; the
    body it returns is iterated by the web server after that. Iterating this one serves the
    socket, then ends the request as :class:`_SocketDone` does.
    """

    #: The key of the request's environ that holds it until the request's teardown.
    ENVIRON_KEY = "pgws_sync.admitted"

    def __init__(self, serve: Callable[[], None], drop: Callable[[], None]) -> None:
        super().__init__()
        self._serve: Optional[Callable[[], None]] = serve
        self._drop = drop
        self._called = False

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        self._called = True
        return _ServingBody(self, environ)

    def take(self) -> Optional[Callable[[], None]]:
        serve, self._serve = self._serve, None
        return serve

    def drop_unless_answered(self) -> None:
        """At the request's teardown: if Flask answered with something else (an
        ``after_request`` function failed, say), the socket will never be served; end it."""
        if not self._called and self.take() is not None:
            self._drop()

    def __del__(self) -> None:
        if self.take() is not None:  # dropped by a middleware after Flask: end it still
            try:
                self._drop()
            except Exception:  # noqa: BLE001 (a finaliser must not raise; at exit, say)
                pass


class _ServingBody:
    """The body of :class:`_ServeAfterRequest`: serving happens when the server iterates it."""

    def __init__(self, response: _ServeAfterRequest, environ: WSGIEnviron) -> None:
        self._response = response
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        serve = self._response.take()
        if serve is not None:
            serve()
        _SocketDone()(self._environ, _no_start_response)
        return iter(())


def _drop_unanswered(exc: Optional[BaseException]) -> None:
    """Flask ``teardown_request``: end an admitted socket Flask did not answer with."""
    import flask

    pending = flask.request.environ.pop(_ServeAfterRequest.ENVIRON_KEY, None)
    if isinstance(pending, _ServeAfterRequest):
        pending.drop_unless_answered()


def _no_start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], Any]:
    raise RuntimeError("a used-up WebSocket gets no HTTP response")


def _app_response(response: Response, app: Any) -> Response:
    """``response`` as an instance of the Flask app's response class, keeping what it does when
    called: Flask would otherwise convert a socket's ending into a plain response (``force_type``)
    that writes an HTTP answer into the used-up socket."""
    base = app.response_class
    if isinstance(response, base) or not isinstance(response, (_SocketDone, _ServeAfterRequest)):
        return response
    kind = type(response)
    key = (kind, base)
    cls = _app_response_classes.get(key)
    if cls is None:
        cls = _app_response_classes.setdefault(key, type(kind.__name__, (kind, base), {}))
    response.__class__ = cls
    return response


_app_response_classes: Dict[Tuple[type, type], type] = {}


def _text_response(status: int, text: str, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain", headers=headers)


def _hook_context(app: Any) -> ContextManager[Any]:
    """A fresh application context of the Flask ``app`` for one hook call (None: none)."""
    return nullcontext() if app is None else app.app_context()


class _Admitted(NamedTuple):
    """A socket past :meth:`WebSocketEndpoint.on_connect`, not served yet."""

    conn: Connection
    environ: WSGIEnviron
    key: str
    raw: Any
    address: str


class _FrameHandler:
    """A served socket's ``on_message``: each client frame through the endpoint, in a fresh
    application context of ``app`` when there is one. The client's rate bucket is made
    with its first frame (most sockets of a fan-out never send one)."""

    __slots__ = ("endpoint", "conn", "app", "bucket")

    def __init__(self, endpoint: "WebSocketEndpoint", conn: Connection, app: Any) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.app = app
        self.bucket: Optional[TokenBucket] = None

    def __call__(self, data: Frame) -> None:
        endpoint = self.endpoint
        bucket = self.bucket
        if bucket is None and endpoint.client_rate is not None:
            bucket = self.bucket = TokenBucket(endpoint.client_rate, endpoint.client_burst)
        with _hook_context(self.app):
            endpoint._client_frame(self.conn, bucket, data)


class UpgradeRoute:
    """WSGI middleware: WebSocket upgrades on one path go to an endpoint, all else to ``app``."""

    def __init__(self, app: Callable[[WSGIEnviron, StartResponse], Any], path: str,
                 endpoint: Callable[[WSGIEnviron, StartResponse], Any]) -> None:
        self.app = app
        self.path = path
        self.endpoint = endpoint

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        if (environ.get("PATH_INFO") == self.path
                and "websocket" in environ.get("HTTP_UPGRADE", "").lower()):
            return self.endpoint(environ, start_response)
        return self.app(environ, start_response)


class WebSocketEndpoint:
    """Serves WebSocket connections whose messages come from a :class:`Hub`.

    A plain WSGI application, or registered on a Flask app with :meth:`init_app`.
    Subclasses decide audiences and health, and override the hooks
    :meth:`on_connect` (may refuse), :meth:`on_open`, :meth:`on_message` and
    :meth:`on_disconnect`, all run on the connection's request thread.

    :param max_queue: frames queued per connection before it is dropped (1013).
    :param max_queue_bytes: bytes of frames queued per connection before it counts as full
        too (one item larger than that still goes to an empty queue).
    :param write_timeout: seconds a write may block before the socket is dropped.
    :param ping_interval: seconds between pings; a missing pong closes the socket (None: no pings).
    :param max_message_size: bytes of an incoming message before a 1009 close.
    :param max_backlog: inbound messages waiting to be handled before a 1008 close.
    :param max_backlog_bytes: bytes of them waiting before a 1008 close (at least
        ``max_message_size``).
    :param client_rate: frames a second a client may send (None: no limit); past it a frame
        is answered ``{"event": "error", "error": "rate limited"}`` and not acted on, and a
        client that keeps exceeding is closed with 1008.
    :param client_burst: frames a client may send at once beyond ``client_rate``.
    :param max_sockets: sockets this worker serves at once, all endpoints together
        (``"auto"``: under the gunicorn hook, all its threads but a tenth and at least 4,
        which stay for plain requests; None: no cap); past it an upgrade gets HTTP 503
        with ``Retry-After``.
    :param max_sockets_per_address: sockets one client address may hold in this worker
        (None: no cap; behind a proxy every client has the proxy's address).
    :param allowed_origins: browser origins allowed besides the page's own (``"*"``: any).
    :param trust_forwarded: take the request's scheme from ``X-Forwarded-Proto`` or
        ``Forwarded: proto=`` for the Origin check; only behind a proxy that sets the header
        and strips what clients send.
    :param compression: accept permessage-deflate when the client offers it.
    :param health_path: path of the health check (None: none).
    :param ready_path: path of the readiness check (None: none).
    :param health_detail: health and readiness answers carry the operator's detail too
        (source states, error texts, socket counts); only where the public cannot reach them.
    :param metrics_path: path of the Prometheus metrics, e.g. ``"/metrics"`` (None: off; needs
        the ``metrics`` extra).
    :param close_timeout: seconds to wait for the client's half of a close handshake.
    :param slow_close_reason: the reason of the 1013 close a client that reads too slowly gets.
    :param check_origin: ``request -> bool`` deciding the Origin check instead of
        ``allowed_origins`` (an exception refuses, and is logged).
    """

    def __init__(
        self,
        *,
        max_queue: int = 1024,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        write_timeout: float = 10.0,
        ping_interval: Optional[float] = 25.0,
        max_message_size: Optional[int] = 1 << 20,
        max_backlog: int = 256,
        max_backlog_bytes: int = 4 << 20,
        client_rate: Optional[float] = 50.0,
        client_burst: int = 100,
        max_sockets: Union[int, str, None] = "auto",
        max_sockets_per_address: Optional[int] = None,
        allowed_origins: Iterable[str] = (),
        trust_forwarded: bool = False,
        compression: bool = False,
        health_path: Optional[str] = "/healthz",
        ready_path: Optional[str] = "/readyz",
        health_detail: bool = False,
        metrics_path: Optional[str] = None,
        close_timeout: float = 2.0,
        slow_close_reason: str = SLOW_CLIENT_REASON,
        check_origin: Optional[Callable[[Request], bool]] = None,
    ) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {max_queue}")
        if client_rate is not None and not (client_rate > 0 and client_burst >= 1):
            raise ConfigError(f"client_rate must be above 0 frames a second (or None) and "
                              f"client_burst at least 1, got {client_rate!r} and {client_burst!r}")
        if not (max_sockets is None or max_sockets == "auto"
                or (isinstance(max_sockets, int) and max_sockets >= 0)):
            raise ConfigError(f"max_sockets must be a number of sockets, 'auto' or None, got "
                              f"{max_sockets!r}")
        if max_queue_bytes < 1:
            raise ConfigError(f"max_queue_bytes must be at least 1, got {max_queue_bytes}")
        if max_backlog < 1:
            raise ConfigError(f"max_backlog must be at least 1, got {max_backlog}")
        if write_timeout <= 0 or close_timeout < 0:
            raise ConfigError("write_timeout must be positive and close_timeout not negative")
        if ping_interval is not None and ping_interval <= 0:
            raise ConfigError("ping_interval must be positive seconds, or None to disable pings")
        if isinstance(allowed_origins, str):
            raise ConfigError("allowed_origins must be a list of origins, not one string")
        if not isinstance(slow_close_reason, str) or len(slow_close_reason.encode("utf-8")) > 123:
            raise ConfigError("slow_close_reason must be text of at most 123 UTF-8 bytes "
                              "(what a close frame carries)")
        if check_origin is not None and not callable(check_origin):
            raise ConfigError("check_origin must be a function of the request, or None")
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.write_timeout = write_timeout
        self.ping_interval = ping_interval
        self.max_message_size = max_message_size
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.client_rate = client_rate
        self.client_burst = client_burst
        self.max_sockets = max_sockets
        self.max_sockets_per_address = max_sockets_per_address
        self.allowed_origins: Tuple[str, ...] = tuple(allowed_origins)
        self.trust_forwarded = trust_forwarded
        self.compression = compression
        self.health_path = health_path
        self.ready_path = ready_path
        self.health_detail = health_detail
        self.close_timeout = close_timeout
        #: What :func:`limit_inbound` is given for each socket (one tuple, shared).
        self._inbound_limit = (max_backlog, max(max_backlog_bytes, max_message_size or 0))
        self.slow_close_reason = slow_close_reason
        self.check_origin = check_origin
        #: The ``endpoint`` label of this endpoint's metrics (its class name).
        self.label = type(self).__name__
        self.hub = Hub(self.label)
        self._health_log = HealthLog(f"{self.label} health")
        self._ready_log = HealthLog(f"{self.label} readiness")
        self.metrics_path = metrics_path
        if metrics_path is not None:
            _metrics.enable()
        self._closing = False
        self._close_lock = threading.Lock()
        self._hurry = threading.Event()
        _live_endpoints.add(self)

    # ------------------------------------------------------ for subclasses

    def connection_audiences(self, request: Request) -> Sequence[str]:
        """The audiences of a new connection (called once, before the upgrade)."""
        return [DEFAULT_AUDIENCE]

    def health(self) -> Health:
        """Whether this endpoint can deliver now: a short fixed reason if not, and the
        operator's detail (JSON-able; error texts go there, never into the reason)."""
        detail: Dict[str, Any] = {"sockets": len(self.hub)}
        if self._closing:
            return Health(False, SHUTTING_DOWN, {**detail, "closing": True})
        return Health(True, None, detail)

    def readiness(self) -> Health:
        """Whether this worker should get traffic now (not while closing), and why not."""
        if self._closing:
            return Health(False, SHUTTING_DOWN, {"closing": True})
        return Health(True, None, {})

    def prepare(self) -> None:
        """Called before each request is handled: start per-process machinery here."""

    def on_connect(self, conn: Connection, request: Request) -> None:
        """A socket is about to be accepted: check it, fill ``conn.metadata``, join keys.

        Raise :class:`~pgws_sync.errors.Refused` to answer with an HTTP error
        instead. ``conn`` is already in the hub under its audiences; frames
        sent to it now go out right after the handshake.
        """

    def on_open(self, conn: Connection) -> None:
        """The handshake is done and the socket is open."""

    def on_message(self, conn: Connection, data: Frame) -> None:
        """An inbound message: ``str`` for a text frame, ``bytes`` for a binary one.

        The default ignores it. Reply with ``conn.send(...)``; an exception is
        logged and the socket stays open.
        """

    def on_disconnect(self, conn: Connection) -> None:
        """The connection is over and out of the hub (called exactly once)."""

    def on_closed(self) -> None:
        """Called once when :meth:`close` has closed every socket."""

    def _forget(self, conn: Connection) -> None:
        """Drop whatever this class keeps about ``conn`` (it is over; before ``on_disconnect``)."""

    # ------------------------------------------------------------- WSGI / Flask

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Any:
        request = Request(environ)
        response = self.service_response(request)
        if response is None:
            admitted = self._checked_admit(request)
            del request  # a socket's life holds no request (nor its headers object)
            if isinstance(admitted, Response):
                return admitted(environ, start_response)
            self._run(admitted, None)
            response = _SocketDone()
        return response(environ, start_response)

    def service_response(self, request: Request) -> Optional[Response]:
        """The answer for the health, readiness or metrics path, or None for any other path."""
        path = request.path
        if self.health_path is not None and path == self.health_path:
            return self.health_response()
        if self.ready_path is not None and path == self.ready_path:
            return self.ready_response()
        if self.metrics_path is not None and path == self.metrics_path:
            return self.metrics_response()
        return None

    def init_app(self, app: Any, path: str = "/ws", client_path: Optional[str] = "/pgws.js", *,
                 flask_request: bool = True, hold_request: bool = False) -> None:
        """Register the WebSocket route at ``path`` on a Flask app, and the shared routes.

        The shared routes, registered once per app: health on ``health_path``
        and the browser client pgws.js on ``client_path`` (``None``: not served).

        The upgrade is a Flask request: ``before_request`` functions run, and
        :meth:`on_connect` sees ``flask.request``, ``g``, the session and
        ``current_user``. Once it has run, Flask ends that request as it ends any
        other (``teardown_request`` and ``teardown_appcontext`` run, so a
        Flask-SQLAlchemy session is removed and its connection goes back to the
        pool): an open socket holds none of the app's resources. Every later hook
        (``on_open``, ``on_message``, ``can_subscribe``, ``on_client_message``,
        ``on_disconnect``...) runs in a fresh application context, torn down after
        the call: ``current_app`` and ``db.session`` work, ``flask.request`` does not
        (keep what a hook needs in ``conn.metadata``).

        ``hold_request=True`` keeps the upgrade's request context for the socket's
        whole life instead (and whatever it holds, such as a database connection).

        ``flask_request=False`` serves the upgrades on ``path`` below Flask
        (:class:`UpgradeRoute` around ``app.wsgi_app``): the hooks get a werkzeug
        ``Request``, and no Flask context exists for the socket (no
        ``before_request``, ``g``, session, ``flask.request`` or ``current_app``). A
        socket then costs less CPU to open and less memory while open.
        """
        import flask

        if not flask_request:
            app.wsgi_app = UpgradeRoute(app.wsgi_app, path, self)

        def upgrade() -> Response:
            request = flask.request._get_current_object()  # type: ignore[attr-defined]
            response = self.handle(request, app=None if hold_request else app)
            if isinstance(response, _ServeAfterRequest):
                request.environ[_ServeAfterRequest.ENVIRON_KEY] = response
            return _app_response(response, app)

        if "pgws_sync" not in app.extensions:
            app.extensions["pgws_sync"] = True
            app.teardown_request(_drop_unanswered)

        name = f"pgws_sync_ws_{id(self):x}"
        app.add_url_rule(path, endpoint=name, view_func=upgrade, websocket=True)
        # Plain HTTP on the same path: say what the URL is for, instead of a bare 400.
        app.add_url_rule(path, endpoint=name + "_http", view_func=upgrade)
        if self.health_path is not None and "pgws_sync_health" not in app.view_functions:
            app.add_url_rule(self.health_path, endpoint="pgws_sync_health",
                             view_func=self.health_response)
        if self.ready_path is not None and "pgws_sync_ready" not in app.view_functions:
            app.add_url_rule(self.ready_path, endpoint="pgws_sync_ready",
                             view_func=self.ready_response)
        if self.metrics_path is not None and "pgws_sync_metrics" not in app.view_functions:
            app.add_url_rule(self.metrics_path, endpoint="pgws_sync_metrics",
                             view_func=self.metrics_response)
        if client_path is not None and "pgws_sync_client_js" not in app.view_functions:
            app.add_url_rule(client_path, endpoint="pgws_sync_client_js",
                             view_func=lambda: client_js_response(flask.request))

    def metrics_response(self) -> Response:
        """The Prometheus exposition of this process (of every worker under the gunicorn hook)."""
        self.prepare()
        depths = [conn.queue_depth for conn in self.hub.connections()]
        _metrics.set_gauge("socket_queue_depth_max", max(depths, default=0), endpoint=self.label)
        self.sample_database()
        body, content_type = _metrics.exposition()
        return Response(body, status=200, content_type=content_type)

    def sample_database(self) -> None:
        """Record database-side figures before a scrape (see :class:`ListeningEndpoint`)."""

    def check_setup(self) -> None:
        """Raise :class:`ConfigError` (or another :class:`PgwsError`) naming the cause and the fix
        when this endpoint's setup cannot work; the gunicorn hooks then refuse to start."""

    def ready_response(self) -> Response:
        """200 ``{"status": "ok"}``, or 503 ``{"status": "unavailable", "reason": ...}``
        (with the detail too under ``health_detail``)."""
        self.prepare()
        answer = self.readiness()
        self._ready_log.note(answer)
        return health_answer(answer, detail=self.health_detail)

    def health_response(self) -> Response:
        """200 ``{"status": "ok"}``, or 503 ``{"status": "unavailable", "reason": ...}``
        (with the detail too under ``health_detail``)."""
        self.prepare()  # a health check alone starts this process's machinery
        answer = self.health()
        self._health_log.note(answer)
        return health_answer(answer, detail=self.health_detail)

    # ---------------------------------------------------------------- serving

    def _check_upgrade(self, request: Request) -> Optional[Response]:
        """The HTTP answer refusing this upgrade request, or None if it may go ahead."""
        environ = request.environ
        if self._closing:
            return _text_response(503, "server shutting down")
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return _text_response(426, "this URL serves WebSocket connections only",
                                  {"Upgrade": "websocket"})
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
            return _text_response(426, "unsupported WebSocket version: this server speaks 13",
                                  {"Sec-WebSocket-Version": "13"})
        if not valid_key(environ.get("HTTP_SEC_WEBSOCKET_KEY")):
            return _text_response(400, "missing or invalid Sec-WebSocket-Key")
        if "upgrade" not in (t.lower() for t in header_tokens(environ.get("HTTP_CONNECTION"))):
            return _text_response(400, "the Connection header must include Upgrade")
        if not self._origin_ok(request):
            logger.info("refused a socket from origin %r: the request came for host %r over "
                        "%s", environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"),
                        request_scheme(environ, trust_forwarded=self.trust_forwarded)
                        or "an unknown scheme")
            return _text_response(403, "origin not allowed")
        return None

    def _origin_ok(self, request: Request) -> bool:
        if self.check_origin is None:
            environ = request.environ
            return origin_allowed(environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"),
                                  self.allowed_origins,
                                  scheme=request_scheme(environ,
                                                        trust_forwarded=self.trust_forwarded))
        try:
            return bool(self.check_origin(request))
        except Exception:  # an application hook: refuse, log
            logger.exception("check_origin failed; refused the socket")
            return False

    def handle(self, request: Request, *, app: Any = None) -> Response:
        """Check, upgrade and serve one WebSocket request.

        Without ``app``: returns when the socket is over. With a Flask ``app`` (the route
        :meth:`init_app` registers): returns once :meth:`on_connect` has run, with a response
        that serves the socket after Flask has ended the request, and each later hook runs in
        a fresh application context of ``app``, torn down after the call.
        """
        admitted = self._checked_admit(request)
        if isinstance(admitted, Response):
            return admitted
        if app is None:
            self._run(admitted, None)
            return _SocketDone()
        # partials, not lambdas: a lambda here would make cells of this frame's variables
        # on every call, below Flask too
        return _ServeAfterRequest(partial(self._run, admitted, app),
                                  partial(self._end, admitted, app))

    def _checked_admit(self, request: Request) -> Union[Response, _Admitted]:
        """Check the upgrade and the worker's socket budget, then :meth:`_admit`: the
        refusing answer, or the socket to serve (counted in the budget)."""
        refusal = self._check_upgrade(request)
        if refusal is not None:
            _metrics.inc("sockets_refused", endpoint=self.label, status=str(refusal.status_code))
            return refusal
        address = str(request.environ.get("REMOTE_ADDR", ""))
        if not _sockets.take(address, self.socket_cap(), self.max_sockets_per_address):
            _metrics.inc("sockets_refused", endpoint=self.label, status="503")
            logger.info("refused a socket: this worker serves %s sockets already", _sockets.open)
            return _text_response(503, "too many sockets in this worker; try again later",
                                  {"Retry-After": "5"})
        try:
            admitted = self._admit(request, address)
        except BaseException:
            _sockets.give_back(address)
            raise
        if isinstance(admitted, Response):
            _sockets.give_back(address)
        return admitted

    def socket_cap(self) -> Optional[int]:
        """The most sockets this worker serves at once for this endpoint (None: no cap)."""
        if self.max_sockets == "auto":
            threads = _sockets.threads
            return None if threads is None else auto_socket_cap(threads)
        return None if self.max_sockets is None else int(self.max_sockets)

    def _admit(self, request: Request, address: str) -> Union[Response, _Admitted]:
        """Run :meth:`on_connect`: the refusing answer, or the socket to serve."""
        environ = request.environ
        key = "werkzeug.socket" if "werkzeug.socket" in environ else "gunicorn.socket"
        raw = environ.get(key)
        if raw is None:
            logger.error("the WSGI server does not expose its socket; run under gunicorn "
                         "(gthread worker) or the Werkzeug development server")
            return _text_response(500, "this server cannot serve WebSockets")
        self.prepare()
        conn = Connection(self.connection_audiences(request), max_queue=self.max_queue,
                          max_queue_bytes=self.max_queue_bytes)
        conn.slow_reason = self.slow_close_reason
        conn.label = self.label
        if SUBPROTOCOL_V2 in header_tokens(request.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL")):
            conn.subprotocol = SUBPROTOCOL_V2  # on_connect may answer with another one
        # Registered before the handshake answer goes out: whatever is committed
        # after the client sees its socket open reaches it (queued until served).
        self.hub.add(conn)
        try:
            self.on_connect(conn, request)
        except Refused as exc:
            self.hub.remove(conn)
            self._forget(conn)
            logger.info("refused a socket: %s", exc)
            _metrics.inc("sockets_refused", endpoint=self.label, status=str(exc.status))
            # The body exactly as given: clients may compare it (postgres-websockets' answers).
            return Response(exc.body, status=exc.status, mimetype="text/plain",
                            headers=exc.headers)
        except BaseException:
            self.hub.remove(conn)
            self._forget(conn)
            raise
        conn.envelope = conn.subprotocol == SUBPROTOCOL_V2
        logger.debug("socket %s open (%d in this worker)", conn.id, len(self.hub))
        _metrics.inc("sockets_opened", endpoint=self.label)
        _metrics.add_gauge("sockets_open", 1, endpoint=self.label)
        return _Admitted(conn, environ, key, raw, address)

    def _run(self, admitted: _Admitted, app: Any) -> None:
        """Serve an admitted socket until it is over, then end it."""
        try:
            self._serve(admitted.conn, admitted.environ, admitted.key, admitted.raw, app)
        finally:
            self._end(admitted, app)

    def _end(self, admitted: _Admitted, app: Any) -> None:
        """The socket is over (or was never served): count it, forget it, ``on_disconnect``."""
        conn = admitted.conn
        try:
            logger.debug("socket %s closed", conn.id)
            _metrics.add_gauge("sockets_open", -1, endpoint=self.label)
            code = conn.close_code
            _metrics.inc("sockets_closed", endpoint=self.label,
                         code="client" if code is None else str(code))
            self.hub.remove(conn)
            self._forget(conn)
            try:
                with _hook_context(app):
                    self.on_disconnect(conn)
            except Exception:  # an application hook: log it
                logger.exception("on_disconnect failed for connection %s", conn.id)
        finally:
            _sockets.give_back(admitted.address)

    def _client_frame(self, conn: Connection, bucket: Optional[TokenBucket], data: Frame) -> None:
        """One client frame: a ping is answered here, the rest goes to :meth:`on_message`,
        unless the client is over its rate."""
        if bucket is None or bucket.take():
            ping = parse_ping(data) if isinstance(data, str) else None
            if ping is not None:
                conn.send(pong_frame(ping))
                _metrics.inc("control_frames", endpoint=self.label, event="pong")
                return
            self.on_message(conn, data)
            return
        _metrics.inc("frames_rate_limited", endpoint=self.label)
        if bucket.exhausted:
            if conn.close_code is None:
                _metrics.inc("sockets_rate_limited", endpoint=self.label)
            conn.request_close(CloseCode.POLICY_VIOLATION, "rate limited")
            return
        conn.send(error_frame("rate limited"))

    def _serve(self, conn: Connection, environ: WSGIEnviron, key: str, raw: Any,
               app: Any) -> None:
        wake = conn.wake  # one bound method for the socket guard and the event
        guarded = GuardedSocket(raw, self.write_timeout, wake, conn.hand_over)
        deflate = self.compression and "permessage-deflate" in environ.get(
            "HTTP_SEC_WEBSOCKET_EXTENSIONS", "").lower()
        try:
            if deflate:
                # simple-websocket's own handshake reads only the socket and the HTTP_ headers
                ws_environ: WSGIEnviron = {k: v for k, v in environ.items()
                                           if k.startswith("HTTP_")}
                ws_environ[key] = guarded
                ws = accept(ws_environ, deflate=True, ping_interval=self.ping_interval,
                            max_message_size=self.max_message_size,
                            subprotocols=[conn.subprotocol] if conn.subprotocol else None,
                            event_class=partial(WakingEvent, wake),
                            thread_class=reading_thread)
            else:  # the 101 from what the web server parsed and _check_upgrade checked
                ws = accept_plain(
                    guarded, environ["HTTP_SEC_WEBSOCKET_KEY"],
                    chosen_subprotocol(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL"),
                                       conn.subprotocol),
                    ping_interval=self.ping_interval, max_message_size=self.max_message_size,
                    event=WakingEvent(wake), thread_class=reading_thread)
        except (HandshakeFailed, ConnectionClosed, OSError) as exc:
            logger.info("WebSocket handshake failed: %s", exc)
            guarded.abort()
            return
        limit_inbound(ws, self._inbound_limit)
        conn.attach(ws, guarded, compression=deflate)
        try:
            if self._closing:
                conn.request_close(CloseCode.GOING_AWAY, "server shutdown")
            else:
                with _hook_context(app):
                    self.on_open(conn)
            conn.serve(close_timeout=self.close_timeout,
                       on_message=_FrameHandler(self, conn, app),
                       max_backlog=self.max_backlog)
        finally:
            self.hub.remove(conn)
            guarded.abort()
            ws.thread.join(self.close_timeout + 1.0)

    # --------------------------------------------------------------- shutdown

    def _drain(self, conns: List[Connection], window: float) -> None:
        # The closes are spread over the window; each client comes back a second or two
        # after its own close (pgws.js adds up to as much again), so the returns are spread
        # the same way.
        """Close ``conns`` in about ten batches a second over ``window`` seconds."""
        random.shuffle(conns)
        batches = max(1, min(len(conns), int(window * 10)))
        started = time.monotonic()
        logger.info("draining %d sockets over %.1fs", len(conns), window)
        for i in range(batches):
            wait = started + window * i / batches - time.monotonic()
            if wait > 0 and not self._hurry.is_set():
                self._hurry.wait(wait)  # set by hurry(): the rest go at once
            for conn in conns[i::batches]:
                conn.request_close(CloseCode.SERVICE_RESTART, RESTART_REASON)

    def hurry(self) -> None:
        """Close what a drain has not closed yet at once (a second signal, say)."""
        self._hurry.set()

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, timeout: float = 5.0, *, drain: float = 0.0) -> None:
        """Refuse new sockets (503, and ``/readyz`` says so), then close every socket.

        With ``drain`` 0: at once, with 1001 ``server shutdown``. With ``drain``
        seconds: in batches spread over that window, in random order, with 1012
        and the reason ``restart: reconnect after 1.0s`` (pgws.js then waits 1 to
        2 s), so clients come back spread over the window instead of all at once. Waits
        up to ``timeout`` seconds more for the close frames, then drops what is left.
        """
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        conns = self.hub.connections()
        if drain > 0:
            self._drain(conns, drain)
        else:
            for conn in conns:
                conn.request_close(CloseCode.GOING_AWAY, "server shutdown")
        deadline = time.monotonic() + timeout
        late: List[Connection] = []
        for conn in conns:
            if not conn.closed.wait(max(0.0, deadline - time.monotonic())):
                late.append(conn)
        for conn in late:
            conn.abort()
        if late:
            logger.warning("dropped %d sockets that did not close within %.1fs", len(late), timeout)
        logger.info("endpoint closed %d sockets", len(conns))
        self.on_closed()


def live_endpoints() -> List[WebSocketEndpoint]:
    """Every endpoint created in this process that still exists."""
    return list(_live_endpoints)
