"""The Celery application: `celery -A project ...` finds `app` here.

Configuration lives in Django settings under the CELERY_ namespace.
"""

import functools
import logging
import os

from celery import Celery
from celery.contrib.django.task import DjangoTask
from celery.signals import task_postrun, task_prerun
from django.db import InterfaceError as DatabaseInterfaceError
from django.db import OperationalError as DatabaseOperationalError
from django.db import close_old_connections, transaction
from kombu.exceptions import OperationalError
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings.base")

# redis:// URLs get kombu's Redis transport with one fix (project/broker.py). Registered under
# the alias rather than through broker_transport, so URLs keep their redis:// scheme (Flower reads it).
TRANSPORT_ALIASES["redis"] = "project.broker:RedisTransport"

logger = logging.getLogger(__name__)


# Transient for every task: the broker or the database restarting, a peer timing out.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, DatabaseOperationalError, DatabaseInterfaceError)


class BaseTask(DjangoTask):
    """Base class of every task in the project."""

    # A task that declares no retry policy of its own still survives a database restart:
    # retried with exponential backoff and jitter. Tasks with their own policy use TRANSIENT_ERRORS.
    autoretry_for = (DatabaseOperationalError, DatabaseInterfaceError)
    max_retries = 5
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True

    # Bounds the requeue of a task whose pool process dies (TASK_MAX_WORKER_LOST). Celery makes
    # that decision in Request.on_failure, where no signal fires, and its documented hook there
    # is the task's Request class. Loaded by name when a worker starts.
    Request = "ops.worker:WorkerLostBoundRequest"

    def delay_on_commit(self, *args, **kwargs) -> None:
        """Publish with `delay` after the current transaction commits.

        A publish that fails after commit because the broker is unreachable is
        logged, not raised: the row is already committed and a periodic sweep
        re-dispatches it (for orders, redispatch_stale_orders), so the request still
        answers. Any other error (a bug, or an eager task failing in tests) is raised.
        """
        # Not on_commit(robust=True): it would swallow bugs too, and Django's own error
        # logging fails on a functools.partial (no __qualname__), turning a broker
        # outage into a 500 after commit.
        transaction.on_commit(functools.partial(self._publish_after_commit, "delay", args, kwargs))

    def apply_async_on_commit(self, *args, **kwargs) -> None:
        """Publish with `apply_async` after the current transaction commits; errors as in delay_on_commit."""
        transaction.on_commit(functools.partial(self._publish_after_commit, "apply_async", args, kwargs))

    def _publish_after_commit(self, method: str, args: tuple, kwargs: dict) -> None:
        try:
            getattr(self, method)(*args, **kwargs)
        except OperationalError:
            logger.exception("broker unreachable: %s%r not published after commit", self.name, args)


app = Celery("project", task_cls=BaseTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect(dispatch_uid="project.celery.close_old_connections_before_task")
@task_postrun.connect(dispatch_uid="project.celery.close_old_connections_after_task")
def close_old_database_connections(task=None, **kwargs) -> None:
    """Around each task, what Django does around each request: drop a connection past CONN_MAX_AGE or broken.

    The connection is otherwise kept from task to task (CELERY_DB_REUSE_MAX in settings), and the
    next query health-checks it first (CONN_HEALTH_CHECKS), so a database restart costs one check.
    """
    if task is not None and getattr(task.request, "is_eager", False):
        return  # run inside the caller's transaction (eager tests): its connection is not ours to close
    close_old_connections()
