"""Beat's scheduler with a heartbeat, so a healthcheck can tell a running beat from a stuck one.

`celery beat -s <file>` touches `<file>.heartbeat` at every tick, and ticks at least every
HEARTBEAT_SECONDS whatever the schedule (docker-compose.yml's beat healthcheck checks its age).
"""

from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

HEARTBEAT_SECONDS = 15.0


class HeartbeatScheduler(PersistentScheduler):
    schedule_filename: str  # set by PersistentScheduler.__init__; not in celery-types

    def tick(self, *args: Any, **kwargs: Any) -> float:
        Path(f"{self.schedule_filename}.heartbeat").touch()
        return min(super().tick(*args, **kwargs), HEARTBEAT_SECONDS)
