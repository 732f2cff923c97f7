"""monitoring/: the scrape config, the alert rules and their unit tests, checked by Prometheus' own promtool."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is required (Debian: apt-get install prometheus)")
    return path


def run(*command: str, cwd: Path = MONITORING) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.process
def test_scrape_config_is_valid(promtool, tmp_path):
    # Laid out as in the Prometheus container: the compose service writes the two secret files next to the config.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    (tmp_path / "metrics_token").write_text("token")
    (tmp_path / "flower_password").write_text("password")
    output = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"), cwd=tmp_path)
    assert "SUCCESS" in output


def test_scrape_config_scrapes_web_with_the_token_every_worker_and_flower():
    config = (MONITORING / "prometheus.yml").read_text()
    assert re.search(r"job_name: web\n(.*\n)*?\s+credentials_file: metrics_token", config)
    for target in ("web:8000", "worker-critical:9101", "worker-bulk:9102", "worker-default:9103", "flower:5555"):
        assert f'"{target}"' in config
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    # The secret files prometheus.yml reads are the ones the compose service writes.
    assert "> /etc/prometheus/metrics_token" in compose
    assert "> /etc/prometheus/flower_password" in compose


def test_compose_mounts_the_monitoring_files_that_exist():
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    mounts = re.findall(r"- \./(monitoring/[^:]+):", compose)
    assert {"monitoring/prometheus.yml", "monitoring/alerts.yml", "monitoring/grafana/provisioning"} <= set(mounts)
    for mount in mounts:
        assert (REPO_ROOT / mount).exists(), mount


@pytest.mark.process
def test_alert_rules_are_valid(promtool):
    assert "SUCCESS" in run(promtool, "check", "rules", "alerts.yml")


@pytest.mark.process
def test_alert_rules_pass_their_unit_tests(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = set(re.findall(r"^\s+- alert: (\w+)", (MONITORING / "alerts.yml").read_text(), re.MULTILINE))
    tests = (MONITORING / "alerts_test.yml").read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    assert alerts == {
        "CeleryQueueDepthHigh",
        "CeleryQueueGrowing",
        "CeleryTaskFailureRateHigh",
        "CeleryTaskSlow",
        "CeleryWorkerDown",
        "CeleryDeadLettersIncreasing",
        "MetricsEndpointDown",
        "PaymentReconciliationMismatch",
    }
    assert firing == alerts
