"""gunicorn hooks (``-c python:pgws_sync.gunicorn``): sources per worker, a drain on SIGTERM."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, List, Optional

from ._core.wire import warm_up
from ._tuning import MALLOC_ARENA_MAX as MALLOC_ARENA_MAX
from ._tuning import freeze_startup_objects as freeze_startup_objects
from ._tuning import limit_malloc_arenas as limit_malloc_arenas
from ._tuning import prestart_threads as prestart_threads
from ._core.endpoint import auto_socket_cap, live_endpoints, set_worker_threads
from .errors import ConfigError, PgwsError
from .runtime import hurry, live_sources, prepare_endpoints, shutdown, start_sources
from .sources.canary import check_listening

logger = logging.getLogger(__name__)

#: Settings this module gives gunicorn when used as its config file.
worker_class = "gthread"
threads = 100
graceful_timeout = 10
#: Each worker listens on its own socket (SO_REUSEPORT) and the kernel spreads connections
#: over them; on one shared socket the first worker to wake takes nearly every socket.
reuse_port = True

#: The directory prometheus_client's multiprocess mode shares between workers.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_made_dirs: List[str] = []

#: Seconds over which SIGTERM spreads the closing of sockets (1012 "reconnect after N s"),
#: so the clients of a deploy come back spread out. ``PGWS_DRAIN_SECONDS`` overrides it
#: (0: every socket closed at once with 1001).
DRAIN_SECONDS = 3.0
DRAIN_ENV = "PGWS_DRAIN_SECONDS"

#: Seconds the SIGTERM handler waits for sockets to take their close frame.
SHUTDOWN_TIMEOUT = 5.0
#: The same for SIGINT and SIGQUIT (Ctrl-C, immediate shutdown): a short wait, then exit.
QUICK_SHUTDOWN_TIMEOUT = 1.0

#: The environment variable that says how many pool threads each worker starts before
#: it accepts: a whole number, or ``all`` (the default: gunicorn's ``threads``).
PRESTART_ENV = "PGWS_PRESTART_THREADS"



def on_starting(server: Any) -> None:
    """gunicorn hook (master): give the workers one directory for their metrics, so a scrape
    of any worker sums them all (``PROMETHEUS_MULTIPROC_DIR``, unless it is set already)."""
    if not os.environ.get(METRICS_DIR_ENV):
        os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="pgws-metrics-")
        _made_dirs.append(os.environ[METRICS_DIR_ENV])


def when_ready(server: Any) -> None:
    """gunicorn hook (master): say where the server listens. With ``reuse_port`` each worker
    binds the address itself, so gunicorn's own line ("Listening at:") names none."""
    addresses = []
    for address in server.cfg.address:
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            host = f"[{host}]" if ":" in str(host) else host
            addresses.append(f"http://{host}:{port}")
        else:
            addresses.append(f"unix:{address}")
    server.log.info("serving on %s%s", ", ".join(addresses),
                    " (each worker binds it: reuse_port)" if server.cfg.reuse_port else "")


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master): a worker that ended no longer counts in live gauges."""
    if os.environ.get(METRICS_DIR_ENV):
        try:
            from prometheus_client import multiprocess
        except ImportError:
            return
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """gunicorn hook (master): remove the metrics directory :func:`on_starting` made."""
    for path in _made_dirs:
        shutil.rmtree(path, ignore_errors=True)


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: start this worker's listeners (and Redis sources), chain shutdown signals.

    It also starts the pool's threads (:func:`prestart_threads`) and takes the
    objects made so far out of the garbage collector's walks
    (:func:`freeze_startup_objects`), both before the worker accepts.

    SIGTERM (graceful stop): the sockets are drained on a separate thread (1012,
    spread over ``PGWS_DRAIN_SECONDS``; 0: 1001 at once) while gunicorn's own
    handler stops the worker, which then exits as soon as the sockets are gone
    instead of after the whole graceful timeout.
    SIGINT and SIGQUIT (Ctrl-C, immediate stop): the close frames are sent,
    waiting at most QUICK_SHUTDOWN_TIMEOUT seconds, before gunicorn exits.
    """
    use_gunicorn_logging(worker)
    threads = int(getattr(worker.cfg, "threads", 1) or 1)
    set_worker_threads(threads)  # max_sockets="auto" keeps some for plain requests
    if auto_socket_cap(threads) < 16:
        logger.warning("with --threads %d a worker serves at most %d sockets (max_sockets="
                       "'auto' keeps a tenth of the threads, and at least 4, for plain "
                       "requests): raise --threads above the sockets you expect", threads,
                       auto_socket_cap(threads))
    limit_malloc_arenas(MALLOC_ARENA_MAX)
    warm_up()
    prestart_threads(worker, prestart_setting())
    refuse_setups_that_cannot_work(worker)
    for source in start_sources():
        logger.error("could not start %r in worker %s: it was stopped", source, worker.pid)
    prepare_endpoints()
    drain = drain_setting()
    _chain(signal.SIGTERM, lambda: threading.Thread(
        target=shutdown, args=(SHUTDOWN_TIMEOUT,), kwargs={"drain": drain},
        name="pgws-shutdown", daemon=True).start())
    for signum in (signal.SIGINT, signal.SIGQUIT):
        _chain(signum, _quick_shutdown)
    freeze_startup_objects()


