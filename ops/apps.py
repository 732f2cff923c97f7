from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "ops"

    def ready(self) -> None:
        # Celery signal handlers (dead letters, metrics) connect on import.
        from . import deadletters, metrics  # noqa: F401
