"""The transactional outbox: every piece of work that must follow a commit.

`enqueue("orders.tasks.process_order", order.pk)` writes an OutboxItem in the caller's
transaction, so the intent commits or rolls back with the business change. Right after
commit the message is published (the fast path: no added latency), and nothing more is
written: the item stays `pending` until its task finishes. When a pending item's time comes
(OUTBOX_FAST_PATH_GRACE_SECONDS) and its task has not finished, the relay asks the broker
first: a message it holds marks the item `published`; one it does not hold (the broker was
down, the process died before publishing) is published by the relay. The broker owns a
published message: nothing publishes it again while it is queued, running or waiting for a
Celery retry, so a backlog or an outage makes no duplicates, however long. Only an item
whose message the broker lost with its data (a Redis restart without persistence, a flush:
see `broker_epoch`) is published again.

Every message of an item carries the item's task id, so the worker's signals find it:
`task_success` marks it done, a final `task_failure` marks it failed (or, for a task
registered with `resume_after_failure`, parks it to try again later) and sends
`work_failed`, which the owners of the work turn into a visible state. The relay gives up
on an item after OUTBOX_MAX_ATTEMPTS publishes: failed, `work_failed`, one dead letter.
A broker outage costs no attempts: an unreachable broker is not the item's fault.

Costs on the fast path: one INSERT (with the business change; one for all the items of a change inside
`batched()`), and one UPDATE when its task finishes (done). Each publish also makes sure the broker's
epoch key exists (one SET NX on Redis, at most once a second per process). On a broker that cannot be
searched (the filesystem broker of `make run`, and RabbitMQ), the fast path marks the item published
itself: one more UPDATE.

Redis only: the search of the broker (`_held_by_broker`) and the epoch key, because Redis can lose a
message it took (its data, without persistence; a worker killed between two steps of kombu's transport).
On RabbitMQ a publish waits for the broker's confirm (publisher confirms), so an item is published only
once its message is stored on a majority of the queue's nodes; a nack leaves it pending for the relay.
The broker gives an unacknowledged message back when its consumer's connection closes, so nothing there
needs the relay to publish a message again.
"""

import functools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Task, current_app, signals
from django.conf import settings
from django.db import DatabaseError, connection, connections, transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as BrokerUnreachable

from .models import OutboxItem
from .transactions import in_transaction

logger = logging.getLogger(__name__)

# Sent when an item of work failed for good or was parked (item=, reason=, by_relay=, parked=),
# after the item's row says so. Owners of the work connect to it and make the failure visible.
work_failed = Signal()
# Sent when an item that had failed once finished after all (item_task_id=).
work_recovered = Signal()

# Task name -> seconds: after a final failure the item is published again this much later, up to
# OUTBOX_MAX_ATTEMPTS publishes in all, instead of ending failed (work that resumes by itself).
_resume_after: dict[str, float] = {}

FAILURE_WRITE_TIMEOUT_SECONDS = 15


def resume_after_failure(task_name: str, seconds: float) -> None:
    """Park instead of fail: a final failure of `task_name` is published again `seconds` later."""
    _resume_after[task_name] = seconds


def enqueue(task_name: str, *args: Any, delay: float = 0, kwargs: dict[str, Any] | None = None) -> OutboxItem:
    """Record a task call to publish after the current transaction commits; returns the item.

    Call inside `transaction.atomic`: the row commits or rolls back with the change that
    causes it. With `delay`, the relay publishes it that many seconds later instead. Tasks take
    positional primary keys; `kwargs` is for replaying a call recorded with keywords (a dead letter).
    Inside `batched()` the item is written when the block ends (its pk is set then).
    """
    if not in_transaction():
        raise RuntimeError("outbox.enqueue must be called inside transaction.atomic()")
    now = timezone.now()
    fast = delay <= 0
    # Until the fast path has had its chance, the relay leaves the item alone.
    wait = settings.OUTBOX_FAST_PATH_GRACE_SECONDS if fast else delay
    item = OutboxItem(
        task_name=task_name,
        args=list(args),
        kwargs=kwargs or {},
        next_attempt_at=now + timedelta(seconds=wait),
        # The fast path's publish is counted here, so that it need not write when it succeeds.
        attempts=1 if fast else 0,
    )
    batch = _open_batch()
    if batch is not None:
        batch.items.append(item)
    else:
        item.save(force_insert=True)
        _publish_fast(item)
    return item


