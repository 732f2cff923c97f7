"""What every task shares: the base class with the one retry policy, the transient errors, and queue time limits.

At the bottom of the import graph (core imports no app): every app's tasks build on it, and the
Celery application (config/celery.py) installs it as the task class.
"""

from fnmatch import fnmatch
from typing import Any

from celery import Task
from celery.contrib.django.task import DjangoTask
from celery.result import AsyncResult
from django.db import InterfaceError as DatabaseInterfaceError
from django.db import OperationalError as DatabaseOperationalError

from .errors import ApplicationError

# Transient for every task: the broker or the database restarting, a peer timing out.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, DatabaseOperationalError, DatabaseInterfaceError)


class BaseTask(DjangoTask):
    """Base class of every task in the project."""

    # A task that declares no retry policy of its own still survives a database restart:
    # retried with exponential backoff (capped at 60 s, reached by the 7th retry) and jitter.
    # Tasks with their own policy use retry_policy() below.
    autoretry_for = (DatabaseOperationalError, DatabaseInterfaceError)
    # A rule of the domain said no (core.errors.ApplicationError): the same call can only say no again.
    dont_autoretry_for = (ApplicationError,)
    max_retries = 8
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True

    # Bounds the requeue of a task whose pool process dies (TASK_MAX_WORKER_LOST). Celery makes
    # that decision in Request.on_failure, where no signal fires, and its documented hook there
    # is the task's Request class. Loaded by name when a worker starts (the worker's plumbing,
    # ops/worker.py, is named here rather than imported: core imports no app).
    Request = "ops.worker:WorkerLostBoundRequest"

    # celery-types: Celery's own signature names every option; these pass through **options unchanged.
    def apply_async(  # type: ignore[override]
        self, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        # Celery stamps the publisher's time limits into the message, and a worker obeys the
        # message over its own settings. Sending none makes the consuming worker's limits
        # (TASK_TIME_LIMITS, QueueTimeLimits) decide, whatever the web process was started with.
        options.setdefault("time_limit", None)
        options.setdefault("soft_time_limit", None)
        return super().apply_async(args, kwargs, **options)


def retry_policy(
    *, retries: int, backoff_max: int, errors: tuple[type[BaseException], ...] = TRANSIENT_ERRORS
) -> dict[str, Any]:
    """Autoretry of `errors` only, `retries` times, backoff 1, 2, 4 ... s capped at `backoff_max`, full jitter.

    An ApplicationError is never retried, whatever `errors` holds. The README's retry table is
    computed from these options (tests/test_retry_budgets.py).
    """
    return {
        "autoretry_for": errors,
        "dont_autoretry_for": (ApplicationError,),
        "max_retries": retries,
        "retry_backoff": True,
        "retry_backoff_max": backoff_max,
        "retry_jitter": True,
    }


class QueueTimeLimits:
    """A task annotation: every task runs under its queue's time limits (TASK_TIME_LIMITS) unless it sets its own.

    https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-annotations
    """

    def annotate(self, task: Task[Any, Any]) -> dict[str, Any] | None:
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
