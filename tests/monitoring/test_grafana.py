"""The provisioned Grafana dashboard: the panels an operator needs, on the provisioned datasource."""

import json
import re

from tests.metrics import DASHBOARD, dashboard_exprs

PROVISIONING = DASHBOARD.parent.parent


def test_dashboard_shows_depth_throughput_failures_p95_and_dead_letters():
    exprs = dashboard_exprs()
    wanted = {
        "Queue depth": "celery_queue_depth",
        "Throughput (successful tasks/s)": 'celery_tasks_total{status="success"}',
        "Failure rate": 'celery_tasks_total{status="failure"}',
        "p95 task duration": "histogram_quantile(0.95, sum by (name, le) (rate(celery_task_duration_seconds_bucket",
        "Dead letters (unresolved)": "celery_dead_letters",
    }
    for title, fragment in wanted.items():
        assert any(fragment in expr for expr in exprs[title]), title


def test_dashboard_uses_the_provisioned_datasource_and_is_loaded_from_its_folder():
    datasource_uid = re.search(r"^\s+uid: (\S+)", (PROVISIONING / "datasources" / "prometheus.yml").read_text(), re.M)
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    uids |= {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]}
    assert uids == {datasource_uid.group(1)}
    # docker-compose.yml mounts monitoring/grafana/provisioning at /etc/grafana/provisioning.
    assert (
        "path: /etc/grafana/provisioning/dashboards\n" in (PROVISIONING / "dashboards" / "dashboards.yml").read_text()
    )
