"""A real Prometheus (Debian's, the package promtool comes from) scraping a real web and worker."""

import json
import os
import shutil

import pytest
import requests

from config.celery import app
from tests.metrics import dashboard_exprs
from tests.stack import Processes, free_port, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TASKS = 5
TOKEN = "e2e-prometheus-token"  # noqa: S105
ALERTS = os.path.join(os.path.dirname(__file__), "..", "..", "monitoring", "alerts.yml")


def query(prometheus: str, expr: str) -> list[dict]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def scrape_config(web: str, worker_port: int) -> dict:
    """monitoring/prometheus.yml's jobs, pointed at this test's processes and scraped every second."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [os.path.abspath(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "web",
                "authorization": {"type": "Bearer", "credentials": TOKEN},
                "static_configs": [{"targets": [web.removeprefix("http://")]}],
            },
            {
                "job_name": "celery-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"], "labels": {"service": "worker-critical"}}],
            },
        ],
    }


def test_prometheus_scrapes_task_series_from_worker_and_queues_from_web(start_worker, broker, worker_env, tmp_path):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is required (Debian: apt-get install prometheus)")
    metrics_dir = tmp_path / "metrics"  # web and worker each take a folder of their own under it
    worker_port = free_port()
    start_worker(
        "critical",
        concurrency=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "CELERY_METRICS_PORT": str(worker_port)},
    )
    processes = Processes(tmp_path)
    try:
        web = processes.web({**worker_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "METRICS_TOKEN": TOKEN})
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps(scrape_config(web, worker_port)))  # JSON is YAML
        port = free_port()
        processes.spawn(
            "prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            dict(os.environ),
        )
        prometheus = f"http://127.0.0.1:{port}"
        for number in range(TASKS):
            app.send_task("orders.tasks.process_order", args=[10**9 + number])

        def task_series() -> list[dict] | None:
            try:
                result = query(prometheus, 'celery_tasks_total{job="celery-worker", status="success"}')
            except requests.RequestException:
                return None  # not listening yet
            return result if sum(float(series["value"][1]) for series in result) >= TASKS else None

        series = wait_for(task_series, 30, f"Prometheus to scrape {TASKS} successful tasks from the worker")

        assert {s["metric"]["name"] for s in series} >= {"orders.tasks.process_order"}
        assert {s["metric"]["queue"] for s in series} == {"critical"}
        # Prometheus starts scraping its targets together, but one may land a moment after the other.
        # A scrape slower than the 1 s interval (a starved machine) reads as down: wait for one that succeeded.
        web_up = wait_for(
            lambda: (found := query(prometheus, 'up{job="web"}')) and found[0]["value"][1] == "1" and found,
            30,
            "Prometheus to scrape web",
        )
        assert web_up[0]["value"][1] == "1"  # the token was accepted
        depth = wait_for(
            lambda: len(found := query(prometheus, 'celery_queue_depth{job="web"}')) >= 3 and found,
            30,
            "the queue depths",
        )
        assert {s["metric"]["queue"] for s in depth} == {"critical", "bulk", "default"}
        # Every dashboard query is valid PromQL on real data, and the alert rules load and evaluate.
        for exprs in dashboard_exprs().values():
            for expr in exprs:
                query(prometheus, expr.replace("$__rate_interval", "1m"))

        def evaluated_rules() -> list[dict] | None:
            groups = requests.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(rule.get("health") == "ok" for rule in rules) else None

        rules = wait_for(evaluated_rules, 10, "every rule in monitoring/alerts.yml to evaluate")
        assert {rule["name"] for rule in rules if rule["type"] == "alerting"} >= {"CeleryWorkerDown", "CeleryTaskSlow"}
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop_all()
