"""The bench's figure: latency distributions, throughput over time, peak memory (matplotlib, no display)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy  # noqa: E402


def _cdf(axis, seconds, label: str) -> None:
    values = numpy.sort(numpy.asarray(seconds, dtype=float)) * 1000
    if values.size:
        axis.plot(values, numpy.arange(1, values.size + 1) / values.size, label=label)


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
    axis.legend(fontsize="small")
    axis.grid(True, which="both", alpha=0.3)


def plot(phases: dict, results: dict, path: Path) -> None:
    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    machine = results["machine"]
    figure.suptitle(
        f"make bench ({results['date'][:10]}): {machine['cpu_model']}, {machine['cores']} cores,"
        f" load average at start {machine['load_average_at_start'][0]}"
    )

    axis = axes[0][0]
    _cdf(axis, [s.seconds for s in phases["ceiling"]["_samples"] if s.status == 201], "bare INSERT view (ceiling)")
    _cdf(axis, [s.seconds for s in phases["api"]["_samples"] if s.status == 201], "POST /api/orders/")
    _style_cdf(axis, f"HTTP latency, {results['setup']['client_threads']} client threads")

    axis = axes[0][1]
    _cdf(axis, phases["celery"]["_round_trips"], "no-op task round trip (ceiling)")
    _cdf(axis, phases["half"]["_to_paid"], "order created -> paid")
    _cdf(axis, phases["half"]["_to_fulfilled"], "order created -> fulfilled")
    target = 6 * results["ceilings"]["noop_round_trip_ms"]["p95"]
    axis.axvline(target, color="red", linewidth=0.8, linestyle="--", label="target for paid p95: 6 x no-op p95")
    rate = results["pipeline"]["half_load"]["target_orders_per_second"]
    _style_cdf(axis, f"Pipeline latency at half the max ({rate:g} orders/s)")

    axis = axes[0][2]
    _cdf(axis, phases["isolation"]["_idle_queue_waits"], "critical, idle")
    bulk = results["isolation"]["bulk_tasks_queued"]
    _cdf(axis, phases["isolation"]["_bulk_queue_waits"], f"critical, {bulk:,} bulk tasks queued")
    _style_cdf(axis, "Queue wait (publish -> start)")

    axis = axes[1][0]
    for name, label in (("ceiling", "bare INSERT view"), ("api", "POST /api/orders/")):
        samples = phases[name]["_samples"]
        x, y = _per_second(_finished(samples), samples[0].sent_at)
        axis.plot(x, y, label=label, drawstyle="steps-post")
    axis.set_title("HTTP throughput over time")
    axis.set_xlabel("seconds into the phase")
    axis.set_ylabel("responses per second")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize="small")
    axis.grid(True, alpha=0.3)

    axis = axes[1][1]
    for name, label in (("max", "max load"), ("half", "half load")):
        samples = phases[name]["_samples"]
        origin = samples[0].sent_at
        x, y = _per_second(_finished(samples), origin)
        axis.plot(x, y, label=f"{label}: orders placed", drawstyle="steps-post", linestyle=":")
        x, y = _per_second(phases[name]["_fulfilled_at"], origin)
        axis.plot(x, y, label=f"{label}: orders fulfilled", drawstyle="steps-post")
    axis.set_title("Pipeline throughput over time")
    axis.set_xlabel("seconds into the phase")
    axis.set_ylabel("orders per second")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize="small")
    axis.grid(True, alpha=0.3)

    axis = axes[1][2]
    labels, peaks = [], []
    for worker, children in results["memory_mb"].items():
        for number, child in enumerate(children, start=1):
            labels.append(f"{worker.removeprefix('worker-')} {number}")
            peaks.append(max(child["peak_hwm_mb"], child["peak_rss_mb"]))
    axis.bar(range(len(peaks)), peaks, color="tab:blue")
    axis.set_xticks(range(len(peaks)), labels, rotation=90, fontsize="x-small")
    axis.axhline(200, color="red", linewidth=0.8, linestyle="--", label="worker_max_memory_per_child (200 MB)")
    axis.set_title("Peak resident size of each pool process")
    axis.set_ylabel("MB (VmHWM)")
    axis.legend(fontsize="small")
    axis.grid(True, axis="y", alpha=0.3)

    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
