"""Metrics summed across processes, scraped for real: a prefork `-c 4` worker and `gunicorn -w 4`."""

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from config.celery import app
from tests.metrics import total
from tests.stack import Processes, free_port, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = 40
REQUESTS = 60
TOKEN = "e2e-metrics-token"  # noqa: S105


def scrape(url: str, **headers: str) -> str:
    response = requests.get(url, headers=headers, timeout=5)
    response.raise_for_status()
    return response.text


def leave_stale_count(directory, name: str, labels: dict[str, str], value: float) -> None:
    """A counter file as a previous run of the process would have left it."""
    directory.mkdir(parents=True, exist_ok=True)
    stale = MmapedDict(str(directory / "counter_999999.db"))
    stale.write_value(mmap_key(name, name + "_total", labels.keys(), labels.values(), "stale"), value, 0.0)
    stale.close()


def counts_by_process(directory, metric: str, /, **labels: str) -> dict[int, float]:
    """The value of `metric` in each process's own files (<type>_<pid>.db), for the processes that counted some."""
    wanted = set(labels.items())
    counts: dict[int, float] = {}
    for path in directory.glob("*.db"):
        families = MultiProcessCollector.merge([str(path)])
        samples = [sample for family in families for sample in family.samples if sample.name == metric]
        if value := sum(sample.value for sample in samples if wanted <= set(sample.labels.items())):
            pid = int(path.stem.rsplit("_", 1)[1])
            counts[pid] = counts.get(pid, 0) + value
    return counts


def test_prefork_worker_serves_the_sum_of_its_pool_processes(start_worker, broker, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    success = {"name": "orders.tasks.process_order", "queue": "critical", "status": "success"}
    # The worker's directory is <PROMETHEUS_MULTIPROC_DIR>/<node name>; a previous run's files must not count.
    leave_stale_count(metrics_dir / f"critical-test@{socket.gethostname()}", "celery_tasks", success, 1000)
    worker = start_worker(
        "critical",
        concurrency=4,
        # Each pool process is replaced after 10 tasks, so the runs are spread over at least 5 processes,
        # some of them gone by the scrape: their counts must still be in the sum.
        options=["--max-tasks-per-child=10"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "CELERY_METRICS_PORT": str(port)},
    )
    url = f"http://127.0.0.1:{port}/metrics"

    for number in range(TASKS):
        app.send_task("orders.tasks.process_order", args=[10**9 + number])  # no such order: returns at once
    app.send_task("orders.tasks.process_order", args=["not-a-number"])  # fails: not a primary key
    app.send_task("orders.tasks.no_such_task", queue="critical")  # refused by the worker's consumer

    def finished() -> str | None:
        text = scrape(url)
        done = total(text, "celery_tasks_total", status="success") + total(text, "celery_tasks_total", status="failure")
        # A task's duration is observed a moment after its counter: wait for both.
        timed = total(text, "celery_task_duration_seconds_count", name="orders.tasks.process_order", queue="critical")
        refused = total(text, "celery_tasks_total", status="unknown")
        return text if done >= TASKS + 1 and timed >= TASKS + 1 and refused else None

    text = wait_for(finished, 30, f"{TASKS + 1} finished tasks in the worker's metrics")

    assert total(text, "celery_tasks_total", **success) == TASKS
    assert total(text, "celery_tasks_total", name="orders.tasks.process_order", status="failure") == 1
    assert total(text, "celery_tasks_total", name="unknown", queue="critical", status="unknown") == 1
    for histogram in ("celery_task_duration_seconds_count", "celery_task_queue_wait_seconds_count"):
        assert total(text, histogram, name="orders.tasks.process_order", queue="critical") == TASKS + 1
    runs = counts_by_process(metrics_dir / worker.nodename, "celery_task_duration_seconds_count")
    assert len(runs) >= 5
    assert sum(runs.values()) == TASKS + 1


def test_gunicorn_serves_the_sum_of_its_workers_behind_the_token(worker_env, tmp_path):
    metrics_dir = tmp_path / "metrics"
    leave_stale_count(metrics_dir / "web", "stale_requests", {"view": "healthz"}, 1000)
    processes = Processes(tmp_path)
    try:
        base = processes.web(
            {**worker_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "METRICS_TOKEN": TOKEN}, workers=4
        )
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        name = "django_http_requests_total_by_view_transport_method_total"
        before = total(scrape(f"{base}/metrics", **bearer), name, view="healthz")

        def get_healthz(count: int) -> None:
            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = list(
                    pool.map(lambda _: requests.get(f"{base}/healthz", timeout=5).status_code, range(count))
                )
            assert statuses == [200] * count

        get_healthz(REQUESTS // 2)
        # The kernel may hand every connection to one worker: stop the busiest, so another one answers the rest.
        served = counts_by_process(metrics_dir / "web", name, view="healthz")
        busiest = max(served, key=served.get)
        os.kill(busiest, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{busiest}").exists(), 10, f"gunicorn worker {busiest} to exit")
        get_healthz(REQUESTS - REQUESTS // 2)

        text = scrape(f"{base}/metrics", **bearer)
        assert total(text, name, view="healthz") - before == REQUESTS
        assert "stale_requests" not in text
        served = counts_by_process(metrics_dir / "web", name, view="healthz")
        assert busiest in served  # a finished worker's counts stay in the sum
        assert len(served) >= 2
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop_all()