def _publish_fast(item: OutboxItem) -> None:
    """After commit, the fast path's publish of a written item that is due now (a delayed one is the relay's)."""
    if item.attempts:
        transaction.on_commit(
            functools.partial(_publish_after_commit, item.pk, str(item.task_id), item.task_name, item.args, item.kwargs)
        )


class _Batch:
    """The items of an open `batched()` block, in the order enqueued, and the savepoints open when it began."""

    def __init__(self, savepoints: tuple[str, ...], outer: "_Batch | None"):
        self.savepoints = savepoints
        self.outer = outer
        self.items: list[OutboxItem] = []


# The innermost open `batched()` block of this thread (`current`), each one linked to the one around it.
_batch = threading.local()


def _savepoints() -> tuple[str, ...]:
    # atomic(savepoint=False) makes none: nothing inside it can roll back on its own.
    return tuple(sid for sid in connection.savepoint_ids if sid)


def _open_batch() -> _Batch | None:
    """The open batch that work here belongs to: only one begun at this very savepoint. Work inside a savepoint
    begun after it writes at once, so that its row rolls back with that savepoint."""
    batch: _Batch | None = getattr(_batch, "current", None)
    return batch if batch is not None and batch.savepoints == _savepoints() else None


@contextmanager
def batched() -> Iterator[None]:
    """Inside, `enqueue` only collects its items; they are written in one INSERT when the block ends, and
    published after commit in the order enqueued.

    For a change that dispatches several pieces of work (an order's status change: the next step, a deadline,
    an email): one round trip under the caller's locks instead of one an item. Use it inside the change's
    transaction (refused outside one). A block that raises writes nothing of what it enqueued, also inside
    another block that goes on. A block inside another at the same savepoint joins it (the outer one writes);
    work inside a savepoint begun within the block is written at once and rolls back with its savepoint.
    """
    if not in_transaction():
        raise RuntimeError("outbox.batched must be used inside transaction.atomic()")
    joined = _open_batch()
    if joined is not None:
        mark = len(joined.items)
        try:
            yield
        except BaseException:
            del joined.items[mark:]
            raise
        return
    outer: _Batch | None = getattr(_batch, "current", None)
    batch = _batch.current = _Batch(_savepoints(), outer)
    try:
        yield
    finally:
        _batch.current = outer
    if batch.items:
        OutboxItem.objects.bulk_create(batch.items)
        for item in batch.items:
            _publish_fast(item)


def _held(task_name: str, args: list[Any]) -> bool:
    """Whether an open batch of this thread holds an item of this task and arguments (not written yet)."""
    batch: _Batch | None = getattr(_batch, "current", None)
    while batch is not None:
        if any(item.task_name == task_name and item.args == args for item in batch.items):
            return True
        batch = batch.outer
    return False


def enqueue_once(task_name: str, *args: Any) -> OutboxItem | None:
    """`enqueue`, unless an item of the same task and arguments is still open (pending or published); None then.

    For sweeps that find the same due work again and again (billing): one item per piece of work.
    Call inside `transaction.atomic`.
    """
    if _held(task_name, list(args)):
        return None
    if OutboxItem.objects.filter(task_name=task_name, args=list(args), state__in=OutboxItem.OPEN).exists():
        return None
    return enqueue(task_name, *args)


_import_lock = threading.Lock()


def _task(task_name: str) -> Task[Any, Any]:
    try:
        return current_app.tasks[task_name]
    except KeyError:
        # Outside a worker, task modules are imported on first use; once, under a lock: a second
        # thread of a gunicorn worker must not look before the first has finished importing them.
        with _import_lock:
            current_app.loader.import_default_modules()
        return current_app.tasks[task_name]


