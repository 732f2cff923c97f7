"""Reading Prometheus' text exposition and the Grafana dashboard's queries in tests."""

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "provisioning" / "dashboards" / "shop.json"


def samples(text: str, name: str) -> dict[tuple, float]:
    """The values of the samples called `name`, keyed by their sorted (label, value) pairs."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def total(text: str, metric: str, /, **labels: str) -> float:
    """The sum of the samples called `metric` whose labels include `labels` (a label may be called `name`)."""
    wanted = set(labels.items())
    return sum(value for pairs, value in samples(text, metric).items() if wanted <= set(pairs))


def dashboard_exprs() -> dict[str, list[str]]:
    """The PromQL of each panel of the provisioned dashboard, by panel title."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in panels}
