"""A cumulative histogram, as Prometheus defines one: counts since start, never reset."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

FREEZE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # FIFREEZE and friends
FROZEN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)  # host's snapshot


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs, ending with +Inf, as the exposition format wants them."""
        out, running = [], 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def as_dict(self) -> dict[str, object]:
        return {"buckets": dict(self.cumulative()), "sum": round(self.total, 6),
                "count": self.count}


def _le(bound: float) -> str:
    return repr(float(bound))