def _backoff(attempt: int) -> timedelta:
    """Exponential, capped, with jitter (between half and all of the ceiling)."""
    ceiling = min(settings.OUTBOX_BACKOFF_MAX_SECONDS, settings.OUTBOX_BACKOFF_BASE_SECONDS * 2**attempt)
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


class Unpublishable(Exception):
    """The item names a task no worker registers (renamed or removed): publishing it can never work."""


def _publish(item_id: int, task_id: str, task_name: str, args: Any, kwargs: Any, *, fast_path: bool = False) -> bool:
    """Send one message of a pending item and mark it published; False (and a later try) when the broker is unreachable.

    The fast path's publish was counted when the item was written, and on a broker the relay
    can search it writes nothing when it succeeds (the relay asks the broker before it
    publishes a pending item again). Raises Unpublishable for a task name that is not registered.
    """
    try:
        task = _task(task_name)
    except KeyError as exc:
        raise Unpublishable(f"no task named {task_name!r} is registered") from exc
    try:
        _ensure_epoch()  # before the message: the key is never younger than a message it covers
        # Celery takes any sequence of args; celery-types says tuple.
        task.apply_async(args=list(args), kwargs=dict(kwargs or {}), task_id=task_id)  # type: ignore[arg-type]
    except (BrokerUnreachable, ChannelError) as exc:
        # Also a message the broker refused (RabbitMQ's nack under publisher confirms: kombu raises it as the
        # same OperationalError), which is not confirmed, so not published; and a channel error, such as a queue
        # declared elsewhere with other arguments (PRECONDITION_FAILED: processes whose settings differ), which
        # is a deployment's fault, not the item's: it waits, costing no attempt, and the request still answers.
        log = logger.error if isinstance(exc, ChannelError) else logger.warning
        log("broker unreachable or refused the message: outbox item %s (%s) stays pending: %r", item_id, task_name, exc)
        # An unreachable broker costs the item no attempt: the fast path gives back the one it counted.
        uncount = {"attempts": F("attempts") - 1} if fast_path else {}
        OutboxItem.objects.filter(pk=item_id, state=OutboxItem.State.PENDING).update(
            next_attempt_at=timezone.now() + _backoff(0),
            last_error=f"broker unreachable or refused the message: {exc!r}"[:500],
            **uncount,
        )
        return False
    if fast_path and _epoch_client() is not None:
        return True
    try:
        count = {} if fast_path else {"attempts": F("attempts") + 1}
        OutboxItem.objects.filter(pk=item_id, state=OutboxItem.State.PENDING).update(
            state=OutboxItem.State.PUBLISHED, published_at=timezone.now(), **count
        )
    except DatabaseError:
        # The message is out; only its record is missing. The relay publishes it once more after
        # the grace period (a duplicate the idempotent task absorbs): better than failing a
        # request whose order is already committed.
        logger.exception("outbox item %s published but not marked so", item_id)
    return True


def _publish_after_commit(item_id: int, task_id: str, task_name: str, args: Any, kwargs: Any) -> None:
    # Any error but an unreachable broker or an unknown task (a bug, or an eager task failing in
    # tests) is raised. The request's work is committed either way; the relay has the item.
    try:
        _publish(item_id, task_id, task_name, args, kwargs, fast_path=True)
    except Unpublishable:
        logger.exception("outbox item %s not published after commit; the relay will deal with it", item_id)


# A key the broker's Redis keeps for as long as its data lives: it holds the time the data began.
# Every publish makes sure it exists first, so a published item younger than it is still queued,
# running or waiting for a retry, and one older than it lost its message with the data (a
# restart without persistence, a flush).
BROKER_EPOCH_KEY = "outbox:broker-epoch"
_epoch_clients: dict[str, redis.Redis] = {}


def _epoch_client() -> redis.Redis | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        return None  # the filesystem broker of `make run` loses nothing it has written
    if url not in _epoch_clients:
        _epoch_clients[url] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return _epoch_clients[url]


