"""The Celery application: `celery -A config ...` finds `app` here.

Configuration lives in Django settings under the CELERY_ namespace; the task class, the retry
policy and the time limits every task shares are in core/task_base.py.
"""

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections
from kombu.transport import TRANSPORT_ALIASES

from core.task_base import BaseTask, QueueTimeLimits

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

# redis:// URLs get kombu's Redis transport with one fix (core/broker.py). Registered under
# the alias rather than through broker_transport, so URLs keep their redis:// scheme (Flower reads it).
TRANSPORT_ALIASES["redis"] = "core.broker:RedisTransport"
# filesystem:// (`make run` without REDIS_URL) gets one that writes each message file whole.
TRANSPORT_ALIASES["filesystem"] = "core.broker:FilesystemTransport"

logger = logging.getLogger(__name__)


app = Celery("shop", task_cls=BaseTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_annotations = (QueueTimeLimits(),)
app.autodiscover_tasks()
# On RabbitMQ, every worker also drains the dead-letter queue into the ops dead letters (a no-op elsewhere).
app.steps["consumer"].add("ops.rabbitmq:DeadLetterQueue")


@task_prerun.connect(dispatch_uid="config.celery.close_old_connections_before_task")
@task_postrun.connect(dispatch_uid="config.celery.close_old_connections_after_task")
def close_old_database_connections(task: Task[Any, Any] | None = None, **kwargs: Any) -> None:
    """Around each task, what Django does around each request: drop a connection past CONN_MAX_AGE or broken.

    The connection is otherwise kept from task to task (CELERY_DB_REUSE_MAX in settings), and the
    next query health-checks it first (CONN_HEALTH_CHECKS), so a database restart costs one check.
    """
    if task is not None and getattr(task.request, "is_eager", False):
        return  # run inside the caller's transaction (eager tests): its connection is not ours to close
    close_old_connections()
