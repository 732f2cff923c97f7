"""The bench's figure: latency distributions, throughput over time, critical worker scaling, peak memory
(matplotlib, no display). Each broker measured is drawn in the same panels: solid lines for Redis, dashed
for RabbitMQ."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy  # noqa: E402

LABELS = {"redis": "Redis", "rabbitmq": "RabbitMQ"}
LINES = {"redis": "-", "rabbitmq": "--"}
SHORT = {"redis": "Redis", "rabbitmq": "RMQ"}


def _cdf(axis, seconds, label: str, linestyle: str = "-", color=None) -> None:
    values = numpy.sort(numpy.asarray(seconds, dtype=float)) * 1000
    if values.size:
        axis.plot(values, numpy.arange(1, values.size + 1) / values.size, label=label, linestyle=linestyle, color=color)


def _per_second(times, origin: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Events per one-second bin, from `origin` to the last event."""
    offsets = numpy.asarray(times, dtype=float) - origin
    if not offsets.size:
        return numpy.array([]), numpy.array([])
    counts, edges = numpy.histogram(offsets, bins=numpy.arange(0, offsets.max() + 1.0, 1.0))
    return edges[:-1], counts


def _finished(samples) -> list[float]:
    return [sample.sent_at + sample.seconds for sample in samples if sample.status == 201]


def _style_cdf(axis, title: str) -> None:
    axis.set_xscale("log")
    axis.set_xlabel("milliseconds (log)")
    axis.set_ylabel("fraction at or below")
    axis.axhline(0.95, color="grey", linewidth=0.6, linestyle=":")
    axis.set_title(title)
    axis.legend(fontsize="x-small")
    axis.grid(True, which="both", alpha=0.3)


def _style_rate(axis, title: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel("seconds into the phase")
    axis.set_ylabel(ylabel)
    axis.set_ylim(bottom=0)
    axis.legend(fontsize="x-small")
    axis.grid(True, alpha=0.3)


def plot(phases_by_broker: dict[str, dict], results: dict, path: Path) -> None:
    """`phases_by_broker`: each broker's phases with their raw series; `results`: the run's JSON."""
    figure, axes = plt.subplots(2, 4, figsize=(22, 9.5))
    machine = results["machine"]
    brokers = results["brokers"]
    loads = ", ".join(f"{LABELS[k]} {r['load']['load_average_at_start'][0]:g}" for k, r in brokers.items())
    figure.suptitle(
        f"make bench ({results['date'][:10]}): {machine['cpu_model']}, {machine['cores']} cores,"
        f" 1-minute load average at start: {loads}"
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for kind, phases in phases_by_broker.items():
        r, line, name = brokers[kind], LINES[kind], LABELS[kind]

        axis = axes[0][0]
        ok = [s.seconds for s in phases["ceiling"]["_samples"] if s.status == 201]
        _cdf(axis, ok, f"{name}: bare INSERT view (ceiling)", line, colors[0])
        ok = [s.seconds for s in phases["api"]["_samples"] if s.status == 201]
        _cdf(axis, ok, f"{name}: POST /api/orders/", line, colors[1])

        axis = axes[0][1]
        _cdf(axis, phases["celery"]["_round_trips"], f"{name}: no-op round trip (ceiling)", line, colors[0])
        _cdf(axis, phases["half"]["_to_paid"], f"{name}: created -> paid", line, colors[1])
        _cdf(axis, phases["half"]["_to_fulfilled"], f"{name}: created -> fulfilled", line, colors[2])
        target = 6 * r["ceilings"]["noop_round_trip_ms"]["p95"]
        axis.axvline(target, color="red", linewidth=0.8, linestyle=line, label=f"{name}: 6 x no-op p95 (target)")

        axis = axes[0][2]
        _cdf(axis, phases["isolation"]["_idle_queue_waits"], f"{name}: critical, idle", line, colors[0])
        bulk = r["isolation"]["bulk_tasks_queued"]
        _cdf(axis, phases["isolation"]["_bulk_queue_waits"], f"{name}: critical, {bulk:,} bulk queued", line, colors[1])

        axis = axes[1][0]
        for number, (phase, label) in enumerate((("ceiling", "bare INSERT view"), ("api", "POST /api/orders/"))):
            samples = phases[phase]["_samples"]
            x, y = _per_second(_finished(samples), samples[0].sent_at)
            axis.plot(x, y, label=f"{name}: {label}", drawstyle="steps-post", linestyle=line, color=colors[number])

        axis = axes[1][1]
        for number, (phase, label) in enumerate((("max", "max load"), ("half", "half load"))):
            samples = phases[phase]["_samples"]
            origin = samples[0].sent_at
            x, y = _per_second(_finished(samples), origin)
            axis.plot(
                x, y, label=f"{name}: {label}, placed", drawstyle="steps-post", linestyle=line, color=colors[number],
                linewidth=0.7, alpha=0.45,
            )  # fmt: skip
            x, y = _per_second(phases[phase]["_fulfilled_at"], origin)
            axis.plot(
                x, y, label=f"{name}: {label}, fulfilled", drawstyle="steps-post", linestyle=line, color=colors[number]
            )

    _style_cdf(axes[0][0], f"HTTP latency, {results['setup']['client_threads']} client threads")
    _style_cdf(axes[0][1], "Pipeline latency at half the max")
    _style_cdf(axes[0][2], "Queue wait (publish -> start)")
    _style_rate(axes[1][0], "HTTP throughput over time", "responses per second")
    _style_rate(axes[1][1], "Orders placed (faint) and fulfilled per second", "orders per second")

    kinds = list(phases_by_broker)
    width = 0.8 / max(1, len(kinds))
    for axis, key, title in (
        (axes[0][3], "orders_per_second", "Pipeline max by critical pool processes"),
        (axes[1][3], "critical_tasks_per_second", "Critical tasks/s at pipeline max"),
    ):
        for number, kind in enumerate(kinds):
            rows = brokers[kind]["critical_scaling"]
            x = numpy.arange(len(rows)) + number * width
            bars = axis.bar(x, [row[key] for row in rows], width, label=LABELS[kind], color=colors[number])
            axis.bar_label(bars, fmt="%g", fontsize="x-small")
            axis.set_xticks(
                numpy.arange(len(rows)) + width * (len(kinds) - 1) / 2, [f"-c {row['concurrency']}" for row in rows]
            )
        axis.set_title(title)
        axis.set_ylabel("orders per second" if key == "orders_per_second" else "tasks per second")
        axis.legend(fontsize="x-small")
        axis.grid(True, axis="y", alpha=0.3)

    axis = axes[1][2]
    labels, peaks, bar_colors = [], [], []
    for number, kind in enumerate(kinds):
        for worker, children in brokers[kind]["memory_mb"].items():
            for index, child in enumerate(children, start=1):
                labels.append(f"{SHORT[kind]} {worker.removeprefix('worker-')} {index}")
                peaks.append(max(child["peak_hwm_mb"], child["peak_rss_mb"]))
                bar_colors.append(colors[number])
    axis.bar(range(len(peaks)), peaks, color=bar_colors)
    axis.set_xticks(range(len(peaks)), labels, rotation=90, fontsize="xx-small")
    axis.axhline(200, color="red", linewidth=0.8, linestyle="--", label="worker_max_memory_per_child (200 MB)")
    axis.set_title("Peak resident size of each pool process")
    axis.set_ylabel("MB (VmHWM)")
    axis.legend(fontsize="x-small")
    axis.grid(True, axis="y", alpha=0.3)

    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
