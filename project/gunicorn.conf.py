"""Gunicorn configuration for the web process (`gunicorn project.wsgi -c project/gunicorn.conf.py`)."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "2"))
# Requests are short; a hung one is killed rather than holding a worker forever.
timeout = 30
graceful_timeout = 20
# Recycle workers now and then so a slow leak cannot grow without bound.
max_requests = 2000
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
# Gunicorn 27 opens a control socket at one per-user path by default; several
# gunicorns on one host (web, the sandbox, tests) would fight over it.
control_socket_disable = True
