from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from core.cli import parse_since
from ops.services import (
    NotRequeueable,
    queue_for,
    requeue_failed_task,
    requeue_refusal,
    requeueable_failed_tasks,
)


class Command(BaseCommand):
    help = "Requeue unresolved dead letters (FailedTask) onto the queues their tasks are routed to, oldest first."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--task", metavar="NAME", help="only this task name, e.g. orders.tasks.process_order")
        parser.add_argument("--since", metavar="WHEN", help="only failures at or after WHEN: ISO datetime or 30m/2h/1d")
        parser.add_argument("--dry-run", action="store_true", help="print what would be requeued, change nothing")

    def handle(
        self, *args: Any, task: str | None = None, since: str | None = None, dry_run: bool = False, **options: Any
    ) -> None:
        failures = requeueable_failed_tasks(task_name=task, since=parse_since(since) if since else None)
        requeued = 0
        for failed in list(failures):
            if dry_run:
                if reason := requeue_refusal(failed):
                    self.stderr.write(f"would skip {failed}: {reason}")
                    continue
                self.stdout.write(
                    f"would requeue {failed} -> {queue_for(failed.task_name)} (failed {failed.failed_at})"
                )
                requeued += 1
                continue
            try:
                failed = requeue_failed_task(failed_task_id=failed.pk)
            except NotRequeueable as exc:
                self.stderr.write(f"skipped: {exc}")
                continue
            self.stdout.write(f"requeued {failed} -> {queue_for(failed.task_name)} as {failed.requeued_as}")
            requeued += 1
        verb = "Would requeue" if dry_run else "Requeued"
        self.stdout.write(self.style.SUCCESS(f"{verb} {requeued} task(s)."))
