"""Log records that say which task and which order they belong to.

TaskContextFilter puts `task_id`, `task_name` and `order_id` on every record ("-"
when there is none), so each line a task writes can be traced to its message and
its order. `LOG_FORMAT=json` switches the console to JSON lines (python-json-logger).
"""

import inspect
import logging
from functools import cache
from typing import Any

from celery import Task, current_app
from celery._state import get_current_task

NONE = "-"


@cache
def _order_id_position(task_name: str) -> int | None:
    """Where the `order_id` argument sits in a task's signature, if it has one."""
    task = current_app.tasks.get(task_name)
    if task is None:
        return None
    parameters = [p for p in inspect.signature(task.run).parameters if p != "self"]
    return parameters.index("order_id") if "order_id" in parameters else None


def _order_id_of(task: Task[Any, Any]) -> str:
    request = task.request
    kwargs = request.kwargs or {}
    if "order_id" in kwargs:
        return str(kwargs["order_id"])
    position = _order_id_position(task.name)
    args = request.args or ()
    if position is not None and position < len(args):
        return str(args[position])
    return NONE


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        task = get_current_task()
        if task is not None and task.request.id:
            record.task_id = task.request.id
            record.task_name = task.name
            record.order_id = _order_id_of(task)
        else:
            # Celery's own lines ("Task x[id] received/succeeded") name the task in their args.
            args = record.args if isinstance(record.args, dict) else {}
            record.task_id = str(args.get("id", NONE))
            record.task_name = str(args.get("name", NONE))
            record.order_id = NONE
        return True