# Each process makes sure of the key at most this often. A message published in the window after
# Redis lost its data, before the key is made again, is taken as lost and published once more:
# a rare duplicate the idempotent tasks absorb, for one Redis round trip less per publish.
EPOCH_CHECK_SECONDS = 1.0
_epoch_checked_at = [0.0]


def _ensure_epoch() -> None:
    """Make the broker's epoch key if it is missing (its data is new). Raises BrokerUnreachable."""
    client = _epoch_client()
    if client is None or time.monotonic() - _epoch_checked_at[0] < EPOCH_CHECK_SECONDS:
        return
    try:
        client.set(BROKER_EPOCH_KEY, repr(time.time()), nx=True)
    except redis.RedisError as exc:
        raise BrokerUnreachable(f"epoch key not written: {exc!r}") from exc
    _epoch_checked_at[0] = time.monotonic()


def broker_epoch() -> datetime | None:
    """When the broker's current data began (the key is made if missing); None when that cannot be known."""
    client = _epoch_client()
    if client is None:
        return None
    try:
        client.set(BROKER_EPOCH_KEY, repr(time.time()), nx=True)
        # A missing key (None) raises TypeError, handled below.
        return datetime.fromtimestamp(float(client.get(BROKER_EPOCH_KEY)), tz=UTC)  # type: ignore[arg-type]
    except (redis.RedisError, TypeError, ValueError) as exc:
        logger.warning("broker epoch not read: %r", exc)
        return None


# Finds which of the task ids in ARGV still have a message in the lists or hashes named by KEYS
# (the queues, and kombu's `unacked` hash of messages delivered but not acknowledged). Run inside
# Redis, so a long queue is scanned where it lies instead of being copied out.
_STILL_HELD = """
local wanted = {}
for _, id in ipairs(ARGV) do wanted[id] = true end
local found = {}
local function look(element)
  local id = string.match(element, '"id": "([%x%-]+)"')
  if id and wanted[id] then
    found[#found + 1] = id
    wanted[id] = nil
  end
end
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then
    for _, element in ipairs(redis.call('LRANGE', key, 0, -1)) do look(element) end
  elseif kind == 'hash' then
    for _, element in ipairs(redis.call('HVALS', key)) do look(element) end
  end
end
return found
"""
UNACKED_KEY = "unacked"  # kombu's Redis transport (QoS.unacked_key)


def _held_by_broker(task_ids: list[str]) -> set[str] | None:
    """Which of these task ids the broker still holds (queued, or delivered and unacknowledged); None if unknown."""
    client = _epoch_client()
    if client is None or not task_ids:
        return None
    keys = [queue.name for queue in current_app.amqp.queues.values()] + [UNACKED_KEY]
    try:
        found = client.eval(_STILL_HELD, len(keys), *keys, *task_ids)
    except redis.RedisError as exc:
        logger.warning("broker not searched for stale outbox items: %r", exc)
        return None
    return {item.decode() if isinstance(item, bytes) else item for item in found}


def _lost_in_transit(now: datetime) -> list[int]:
    """Published items not finished after OUTBOX_LOST_AFTER_SECONDS whose message the broker no longer holds.

    A worker killed between taking a message off its queue and recording it as unacknowledged
    (two steps in kombu's Redis transport) loses it while Redis keeps its data. Each stale item is
    looked for once per OUTBOX_LOST_AFTER_SECONDS; one still queued or running is left alone.
    """
    stale = list(
        OutboxItem.objects.filter(
            state=OutboxItem.State.PUBLISHED,
            published_at__lt=now - timedelta(seconds=settings.OUTBOX_LOST_AFTER_SECONDS),
            next_attempt_at__lte=now,
        ).values_list("pk", "task_id")[:500]
    )
    held = _held_by_broker([str(task_id) for _, task_id in stale])
    if held is None:
        return []
    OutboxItem.objects.filter(pk__in=[pk for pk, task_id in stale if str(task_id) in held]).update(
        next_attempt_at=now + timedelta(seconds=settings.OUTBOX_LOST_AFTER_SECONDS)
    )
    return [pk for pk, task_id in stale if str(task_id) not in held]


