"""gunicorn settings for the end-to-end tests: the library's hook, no control socket."""

from pgws_sync.gunicorn import post_worker_init  # noqa: F401  (gunicorn reads it from here)

worker_class = "gthread"
graceful_timeout = 30
control_socket_disable = True
