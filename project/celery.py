"""The Celery application: `celery -A project ...` finds `app` here.

Configuration lives in Django settings under the CELERY_ namespace.
"""

import logging
import os
from fnmatch import fnmatch

from celery import Celery
from celery.contrib.django.task import DjangoTask
from celery.signals import task_postrun, task_prerun
from django.db import InterfaceError as DatabaseInterfaceError
from django.db import OperationalError as DatabaseOperationalError
from django.db import close_old_connections
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
    # retried with exponential backoff (capped at 60 s, reached by the 7th retry) and jitter.
    # Tasks with their own policy use retry_policy() below.
    autoretry_for = (DatabaseOperationalError, DatabaseInterfaceError)
    max_retries = 8
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True

    # Bounds the requeue of a task whose pool process dies (TASK_MAX_WORKER_LOST). Celery makes
    # that decision in Request.on_failure, where no signal fires, and its documented hook there
    # is the task's Request class. Loaded by name when a worker starts.
    Request = "ops.worker:WorkerLostBoundRequest"

    def apply_async(self, args=None, kwargs=None, **options):
        # Celery stamps the publisher's time limits into the message, and a worker obeys the
        # message over its own settings. Sending none makes the consuming worker's limits
        # (TASK_TIME_LIMITS, QueueTimeLimits) decide, whatever the web process was started with.
        options.setdefault("time_limit", None)
        options.setdefault("soft_time_limit", None)
        return super().apply_async(args, kwargs, **options)


def retry_policy(*, retries: int, backoff_max: int, errors: tuple = TRANSIENT_ERRORS) -> dict:
    """Autoretry of `errors` only, `retries` times, backoff 1, 2, 4 ... s capped at `backoff_max`, full jitter.

    The README's retry table is computed from these options (tests/test_retry_budgets.py).
    """
    return {
        "autoretry_for": errors,
        "max_retries": retries,
        "retry_backoff": True,
        "retry_backoff_max": backoff_max,
        "retry_jitter": True,
    }


class QueueTimeLimits:
    """A task annotation: every task runs under its queue's time limits (TASK_TIME_LIMITS) unless it sets its own.

    https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-annotations
    """

    def annotate(self, task) -> dict | None:
        if task.soft_time_limit is not None or task.time_limit is not None:
            return None
        from django.conf import settings

        queue = next(
            (route["queue"] for pattern, route in settings.CELERY_TASK_ROUTES.items() if fnmatch(task.name, pattern)),
            settings.CELERY_TASK_DEFAULT_QUEUE,
        )
        soft, hard = settings.TASK_TIME_LIMITS[queue]
        return {"soft_time_limit": soft, "time_limit": hard}

    def annotate_any(self) -> None:
        return None


app = Celery("project", task_cls=BaseTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_annotations = (QueueTimeLimits(),)
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
