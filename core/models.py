import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone


class OutboxItem(models.Model):
    """One piece of work that must follow a commit: written in the same transaction as the change.

    The life of an item:
    - `pending`: committed, its task not finished. Published right after commit (the fast
      path, which writes nothing back when it succeeds: `attempts` counted it up front). At
      `next_attempt_at` the relay asks the broker: a message it holds makes the item
      `published`; otherwise (the fast path never ran, or the broker was down) the relay publishes it.
    - `published`: the broker holds its message (queued, running, or waiting for a Celery
      retry). Nothing publishes it again, unless the broker lost its data since it was
      published (core.outbox.broker_epoch): then the relay does.
    - `done`: the task finished. `failed`: its final failure (a dead letter), or the relay
      gave up after `OUTBOX_MAX_ATTEMPTS` publishes.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        PUBLISHED = "published"
        DONE = "done"
        FAILED = "failed"

    OPEN = (State.PENDING, State.PUBLISHED)

    # The Celery task id of every message of this item, publish after publish.
    task_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    task_name = models.CharField(max_length=200)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    # Publishes, by the fast path or the relay; bounded by OUTBOX_MAX_ATTEMPTS.
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The relay's only query: open items that are due.
            models.Index(
                fields=["next_attempt_at"], condition=Q(state__in=["pending", "published"]), name="outbox_due"
            ),
            models.Index(fields=["task_name", "state"]),
            # The prune's only query (core.outbox.prune): done items by when they finished.
            models.Index(fields=["finished_at"], condition=Q(state="done"), name="outbox_done"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}{tuple(self.args)} ({self.state})"
