"""The README's table of retry budgets and time limits is computed from the tasks' real options.

Celery's exponential backoff with full jitter waits a random time in [0, min(cap, 2**n)] s
before retry n+1 (celery.utils.time.get_exponential_backoff_interval); the longest retry
window is the sum of those ceilings. A cap that is never reached is a budget that lies.
"""

import re
from pathlib import Path

from django.conf import settings

from config.celery import app

README = Path(__file__).resolve().parents[1] / "README.md"
APPS = ("core.", "orders.", "payments.", "notifications.", "reports.")


def _queue(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def longest_window(retries: int, cap: int) -> int:
    return sum(min(cap, 2**n) for n in range(retries))


def budget_rows() -> list[str]:
    app.loader.import_default_modules()
    rows = []
    for name in sorted(name for name in app.tasks if name.startswith(APPS)):
        task = app.tasks[name]
        retries = task.max_retries if task.autoretry_for else 0
        cap = task.retry_backoff_max if retries else 0
        window = longest_window(retries, cap) if retries else 0
        rows.append(
            f"| `{name}` | {_queue(name)} | {retries + 1} | {cap or '-'} | {window or '-'} "
            f"| {task.soft_time_limit} / {task.time_limit} |"
        )
    return rows


def readme_rows() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- retry-budgets -->\n(.*?)<!-- /retry-budgets -->", text, re.S)
    assert block, "README.md has no <!-- retry-budgets --> table"
    return [line for line in block.group(1).splitlines() if line.startswith("| `")]


def test_readme_retry_table_is_the_tasks_real_options():
    expected = budget_rows()
    assert readme_rows() == expected, "README retry table is stale; it should read:\n" + "\n".join(expected)


def test_every_backoff_cap_is_reached_within_the_retries():
    for name in (name for name in app.tasks if name.startswith(APPS)):
        task = app.tasks[name]
        if task.autoretry_for and task.max_retries:
            assert 2 ** (task.max_retries - 1) >= task.retry_backoff_max, f"{name}: cap never reached"


def test_every_task_runs_under_time_limits_and_provider_calls_end_before_the_soft_limit():
    app.loader.import_default_modules()
    for name in (name for name in app.tasks if name.startswith(APPS)):
        task = app.tasks[name]
        assert task.soft_time_limit and task.time_limit, f"{name} has no time limits"
        assert task.soft_time_limit < task.time_limit
        assert (task.soft_time_limit, task.time_limit) == settings.TASK_TIME_LIMITS[_queue(name)]
    critical_soft, _ = settings.TASK_TIME_LIMITS["critical"]
    assert settings.PROVIDER_CALL_DEADLINE < critical_soft
    default_soft, _ = settings.TASK_TIME_LIMITS["default"]
    assert settings.EMAIL_TIMEOUT < default_soft


def test_the_window_arithmetic():
    assert longest_window(8, 60) == 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60
    assert longest_window(5, 600) == 31  # the old budget: a 600 s cap never reached
