"""The order API's ceiling: a bare Django view doing one INSERT, served like the shop.

    gunicorn bench.ceiling_wsgi -c config/gunicorn.conf.py

The project's settings, middleware and database connection handling, and the same gunicorn
configuration, with a URL conf of one view: `POST /insert/` runs a single INSERT of the
request body through a raw cursor into the bench's table (created by bench.pipeline) and
answers 201 with the new id. No authentication, no parsing, no broker: what a request that
writes a row costs on this stack, whatever the application does on top.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

from django.conf import settings  # noqa: E402 (after the settings module is named)
from django.db import connection  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

# Created by bench.pipeline (CEILING_TABLE), which must not import this module: importing it sets ROOT_URLCONF.
TABLE = "bench_ceiling_insert"


@csrf_exempt
def insert(request):
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (body) VALUES (%s) RETURNING id", [request.body.decode()])  # noqa: S608 (a constant table name)
        (row_id,) = cursor.fetchone()
    return JsonResponse({"id": row_id}, status=201)


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [path("insert/", insert), path("healthz", healthz)]

settings.ROOT_URLCONF = __name__
application = get_wsgi_application()