def refuse_setups_that_cannot_work(worker: Any) -> None:
    """Stop the worker from booting (exit 3, gunicorn then stops) when a listener's database
    cannot deliver notifications (a hot standby, or a pooler in transaction mode), or a
    durable endpoint's log is missing or this role lacks rights on it.

    One ERROR line names the cause and the fix. A database that cannot be reached is not
    refused: the listener keeps trying. Only the workers gunicorn starts with refuse: a
    worker that joins a running instance (one that replaces a worker, or a TTIN) starts
    anyway, its ``/readyz`` 503 until the fault is fixed, since gunicorn answers exit 3 by
    stopping every worker, those that serve included.
    """
    try:
        for source in live_sources():
            dsn = getattr(source, "dsn", None)
            if isinstance(dsn, str):
                check_listening(dsn)
        for endpoint in live_endpoints():
            endpoint.check_setup()
    except PgwsError as exc:
        if joins_a_running_instance(worker):
            logger.error("pgws_sync: %s (this worker replaces one of a running instance: it "
                         "starts anyway, and its /readyz answers 503 until that is fixed)", exc)
            return
        logger.error("pgws_sync refuses to start: %s", exc)
        raise SystemExit(3) from None


def joins_a_running_instance(worker: Any) -> bool:
    """Whether gunicorn started ``worker`` after the instance's first workers: it numbers
    the workers it starts (``age``) from 1, and the first ``workers`` of them are the boot."""
    age, first = getattr(worker, "age", None), getattr(worker.cfg, "workers", None)
    return isinstance(age, int) and isinstance(first, int) and age > first


def use_gunicorn_logging(worker: Any) -> bool:
    """Send the library's log records through gunicorn's error log, at its level and format.

    Does nothing (returns False) when logging was configured already: the
    ``pgws_sync`` logger or the root logger has a handler.
    """
    error_log = getattr(getattr(worker, "log", None), "error_log", None)
    library = logging.getLogger("pgws_sync")
    if error_log is None or library.handlers or logging.getLogger().handlers:
        return False
    for handler in error_log.handlers:
        library.addHandler(handler)
    library.setLevel(error_log.level)
    library.propagate = False
    return True


def _quick_shutdown() -> None:
    """SIGINT and SIGQUIT: a drain under way ends at once, then every socket gets its close."""
    hurry()
    shutdown(QUICK_SHUTDOWN_TIMEOUT)


def drain_setting(environ: Optional[Any] = None) -> float:
    """The drain window ``PGWS_DRAIN_SECONDS`` asks for (default :data:`DRAIN_SECONDS`).

    Raises :class:`~pgws_sync.errors.ConfigError` for anything but a number from 0 to
    :data:`graceful_timeout` minus :data:`SHUTDOWN_TIMEOUT` (the drain must end in time).
    """
    text = (os.environ if environ is None else environ).get(DRAIN_ENV, "").strip()
    if not text:
        return DRAIN_SECONDS
    most = graceful_timeout - SHUTDOWN_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:
        raise ConfigError(f"{DRAIN_ENV} must be seconds from 0 to {most:g} (the drain must end "
                          f"within gunicorn's graceful_timeout), not {text!r}")
    return value


def prestart_setting(environ: Optional[Any] = None) -> Optional[int]:
    """The number of threads ``PGWS_PRESTART_THREADS`` asks for; None means all of them.

    Raises :class:`~pgws_sync.errors.ConfigError` for anything but a whole
    number or ``all``.
    """
    value = (os.environ if environ is None else environ).get(PRESTART_ENV, "all").strip()
    if value.lower() == "all":
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    raise ConfigError(f"{PRESTART_ENV} must be a whole number of threads or 'all', not {value!r}")


def _chain(signum: int, before: Callable[[], None]) -> None:
    """Run ``before``, then the handler gunicorn installed for ``signum``.

    A signal arriving while ``before`` still runs (gunicorn's master repeats
    the one a terminal sent) is ignored: the first call chains when done.
    """
    gunicorn_handler = signal.getsignal(signum)
    running = threading.Event()

    def handler(received: int, frame: Any) -> None:
        if running.is_set():
            return
        running.set()
        try:
            before()
        finally:
            running.clear()
        if callable(gunicorn_handler):
            gunicorn_handler(received, frame)

    signal.signal(signum, handler)
