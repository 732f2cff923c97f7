"""Queue adapter for report generation (routed to the bulk queue), under the worker's time limits.

The soft limit raises SoftTimeLimitExceeded inside the task: the service marks the
report failed with reason "timeout". A task that ignores it is killed at the hard
limit; its pool process is gone, so the worker's main process calls on_failure with
TimeLimitExceeded (celery.worker.request.Request.on_timeout) and the report is
recorded failed there.
"""

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import shared_task
from celery.exceptions import TimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from core.task_base import BaseTask

from . import services

logger = logging.getLogger(__name__)


class ReportTask(BaseTask):
    """Time limits from the worker's own settings; every way generation fails is recorded on the report row."""

    def on_failure(
        self, exc: Exception, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], einfo: ExceptionInfo
    ) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)
        report_id = kwargs.get("report_id", args[0] if args else None)
        if report_id is None:
            return
        in_main_process = isinstance(exc, TimeLimitExceeded)
        if in_main_process:
            # Called in the worker's main process, which holds no connection of its own:
            # start from a live one and leave none open behind.
            close_old_connections()
        try:
            services.record_generation_failure(report_id=report_id, exc=exc)
        except DatabaseError:
            # Raising here would break the worker's time-limit handling for every later task.
            logger.exception("could not record the failure of report %s (%r)", report_id, exc)
        finally:
            if in_main_process:
                connection.close()


@shared_task(
    base=ReportTask,
    soft_time_limit=settings.REPORT_SOFT_TIME_LIMIT,
    time_limit=settings.REPORT_TIME_LIMIT,
)
def generate_report(report_id: int) -> str | None:
    report = services.generate_report(report_id=report_id)
    return report.status if report else None