def _mark_held_published(now: datetime) -> int:
    """Due pending items whose message the broker holds (the fast path published it) become `published`.

    Pending items that were published once (attempts > 0) and have not finished by their next
    attempt: a backlog or a long task, or a message that never left (the process died, the
    broker was down). The broker is asked which it holds; those are left to it. When it cannot
    be asked, they wait for the next run: publishing them now could make duplicates. Runs
    before the claim, whose read of each item's state excludes one that finished meanwhile
    (a task records done before its message is acknowledged). Returns how many wait.
    """
    if _epoch_client() is None:
        return 0  # the fast path marks items published itself on a broker that cannot be searched
    candidates = list(
        OutboxItem.objects.filter(state=OutboxItem.State.PENDING, next_attempt_at__lte=now, attempts__gt=0).values_list(
            "pk", "task_id"
        )[:500]
    )
    if not candidates:
        return 0
    held = _held_by_broker([str(task_id) for _, task_id in candidates])
    if held is None:
        return OutboxItem.objects.filter(pk__in=[pk for pk, _ in candidates], state=OutboxItem.State.PENDING).update(
            next_attempt_at=now + _backoff(0)
        )
    OutboxItem.objects.filter(
        pk__in=[pk for pk, task_id in candidates if str(task_id) in held], state=OutboxItem.State.PENDING
    ).update(state=OutboxItem.State.PUBLISHED, published_at=now)  # held now: within the broker's current data
    return 0


def _claim_due(*, limit: int, epoch: datetime | None) -> list[OutboxItem]:
    """Take the due items for this run (SKIP LOCKED, then pushed out of the next run's way) and commit at once.

    Due: pending items past their next attempt that the broker does not hold, and published
    items whose message the broker lost (published before its current data began, or no
    longer held by it), which go back to pending.
    """
    now = timezone.now()
    lost = Q(state=OutboxItem.State.PUBLISHED, published_at__lt=epoch) if epoch else Q(pk__in=[])
    lost |= Q(state=OutboxItem.State.PUBLISHED, pk__in=_lost_in_transit(now))
    with transaction.atomic():
        due = list(
            OutboxItem.objects.select_for_update(skip_locked=True)
            .filter(Q(state=OutboxItem.State.PENDING, next_attempt_at__lte=now) | lost)
            .order_by("next_attempt_at", "id")[:limit]
        )
        for item in due:
            if item.state == OutboxItem.State.PUBLISHED:
                logger.warning("outbox item %s (%s): its message was lost with the broker's data", item.pk, item)
        OutboxItem.objects.filter(pk__in=[item.pk for item in due]).update(
            state=OutboxItem.State.PENDING,
            next_attempt_at=now + timedelta(seconds=settings.OUTBOX_CLAIM_SECONDS),
        )
    return due


