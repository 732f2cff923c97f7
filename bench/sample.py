"""One HTTP request's record (bench/load.py makes them), in a module of its own: it needs no numpy, so the
bench's JSON hand-over between processes (bench.pipeline.dumps_raw) and its tests load without the bench's extras."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    sent_at: float  # wall clock, to line up with database timestamps
    seconds: float
    status: int
    body: bytes
