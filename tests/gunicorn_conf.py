"""gunicorn settings for the end-to-end tests: the library's hook and its reuse_port, no control socket."""

from pgws_sync.gunicorn import (  # noqa: F401  (gunicorn reads them)
    child_exit,
    on_exit,
    on_starting,
    post_worker_init,
    reuse_port,
    when_ready,
)

worker_class = "gthread"
graceful_timeout = 30
control_socket_disable = True
