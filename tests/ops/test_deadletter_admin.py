"""The dead-letter admin, through the admin client as a staff operator."""

import pytest
from django.urls import reverse

from ops.models import FailedTask
from tests.factories import FailedTaskFactory
from tests.ops.support import queued
from tests.staff import staff_client

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:ops_failedtask_changelist")


@pytest.fixture
def operator_client(client):
    return staff_client(client, "ops", "view_failedtask", "change_failedtask")


def run_action(client, action: str, rows: list[FailedTask]):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [row.pk for row in rows], "index": 0}, follow=True
    )


def test_the_list_filters_by_task_queue_and_resolution(operator_client):
    FailedTaskFactory(task_name="orders.tasks.process_order", queue="critical")
    FailedTaskFactory(task_name="reports.tasks.generate_report", queue="bulk", resolved=True)

    response = operator_client.get(CHANGELIST, {"queue": "bulk", "resolved__exact": "1"})

    assert response.status_code == 200
    assert [row.task_name for row in response.context["cl"].result_list] == ["reports.tasks.generate_report"]
    filters = {spec.title for spec in response.context["cl"].filter_specs}
    assert {"task name", "kind", "queue", "resolved", "failed at"} <= filters


def test_the_list_searches_task_ids_and_exceptions(operator_client):
    FailedTaskFactory(exception="TimeLimitExceeded: 360")
    FailedTaskFactory(exception="ValueError: boom")

    response = operator_client.get(CHANGELIST, {"q": "TimeLimit"})

    assert [row.exception for row in response.context["cl"].result_list] == ["TimeLimitExceeded: 360"]


def test_a_dead_letter_cannot_be_edited_or_added(operator_client):
    failed = FailedTaskFactory(args=[1])

    response = operator_client.post(
        reverse("admin:ops_failedtask_change", args=[failed.pk]), {"args": "[999]", "resolved": "on"}
    )

    failed.refresh_from_db()
    assert (failed.args, failed.resolved) == ([1], False)
    assert response.status_code in (200, 302)
    assert operator_client.get(reverse("admin:ops_failedtask_add")).status_code == 403


def test_requeue_selected_sends_each_task_again_and_reports_what_it_skipped(
    operator_client, broker, django_capture_on_commit_callbacks
):
    failed = FailedTaskFactory(args=[5])
    refused = FailedTaskFactory(kind=FailedTask.Kind.REFUSED, task_name="<unknown>")

    with django_capture_on_commit_callbacks(execute=True):  # the outbox publishes after commit
        response = run_action(operator_client, "requeue_selected", [failed, refused])

    assert response.status_code == 200
    notes = [str(message) for message in response.context["messages"]]
    assert "Requeued 1 task(s)." in notes
    assert any("refused and never ran" in note for note in notes)
    [message] = queued(broker, "critical")
    assert message["body"][0] == [5]
    failed.refresh_from_db()
    refused.refresh_from_db()
    assert failed.resolved and failed.requeued_as == message["headers"]["id"]
    assert not refused.resolved


def test_mark_resolved_resolves_without_sending(operator_client, broker):
    rows = [FailedTaskFactory(), FailedTaskFactory(kind=FailedTask.Kind.REFUSED, task_name="<unknown>")]

    run_action(operator_client, "mark_resolved", rows)

    assert FailedTask.objects.filter(resolved=True, resolved_at__isnull=False).count() == 2
    assert broker.dbsize() == 0


def test_an_operator_who_may_only_view_cannot_requeue(client, broker):
    viewer = staff_client(client, "ops", "view_failedtask")
    failed = FailedTaskFactory()

    run_action(viewer, "requeue_selected", [failed])

    failed.refresh_from_db()
    assert not failed.resolved
    assert broker.dbsize() == 0