def relay(*, limit: int = 500) -> dict[str, int]:
    """Publish the items that are due: pending ones the fast path missed, and published ones the broker lost.

    Items are claimed and committed first, then published one by one, so relays running at once
    share the work and a failure on one item touches no other. The first unreachable-broker error
    ends the run (the rest is tried again soon); an item whose task is not registered fails at
    once; any other error costs the item an attempt.
    """
    counts = {"published": 0, "failed": 0, "deferred": _mark_held_published(timezone.now())}
    due = _claim_due(limit=limit, epoch=broker_epoch())
    for position, item in enumerate(due):
        if item.attempts >= settings.OUTBOX_MAX_ATTEMPTS:
            counts["failed"] += _give_up(item, reason=f"not finished after {item.attempts} publishes")
            continue
        try:
            published = _publish(item.pk, str(item.task_id), item.task_name, item.args, item.kwargs)
        except Unpublishable as exc:
            counts["failed"] += _give_up(item, reason=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 (one item's failure must not stop the others; it is counted)
            logger.exception("outbox item %s (%s) not published", item.pk, item.task_name)
            OutboxItem.objects.filter(pk=item.pk, state=OutboxItem.State.PENDING).update(
                attempts=F("attempts") + 1,
                next_attempt_at=timezone.now() + _backoff(item.attempts),
                last_error=f"{type(exc).__name__}: {exc}"[:500],
            )
            counts["deferred"] += 1
            continue
        if not published:
            rest = [other.pk for other in due[position + 1 :]]
            OutboxItem.objects.filter(pk__in=rest, state=OutboxItem.State.PENDING).update(
                next_attempt_at=timezone.now() + _backoff(0)
            )
            counts["deferred"] += 1 + len(rest)
            break
        counts["published"] += 1
    if any(counts.values()):
        logger.info("outbox relay: %s", counts)
    return counts


def prune(*, batch: int = 5000, budget_seconds: float | None = None) -> int:
    """Delete done items that finished more than OUTBOX_KEEP_DONE_DAYS ago; returns how many.

    One DELETE per batch (the oldest first, by the partial index `outbox_done`), each committed on its own, until a
    batch comes back short or `budget_seconds` is spent (by default half the default queue's soft time limit, where
    the task runs): the next run goes on. Open and failed items are never deleted: no path reopens a done item, and a
    failed one is kept beside its dead letter.
    """
    cutoff = timezone.now() - timedelta(days=settings.OUTBOX_KEEP_DONE_DAYS)
    oldest = OutboxItem.objects.filter(state=OutboxItem.State.DONE, finished_at__lt=cutoff).order_by("finished_at")
    if budget_seconds is None:
        budget_seconds = settings.TASK_TIME_LIMITS["default"][0] / 2
    deadline = time.monotonic() + budget_seconds
    deleted = 0
    while True:
        count, _ = OutboxItem.objects.filter(pk__in=oldest.values("pk")[:batch]).delete()
        deleted += count
        if count < batch or time.monotonic() >= deadline:
            break
    if deleted:
        logger.info("outbox prune: %s done items deleted", deleted)
    return deleted


def _give_up(item: OutboxItem, *, reason: str) -> bool:
    """The relay's last word on an item it claimed: failed, with its dead letter. False, and nothing sent, when the
    item ended meanwhile (the task of an earlier publish finished after the claim was committed)."""
    if not _mark_failed(item, reason=reason):
        logger.info("outbox item %s (%s) finished while the relay was giving up on it", item.pk, item.task_name)
        return False
    work_failed.send(sender=OutboxItem, item=item, reason=item.last_error, by_relay=True, parked=False)
    return True


def _mark_failed(item: OutboxItem, *, reason: str) -> bool:
    """Mark an open item failed; False when it is no longer open (done work is never turned into a failure)."""
    item.state = OutboxItem.State.FAILED
    item.finished_at = timezone.now()
    item.last_error = reason[:500]
    return bool(
        OutboxItem.objects.filter(pk=item.pk, state__in=OutboxItem.OPEN).update(
            state=item.state, finished_at=item.finished_at, last_error=item.last_error
        )
    )


def finish_failed(*, task_id: str, reason: str) -> tuple[OutboxItem | None, bool]:
    """A task's final failure: its item ends failed, or is parked for later when its task resumes after failure.

    Returns (item, parked); (None, False) for a task that did not come from the outbox.
    """
    with transaction.atomic():
        item = OutboxItem.objects.select_for_update().filter(task_id=task_id, state__in=OutboxItem.OPEN).first()
        if item is None:
            return None, False
        resume = _resume_after.get(item.task_name)
        if resume is not None and item.attempts < settings.OUTBOX_MAX_ATTEMPTS:
            item.state = OutboxItem.State.PENDING
            item.next_attempt_at = timezone.now() + timedelta(seconds=resume)
            item.last_error = reason[:500]
            item.save(update_fields=["state", "next_attempt_at", "last_error"])
            return item, True
        _mark_failed(item, reason=reason)
        return item, False


# How a final failure by the broker's delivery limit begins (ops.deadletters.record_dead_lettered): the one failure
# a later success of the same task undoes, since the delivery that was counted may still have been running.
DELIVERY_LIMIT_EXCEEDED = "DeliveryLimitExceeded"


def _item_task_id(task_id: str) -> uuid.UUID | None:
    """The task id as an outbox item's (a UUID); None for any other (beat's tasks, a manual send, a forged id)."""
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return None


def _finish_done(task_id: str) -> None:
    # One statement; RETURNING tells whether the item had failed before (a dead letter to resolve).
    key = _item_task_id(task_id)
    if key is None:
        return
    fields = OutboxItem._meta
    params = [
        OutboxItem.State.DONE,
        fields.get_field("finished_at").get_db_prep_value(timezone.now(), connection),
        fields.get_field("task_id").get_db_prep_value(key, connection),
        *OutboxItem.OPEN,
    ]
    params += [OutboxItem.State.FAILED, f"{DELIVERY_LIMIT_EXCEEDED}%"]
    with connection.cursor() as cursor:
        # Also an item the broker's delivery limit failed while a delivery of it was still running (a worker that
        # lost its connection finishes its task; RabbitMQ counted the lost connection as a delivery): done, after all.
        cursor.execute(
            f"UPDATE {fields.db_table} SET state = %s, finished_at = %s "  # noqa: S608 (table name)
            "WHERE task_id = %s AND (state IN (%s, %s) OR (state = %s AND last_error LIKE %s)) RETURNING last_error",
            params,
        )
        row = cursor.fetchone()
    if row and row[0]:
        work_recovered.send(sender=OutboxItem, item_task_id=task_id)


def _in_own_connection(work: Callable[[], None], name: str) -> None:
    """Run database work on a connection of its own, in a short-lived thread, and wait for it (bounded).

    A task's final failure can be reported in the worker's parent process (hard time limit,
    lost pool process), which must keep no connection a forked pool process would inherit,
    and in a pool process whose transaction just failed.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 (handed back to the calling thread)
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(FAILURE_WRITE_TIMEOUT_SECONDS)
    if thread.is_alive():
        raise TimeoutError(f"{name} still running after {FAILURE_WRITE_TIMEOUT_SECONDS} s")
    if errors:
        raise errors[0]


def _is_eager(sender: Any) -> bool:
    request = getattr(sender, "request", None)
    return bool(getattr(request, "is_eager", False))


@signals.task_success.connect(dispatch_uid="core.outbox.task_succeeded")
def _task_succeeded(sender: Any = None, **kwargs: Any) -> None:
    task_id = getattr(sender.request, "id", None)
    if task_id:
        _finish_done(task_id)


def task_failed_for_good(task_id: str, reason: str) -> None:
    """A task's final failure, wherever it is learnt: its item ends failed (or parked) and `work_failed` is sent.

    An item that finished already (a broker's verdict read after the delivery it counted succeeded) stays done,
    and `work_recovered` resolves what was recorded for it. An id that is no outbox task id names no item.
    Runs on a connection of its own (see _in_own_connection). Raises what the database raises.
    """
    if _item_task_id(task_id) is None:
        return

    def work() -> None:
        item, parked = finish_failed(task_id=task_id, reason=reason)
        if item is not None:
            work_failed.send(sender=OutboxItem, item=item, reason=reason, by_relay=False, parked=parked)
        elif OutboxItem.objects.filter(task_id=task_id, state=OutboxItem.State.DONE).exists():
            work_recovered.send(sender=OutboxItem, item_task_id=task_id)

    _in_own_connection(work, name=f"outbox-failure-{task_id}")


@signals.task_failure.connect(dispatch_uid="core.outbox.task_failed")
def _task_failed(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **kwargs: Any
) -> None:
    if not task_id or _is_eager(sender):
        return
    try:
        task_failed_for_good(task_id, f"{type(exception).__name__}: {exception}")
    except Exception:
        # The dead letter (ops) is recorded independently; the log line keeps the rest.
        logger.exception("outbox: final failure of %s[%s] not recorded on its item", sender.name, task_id)
