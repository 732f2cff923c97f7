"""Where the machine's CPU goes during a phase of the bench: each process of the stack, with its children.

Issue 18 asks for the pipeline's critical tasks/s beside the CPU the rest of the machine spends meanwhile (the
sandbox above all: it shares the two cores and is part of what the bench measures). A group's CPU is the user
and system time (/proc/<pid>/stat) of its root process and of every live descendant, each with the time of
the children it has reaped: a pool process or gunicorn worker that exited during the phase is counted by its
parent. PostgreSQL is the postmaster's tree; the broker is the bench's redis-server or the machine's
RabbitMQ node (beam.smp, its ports helpers included). The bench's own process (its HTTP clients and
publishing) is counted with os.times().
"""

import os
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float, float] | None:
    """(command name, parent pid, CPU seconds of the process and of its reaped children, of the process alone);
    None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces: the fields after it are counted from its closing one.
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # Fields 4 (ppid) and 14-17 (utime, stime, cutime, cstime) of proc(5), here from the third on.
    parent = int(fields[1])
    ticks = [int(value) for value in fields[11:15]]
    return name, parent, sum(ticks) / TICKS_PER_SECOND, sum(ticks[:2]) / TICKS_PER_SECOND


Table = dict[int, tuple[str, int, float, float]]


def _processes() -> Table:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _tree_seconds(root: int, table: Table) -> float:
    children: dict[int, list[int]] = {}
    for pid, (_, parent, *_) in table.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            total += table[pid][2]
            stack.extend(children.get(pid, []))
    return total


def _roots_named(name: str, table: Table) -> list[int]:
    """Processes called `name` whose parent is not: the roots of that program's trees."""
    return [pid for pid, (comm, parent, *_) in table.items() if comm == name and table.get(parent, ("",))[0] != name]


def snapshot(groups: dict[str, int], *, broker_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of each group (name -> root pid), PostgreSQL, the broker and this process; for a
    worker also its main process alone ("<name> main", a part of the worker's figure, not added to it)."""
    table = _processes()
    seconds = {name: _tree_seconds(pid, table) for name, pid in groups.items()}
    for name, pid in groups.items():
        if name.startswith("worker-") and pid in table:
            # The worker's main process alone (the consumer: receiving, events, the pool's hand-offs).
            seconds[f"{name} main"] = table[pid][3]
    seconds["postgresql"] = sum(_tree_seconds(pid, table) for pid in _roots_named("postgres", table))
    brokers = [broker_pid] if broker_pid else _roots_named("beam.smp", table)
    seconds["broker"] = sum(_tree_seconds(pid, table) for pid in brokers)
    times = os.times()
    seconds["bench clients"] = times.user + times.system
    return seconds


def spent(before: dict[str, float], after: dict[str, float], *, wall_seconds: float, orders: int) -> dict:
    """What each group spent between two snapshots: CPU ms per order, and the share of the machine's cores."""
    capacity = wall_seconds * (os.cpu_count() or 1)
    used = {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}
    total = sum(value for name, value in used.items() if not name.endswith(" main"))
    return {
        "wall_seconds": round(wall_seconds, 2),
        "cores": os.cpu_count(),
        "cpu_ms_per_order": {name: round(1000 * value / orders, 2) for name, value in used.items()},
        "cpu_share_of_cores": {name: round(value / capacity, 3) for name, value in used.items()},
        "total_cpu_ms_per_order": round(1000 * total / orders, 2),
        "total_share_of_cores": round(total / capacity, 3),
    }
