"""Gunicorn configuration for the web process (`gunicorn config.wsgi -c config/gunicorn.conf.py`)."""

import os
import shutil
from pathlib import Path

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


# Metrics: each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR and /metrics
# sums them (ops/metrics.py). prometheus_client must not be imported in this file before
# the directory is set: it picks multiprocess mode when first imported.
def on_starting(server):
    """Give the web workers their own empty directory, <PROMETHEUS_MULTIPROC_DIR>/web, before any starts."""
    var_dir = Path(os.environ.get("VAR_DIR") or Path(__file__).resolve().parent.parent / "var")
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or var_dir / "metrics") / "web"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)


def child_exit(server, worker):
    """Drop a finished worker's live gauges; its counters and histograms stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
