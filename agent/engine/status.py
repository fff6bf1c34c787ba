"""What the agent says about itself: the engine's snapshot.

The engine builds the snapshot (no I/O) whenever something changes and
pushes it to the frontend, which answers the control socket from it; so a
status request never waits for, nor disturbs, the engine.  Times inside the
engine are monotonic; the snapshot turns them into wall-clock seconds.  A
snapshot may be old by the time it is asked for (nothing changes while
frozen): the frontend brings its clocks up to the moment it answers
(agent/protocols/control.py, `brought_up_to`).  `status` prints it
(agent/clients/status.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from agent import __version__
from agent.engine.child_link import ChildLink

if TYPE_CHECKING:
    from agent.engine.ledger import Transaction
    from agent.engine.service import Service

VERSION = 1


class Rendered:
    """Each transaction as the status shows it, made once and again only when it changes
    (its outcome, timings or subscribers): the history is most of the status, and most
    of it is the same from one snapshot to the next."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[tuple[object, ...], dict[str, object]]] = {}

    def transactions(self, txs: Iterable[Transaction],
                     wall: Callable[[float], float | None]) -> list[dict[str, object]]:
        out, cache = [], {}
        for tx in txs:
            key = (tx.result, tx.detail, tuple(tx.timings.items()), len(tx.subscribers))
            hit = self.cache.get(tx.id)
            if hit is None or hit[0] != key:
                d = tx.as_dict()
                d["started"] = hit[1]["started"] if hit else wall(tx.started)
                hit = (key, d)
            cache[tx.id] = hit
            out.append(hit[1])
        self.cache = cache
        return out


def snapshot(service: Service, frontend_pid: int | None = None,
             max_frozen: float | None = None,
             rendered: Rendered | None = None) -> dict[str, object]:
    """`max_frozen`: [watchdog] max_frozen_seconds, as the parent read it from the config;
    `rendered`: the transactions as the last snapshot showed them."""
    now_m, now_w = service.clock(), time.time()
    e = service.engine

    def wall(t: object) -> float | None:  # monotonic -> wall clock
        return round(now_w - (now_m - t), 3) if isinstance(t, float | int) else None

    frozen_for = now_m - e.frozen_since if e.frozen and e.frozen_since is not None else None

    transactions = (rendered or Rendered()).transactions(e.ledger.history, wall)
    return {
        "version": VERSION,
        "time": round(now_w, 3),
        "monotonic": now_m,
        "agent": {"pid": os.getpid(), "started": round(service.started, 3),
                  "protocol": service.protocol.name, "frontend_pid": frontend_pid,
                  "version": __version__},
        "state": "frozen" if e.frozen else "thawed",
        "frozen_since": wall(e.frozen_since),
        "frozen_seconds": None if frozen_for is None else round(frozen_for, 3),
        # The child's watchdog started counting before the parent heard FREEZE succeed:
        # it thaws at the latest this long after frozen_since (earlier if it must).
        "watchdog": {"max_frozen_seconds": max_frozen,
                     "seconds_left": None if frozen_for is None or max_frozen is None
                     else round(max(0.0, max_frozen - frozen_for), 3)},
        "frozen_mounts": list(e.frozen_mounts),
        "frozen_count": e.frozen_count,
        "busy": e.tx.kind.value if e.tx else None,
        "consistency_lost": e.consistency_lost,
        "child": child_health(service.child),
        "kernel": {"connected": service.kernel is not None},
        "notify": {"enabled": e.notify.enabled, "policy": e.notify.policy,
                   "budget": e.notify.budget},
        "transactions": transactions,
        "events": [{**ev, "time": wall(ev["time"])} for ev in e.ledger.events],
        "counters": dict(sorted(e.ledger.counters.items())),
        "histograms": {k: h.as_dict() for k, h in e.ledger.histograms.items()},
    }


def child_health(child: ChildLink) -> dict[str, object]:
    code = child.proc.poll()
    hello = child.hello
    return {"pid": child.pid,
            "health": "running" if code is None else f"exited with status {code}",
            "selected": hello.targets if hello else None,
            "recovered": hello.recovered if hello else None}
