"""What the engine has done, kept for `status` and the metrics: its finished transactions,
the events it noted, its counters and histograms.  The engine writes the Ledger and never
reads it back to decide.  A Transaction is defined here because the Ledger keeps it once
finished; while it is in flight it is the engine's (its kind, deadline and replied flag
are what the engine decides on)."""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field

from agent.engine.histogram import FREEZE_BUCKETS, FROZEN_BUCKETS, Histogram
from agent.kernel.messages import KernelRequest


class Kind(enum.Enum):
    CHECK = "check"
    FREEZE = "freeze"
    THAW = "thaw"
    OTHER = "other"
    RESYNC = "resync"  # internal: THAW to the child after its automatic thaw
    RECOVER = "recover"  # internal: thaw before reopening a lost kernel channel
    ABANDON = "abandon"  # internal: thaw a freeze the kernel gave up waiting for


@dataclass
class Transaction:
    id: int
    kind: Kind
    request: KernelRequest | None
    started: float
    kernel_deadline: float | None = None  # when the kernel stops waiting (FreeBSD: msgid)
    timings: dict[str, float] = field(default_factory=dict)
    result: str = ""
    detail: str = ""
    subscribers: list[dict[str, object]] = field(default_factory=list)
    ended: float | None = None
    replied: bool = False
    abandoned: bool = False  # the kernel channel was lost: no reply can be sent

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "op": self.kind.value,
            "code": self.request.code if self.request else None,
            "result": self.result,
            "detail": self.detail,
            "started": self.started,
            "seconds": {k: round(v, 6) for k, v in self.timings.items()},
            "subscribers": list(self.subscribers),  # a copy: the list grows afterwards
        }


class Ledger:
    def __init__(self, history: int = 50) -> None:
        self.history: deque[Transaction] = deque(maxlen=history)  # the finished ones
        self.events: deque[dict[str, object]] = deque(maxlen=50)  # watchdog, budget, ...
        self.counters: Counter[str] = Counter()
        self.histograms = {"frozen": Histogram(FROZEN_BUCKETS),
                           "freeze": Histogram(FREEZE_BUCKETS)}

    def finished(self, tx: Transaction) -> None:
        self.history.append(tx)

    def event(self, kind: str, now: float, detail: str) -> None:
        self.events.append({"kind": kind, "time": now, "detail": detail})
        self.counters[f"events_{kind}"] += 1

    def timing(self, txid: int, stage: str, seconds: float) -> None:
        """A stage timed after the transaction ended (the reply's write)."""
        for tx in reversed(self.history):
            if tx.id == txid:
                tx.timings[stage] = seconds
                return

    def late_subscribers(self, txid: int, subs: list[dict[str, object]]) -> None:
        """Subscribers' answers that came after their transaction ended (THAW's)."""
        for tx in self.history:
            if tx.id == txid:
                tx.subscribers.extend(subs)
