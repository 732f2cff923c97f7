"""The order API's ceiling: a bare Django view doing one INSERT, served like the shop.

    gunicorn bench.ceiling_wsgi -c config/gunicorn.conf.py

The project's settings, middleware and database connection handling, and the same gunicorn
configuration, with a URL conf of one view: `POST /insert/` runs a single INSERT of the
request body through a raw cursor into the bench's table (created by bench.pipeline) and
answers 201 with the new id. No authentication, no parsing, no broker: what a request that
writes a row costs on this stack, whatever the application does on top.

`POST /insert-and-publish/` is issue 18's "naive view": the same INSERT in a transaction and a task
published after commit (bench.tasks.noop through the project's Celery app, as the service
publishes: its producer pool, and on RabbitMQ its publisher confirms), to the critical queue,
which no worker consumes during the HTTP phase and the bench purges after it. What the order API
would cost with nothing of its own on top.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

from django.conf import settings  # noqa: E402 (after the settings module is named)
from django.db import connection, transaction  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from bench.tasks import noop  # noqa: E402 (published with the service's Celery app: config/__init__.py loads it)

# Created by bench.pipeline (CEILING_TABLE), which must not import this module: importing it sets ROOT_URLCONF.
TABLE = "bench_ceiling_insert"


# Where the naive view's tasks say they would reply: nobody listens, and no worker runs them.
NAIVE_REPLY_TO = "bench.naive-view"


def _insert(body: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (body) VALUES (%s) RETURNING id", [body])  # noqa: S608 (a constant table name)
        (row_id,) = cursor.fetchone()
    return row_id


@csrf_exempt
def insert(request):
    return JsonResponse({"id": _insert(request.body.decode())}, status=201)


@csrf_exempt
def insert_and_publish(request):
    with transaction.atomic():
        row_id = _insert(request.body.decode())
        transaction.on_commit(lambda: noop.apply_async((float(row_id), NAIVE_REPLY_TO), queue="critical"))
    return JsonResponse({"id": row_id}, status=201)


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [
    path("insert/", insert),
    path("insert-and-publish/", insert_and_publish),
    path("healthz", healthz),
]

settings.ROOT_URLCONF = __name__
application = get_wsgi_application()
