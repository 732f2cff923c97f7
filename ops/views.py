"""Liveness and readiness probes."""

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache

from project.celery import app


@never_cache
def healthz(request):
    """The process is up and serving requests."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request):
    """The database and the broker answer; 503 otherwise."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # any transport error means "not ready"
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)
