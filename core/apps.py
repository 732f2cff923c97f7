from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Celery signal handlers that finish outbox items connect on import.
        from . import outbox  # noqa: F401
