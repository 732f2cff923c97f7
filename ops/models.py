from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class FailedTask(models.Model):
    """A dead letter: a task's final failure, or a message the worker refused to run.

    One row per task id. It stays until an operator requeues it (a new task id) or marks it resolved.
    """

    class Kind(models.TextChoices):
        # The task ran and failed for good: retries exhausted, a non-retryable error,
        # the hard time limit, or its worker process lost too many times.
        FAILED = "failed"
        # The message never ran: undecodable, a disallowed content type, an unknown task name.
        REFUSED = "refused"

    task_id = models.CharField(max_length=255, unique=True)
    # For a refused message: the unknown name, or "<undecodable>" (the name it claims is in `headers`).
    task_name = models.CharField(max_length=255, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.FAILED)
    queue = models.CharField(max_length=100, blank=True)
    args = models.JSONField(default=list, blank=True, encoder=DjangoJSONEncoder)
    kwargs = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    # Raw message headers of a refused message, for tracing its producer.
    headers = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    exception = models.TextField()
    # For a refused message: its content type and the repr of its raw body, which is never decoded.
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=1)
    worker = models.CharField(max_length=255, blank=True)
    failed_at = models.DateTimeField(default=timezone.now, db_index=True)
    requeued_at = models.DateTimeField(null=True, blank=True)
    requeued_as = models.CharField(max_length=255, blank=True, help_text="Task id of the replay.")
    resolved = models.BooleanField(default=False)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-failed_at", "-id"]
        indexes = [models.Index(fields=["resolved", "failed_at"])]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]"
