"""The Celery application: `celery -A project ...` finds `app` here.

Configuration lives in Django settings under the CELERY_ namespace.
"""

import functools
import os

from celery import Celery
from celery.contrib.django.task import DjangoTask
from django.db import transaction

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings.base")


class BaseTask(DjangoTask):
    """Base class of every task in the project."""

    def delay_on_commit(self, *args, **kwargs) -> None:
        """Publish after the current transaction commits.

        A publish that fails after commit (broker down) is logged, not raised: the
        row is already committed and the periodic sweep re-dispatches it, so the
        request still answers.
        """
        transaction.on_commit(functools.partial(self.delay, *args, **kwargs), robust=True)


app = Celery("project", task_cls=BaseTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
