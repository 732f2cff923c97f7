from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self) -> None:
        # Emails follow status changes: the receivers connect on import. Nothing imports notifications.
        from . import receivers  # noqa: F401
