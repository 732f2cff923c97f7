"""Dead letters: recording final task failures and refused messages, replaying and resolving them."""

import json
import logging
import math
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from celery import current_app as app
from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from core import outbox

from .models import FailedTask

logger = logging.getLogger(__name__)

RECORD_TIMEOUT_SECONDS = 10


class NotRequeueable(Exception):
    def __init__(self, failed: FailedTask, reason: str):
        self.failed = failed
        super().__init__(f"{failed} cannot be requeued: {reason}")


def _scrub(value: Any) -> Any:
    """A JSON-safe copy without NUL characters, which PostgreSQL refuses in text and jsonb."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_scrub(str(key)): _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # NaN and infinities: JSON's parsers take them, PostgreSQL's jsonb does not
    if value is None or isinstance(value, bool | int | float):
        return value
    # Whatever a transport or a hostile producer put there: keep its JSON form, or its repr.
    try:
        return _scrub(json.loads(json.dumps(value, default=repr)))
    except (TypeError, ValueError):
        return _scrub(repr(value))


def record_failure(
    *,
    task_id: str,
    task_name: str,
    exception: str,
    kind: str = FailedTask.Kind.FAILED,
    queue: str = "",
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    traceback: str = "",
    attempts: int = 1,
    worker: str = "",
) -> tuple[FailedTask, bool]:
    """Record a dead letter once per task id; returns (row, created). A second report of the same id changes nothing.

    The row is written on a connection of its own, in autocommit, from a short-lived
    thread: it survives the rollback of whatever transaction the caller is in (the one
    that is failing), and a worker's parent process keeps no database connection that a
    forked pool process would inherit.
    """
    fields = {
        "task_name": _scrub(task_name)[:255],
        "kind": kind,
        "queue": _scrub(queue or "")[:100],
        "args": _scrub(list(args or ())),
        "kwargs": _scrub(dict(kwargs or {})),
        "headers": _scrub(dict(headers or {})),
        "exception": _scrub(exception),
        "traceback": _scrub(traceback or ""),
        "attempts": max(1, attempts),
        "worker": _scrub(worker or "")[:255],
    }
    outcome: dict[str, Any] = {}

    def write() -> None:
        try:
            outcome["result"] = FailedTask.objects.get_or_create(task_id=_scrub(task_id)[:255], defaults=fields)
        except BaseException as exc:  # noqa: BLE001 (handed back to the calling thread and raised there)
            outcome["error"] = exc
        finally:
            connections.close_all()

    # Daemon, and waited for a bounded time: an unreachable database must not stall a
    # worker's consumer (or keep a process from exiting) for the length of a TCP timeout.
    thread = threading.Thread(target=write, name=f"record-failure-{task_id}", daemon=True)
    thread.start()
    thread.join(RECORD_TIMEOUT_SECONDS)
    if thread.is_alive():
        raise TimeoutError(f"dead letter of {task_name}[{task_id}] still not written after {RECORD_TIMEOUT_SECONDS} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def queue_for(task_name: str) -> str:
    """The queue the routing table names for a task."""
    return app.amqp.router.route({}, task_name)["queue"].name


def requeue_refusal(failed: FailedTask) -> str | None:
    """Why a dead letter cannot be requeued, or None when it can."""
    if failed.kind != FailedTask.Kind.FAILED:
        return "the message was refused and never ran"
    if failed.resolved:
        return "already resolved"
    if not isinstance(failed.args, list) or not isinstance(failed.kwargs, dict):
        return "its recorded arguments are not a list and a mapping"
    # Outside a worker, task modules are imported only when first used: import them all
    # (autodiscovery, CELERY_IMPORTS) before asking whether the name exists.
    app.loader.import_default_modules()
    if failed.task_name not in app.tasks:
        return "no task of that name is registered"
    return None


def requeue_failed_task(*, failed_task_id: int) -> FailedTask:
    """Send a failed task again, as a new task id with the same name and arguments, onto its routed queue; mark it
    requeued and resolved.

    The replay is an outbox item of the same transaction: it is published after commit, or by the
    relay if the broker is down then, so a dead letter marked requeued is never a replay that did
    not happen. Two operators requeueing the same row wait for each other's row lock and the
    second sees it resolved. Raises NotRequeueable for a refused message, an already resolved
    row, or a task name no longer registered.
    """
    with transaction.atomic():
        failed = FailedTask.objects.select_for_update().get(pk=failed_task_id)
        if reason := requeue_refusal(failed):
            raise NotRequeueable(failed, reason)
        item = outbox.enqueue(failed.task_name, *failed.args, kwargs=failed.kwargs)
        now = timezone.now()
        failed.requeued_as = str(item.task_id)
        failed.requeued_at = now
        failed.resolved = True
        failed.resolved_at = now
        failed.save(update_fields=["requeued_as", "requeued_at", "resolved", "resolved_at"])
    logger.info("dead letter %s requeued as %s", failed, failed.requeued_as)
    return failed


def resolve_failed_task(*, failed_task_id: int) -> FailedTask:
    """Mark a dead letter resolved without replaying it (an operator handled it by other means)."""
    with transaction.atomic():
        failed = FailedTask.objects.select_for_update().get(pk=failed_task_id)
        if not failed.resolved:
            failed.resolved = True
            failed.resolved_at = timezone.now()
            failed.save(update_fields=["resolved", "resolved_at"])
    return failed


def requeueable_failed_tasks(*, task_name: str | None = None, since: datetime | None = None) -> QuerySet[FailedTask]:
    """Unresolved failures of tasks that ran, oldest first, optionally of one task and failed at or after `since`."""
    failures = FailedTask.objects.filter(kind=FailedTask.Kind.FAILED, resolved=False)
    if task_name:
        failures = failures.filter(task_name=task_name)
    if since:
        failures = failures.filter(failed_at__gte=since)
    return failures.order_by("failed_at", "id")
