"""Process tuning for a worker that holds many sockets: malloc arenas, the GC, pool threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: Seconds :func:`prestart_threads` waits for the threads it asked for.
PRESTART_TIMEOUT = 30.0

#: glibc malloc arenas per worker (its default is 8 per core): hundreds of threads each
#: touching a fresh arena cost memory per socket, and the GIL serialises them anyway.
#: The MALLOC_ARENA_MAX environment variable, when set, wins.
MALLOC_ARENA_MAX = 2


def freeze_startup_objects() -> int:
    """Collect once, then put every object alive now out of the garbage collector's walks.

    The app, its modules and the worker's pool threads live as long as the
    worker, yet every full collection would walk them again. Returns how many
    objects were frozen; ``gc.unfreeze()`` in a later hook undoes it.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads created from now on; False where not possible.

    Call it before the worker's threads start (``post_worker_init`` does).
    Does nothing if ``MALLOC_ARENA_MAX`` is set in the environment, or
    without glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(arenas)))


def prestart_threads(worker: Any, count: Optional[int] = None,
                     timeout: float = PRESTART_TIMEOUT) -> int:
    """Start ``count`` of the worker's pool threads now (None: all of ``threads``); returns how many run.

    Every open socket holds a gunicorn pool thread for its whole life, and
    gunicorn otherwise starts one only when a connection finds none idle.
    Call it before the worker accepts (:func:`post_worker_init` does); works
    with the ``gthread`` worker, does nothing (returns 0) with any other.
    """
    pool = getattr(worker, "tpool", None)
    threads = getattr(getattr(worker, "cfg", None), "threads", 0)
    if not isinstance(pool, ThreadPoolExecutor) or not threads:
        return 0
    wanted = threads if count is None else min(count, threads)
    if wanted <= 0:
        return 0
    begun = time.monotonic()
    started = threading.Semaphore(0)
    release = threading.Event()

    def hold() -> None:  # keeps its thread busy, so the pool starts another for the next
        started.release()
        release.wait()

    submitted = 0
    try:
        for _ in range(wanted):
            pool.submit(hold)
            submitted += 1
    except RuntimeError as exc:  # "can't start new thread": a process or memory limit
        logger.warning("could start only %d of %d pool threads: %s", submitted, wanted, exc)
    running = 0
    deadline = begun + timeout
    while running < submitted and started.acquire(timeout=max(0.0, deadline - time.monotonic())):
        running += 1
    release.set()  # the threads go idle in the pool, ready for sockets
    logger.info("worker %s started %d pool threads in %.0f ms", worker.pid, running,
                (time.monotonic() - begun) * 1000)
    return running
